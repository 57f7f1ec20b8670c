// Row math of the SA attention CPU kernel: one query row of scores at a time, vectorized with ATen's Vectorized<T>.
//
// Conventions (docs/contract.md): a row holds the scores s_j = scale * q.k_j (+ ALiBi, float-mask value, bias) of
// keys j in [0, n); a masked key (bool mask, outside the row's causal end or sliding window) holds -inf. The row math leaves exact
// zeros at masked keys, so the matrix products that follow may run over all n keys.
// Built with -ffp-contract=off (build.py): a product written twice must round the same way twice (the plain
// form's backward cancels u dPk against Delta), so the compiler may not fuse a multiply and an add on its own.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "nan.h"

namespace sa_cpu {

template <class T>
using Vec = at::vec::Vectorized<T>;

// An optional operand broadcastable to (B, Hq, Nq, Nk): size-1 (broadcast) dims get stride 0, so element
// (b, h, i, j) sits at ptr + b*sb + h*sh + i*si + j*sj without materializing anything.
struct View4 {
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  bool present() const { return ptr != nullptr; }
  template <class U>
  const U* row(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const U*>(ptr) + b * sb + h * sh + i * si;
  }
};

// Everything a kernel call needs besides q, k, v (scalars already in the compute type T).
template <class T>
struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, G = 1, Nq = 0, Nk = 0, D = 0, Dv = 0;
  T scale = 1, eps = 0;
  bool causal = false, normalize = true, range_grad = false;
  bool dropout = false;
  uint32_t seed_lo = 0, seed_hi = 0;
  uint64_t threshold = 0;  // keep iff hash >= threshold
  T keep_scale = 1;        // 1 / (1 - p)
  View4 keep, madd, bias;  // bool visibility, float-mask values, bias (both in T)
  const T* slopes = nullptr;
  int64_t slope_sb = 0;  // slopes[b * slope_sb + h]
  int64_t rows = 32;     // query rows per block
  int64_t win_left = -1, win_right = -1;  // sliding window (-1: unbounded on that side)
  T softcap = 0;                          // > 0: scores c tanh(s / c)

  // first key the window leaves visible to row i (at position i + Nk - Nq), in [0, Nk]
  int64_t row_start(int64_t i) const {
    if (win_left < 0) return 0;
    return std::min<int64_t>(Nk, std::max<int64_t>(0, i + Nk - Nq - win_left));
  }
  // one past the last key causality and the window leave visible to row i, in [0, Nk]
  int64_t row_stop(int64_t i) const {
    const int64_t pos = i + Nk - Nq;
    int64_t e = Nk;
    if (causal) e = std::min<int64_t>(e, pos + 1);
    if (win_right >= 0) e = std::min<int64_t>(e, pos + win_right + 1);
    return std::max<int64_t>(0, e);
  }
  // keys [0, key_end) can be visible to query rows < i1 (at least 1, as in the chunked backend)
  int64_t key_end(int64_t i1) const { return std::max<int64_t>(1, row_stop(i1 - 1)); }
  // keys before key_start are invisible to every row >= i0 (rounded down to a multiple of `align`)
  int64_t key_start(int64_t i0, int64_t align) const { return row_start(i0) / align * align; }
};

template <class T>
inline T hsum(const Vec<T>& v) {
  alignas(64) T tmp[Vec<T>::size()];
  v.store(tmp);
  T acc = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) acc += tmp[i];
  return acc;
}

template <class T>
inline void add_operand(const View4& op, int64_t b, int64_t h, int64_t i, int64_t j0, T* s, int64_t len) {
  if (!op.present()) return;
  const T* p = op.row<T>(b, h, i) + j0 * op.sj;
  if (op.sj == 1) {
    for (int64_t j = 0; j < len; ++j) s[j] += p[j];
  } else if (op.sj == 0) {
    const T x = p[0];
    for (int64_t j = 0; j < len; ++j) s[j] += x;
  } else {
    for (int64_t j = 0; j < len; ++j) s[j] += p[j * op.sj];
  }
}

// Prepares keys [j0, j0 + n) of row (b, h, i), raw scores s[0, n) (scale * q.k): soft-caps them, adds ALiBi, the
// float-mask values and the bias, and puts -inf at the keys the bool mask hides and at the keys outside the row's
// causal end and sliding window. Returns whether -inf entries can be present (then the row math takes its masked
// path; a causal row is processed over all n keys with -inf padding, so it gives bit for bit what the equivalent
// explicit mask gives). `cap_grad` (soft-capping only): receives 1 - tanh^2, the derivative of the cap (0 outside).
template <class T>
inline bool prepare_row(const Problem<T>& P, int64_t b, int64_t h, int64_t i, T* s, int64_t j0, int64_t n,
                        T* cap_grad = nullptr) {
  const int64_t lo = std::min<int64_t>(n, std::max<int64_t>(0, P.row_start(i) - j0));
  const int64_t hi = std::min<int64_t>(n, std::max<int64_t>(lo, P.row_stop(i) - j0));
  const T ninf = -std::numeric_limits<T>::infinity();
  if (P.softcap > T(0)) {
    const T c = P.softcap, inv = T(1) / P.softcap;
    constexpr int64_t W = Vec<T>::size();
    const Vec<T> vc(c), vinv(inv), one(T(1));
    // Vectors start at absolute key indices that are multiples of W, so that the forward (one range per row) and the
    // backward (key blocks of kKeyBlock) compute every score's tanh the same way, vector or scalar, bit for bit.
    // (std::tanh one score at a time made a capped call ~2.7x slower.)
    auto scalar = [&](int64_t j) {
      const T t = std::tanh(s[j] * inv);
      s[j] = c * t;
      if (cap_grad != nullptr) cap_grad[j] = T(1) - t * t;
    };
    int64_t j = lo;
    for (; j < hi && (j0 + j) % W != 0; ++j) scalar(j);
    for (; j + W <= hi; j += W) {
      const Vec<T> t = (Vec<T>::loadu(s + j) * vinv).tanh();
      (vc * t).store(s + j);
      if (cap_grad != nullptr) (one - t * t).store(cap_grad + j);
    }
    for (; j < hi; ++j) scalar(j);
    if (cap_grad != nullptr) {
      for (int64_t j = 0; j < lo; ++j) cap_grad[j] = T(0);
      for (int64_t j = hi; j < n; ++j) cap_grad[j] = T(0);
    }
  }
  if (P.slopes != nullptr) {
    const T slope = P.slopes[b * P.slope_sb + h];
    const T qpos = T(i + P.Nk - P.Nq);
    for (int64_t j = lo; j < hi; ++j) s[j] -= slope * std::abs(qpos - T(j0 + j));
  }
  add_operand<T>(P.madd, b, h, i, j0 + lo, s + lo, hi - lo);
  add_operand<T>(P.bias, b, h, i, j0 + lo, s + lo, hi - lo);
  for (int64_t j = 0; j < lo; ++j) s[j] = ninf;
  for (int64_t j = hi; j < n; ++j) s[j] = ninf;
  if (!P.keep.present()) return lo > 0 || hi < n;
  const bool* k = P.keep.template row<bool>(b, h, i);
  if (P.keep.sj == 0) {
    if (!k[0])
      for (int64_t j = lo; j < hi; ++j) s[j] = ninf;
  } else {
    k += j0 * P.keep.sj;
    for (int64_t j = lo; j < hi; ++j) s[j] = k[j * P.keep.sj] ? s[j] : ninf;
  }
  return true;
}

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// Dropout factors of row (b, h, i), keys [j0, j0 + len): `kept` where the counter-based hash keeps the entry, else 0.
// The hash is that of attention/dropout.py: flat index idx = ((b*Hq + h)*Nq + i)*Nk + j,
// h1 = fmix32(low32(idx) ^ seed_lo), h2 = fmix32(h1 ^ high32(idx) ^ seed_hi), kept iff h2 >= threshold.
template <class T>
inline void dropout_row(const Problem<T>& P, int64_t b, int64_t h, int64_t i, T kept, T* out, int64_t j0,
                        int64_t len) {
  const uint64_t base = ((uint64_t(b) * uint64_t(P.Hq) + uint64_t(h)) * uint64_t(P.Nq) + uint64_t(i)) *
                            uint64_t(P.Nk) + uint64_t(j0);
  const uint32_t lo = P.seed_lo, hi = P.seed_hi;
  const uint64_t thr = P.threshold;
  for (int64_t j = 0; j < len; ++j) {
    const uint64_t idx = base + uint64_t(j);
    uint32_t x = fmix32(uint32_t(idx) ^ lo);
    x = fmix32(x ^ uint32_t(idx >> 32) ^ hi);
    out[j] = uint64_t(x) >= thr ? kept : T(0);
  }
}

// Row statistics the forward saves for the backward: max m, 1/sum(exp(s - m)), a = min(min s, 0), the min mn, and
// the arg-min / arg-max keys. An empty row (no visible key) has m = linv = a = mn = 0, so that the backward's
// P = exp(s - m) * linv = 0.
template <class T>
struct RowStats {
  T m = 0, linv = 0, a = 0, mn = 0;
  T factor = 0;  // what the row of W.V is multiplied by to give the output: (c or 1) * linv (* 1/(1-p))
  int64_t imin = 0, imax = 0;
  bool empty = true;
};

// First index in [0, len) with s[j] == x (x finite), or -1.
template <class T>
inline int64_t find_first(const T* s, int64_t len, T x) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V vx(x);
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    const int mask = (V::loadu(s + j) - vx).zero_mask();
    if (mask != 0) return j + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; j < len; ++j)
    if (s[j] == x) return j;
  return -1;
}

// Loads keys [j, j + count) of a row as one vector, the lanes past count set to `pad`.
template <class T>
inline Vec<T> load_tail(const T* p, int64_t count, T pad) {
  alignas(64) T tmp[Vec<T>::size()];
  for (int64_t t = 0; t < Vec<T>::size(); ++t) tmp[t] = t < count ? p[t] : pad;
  return Vec<T>::loadu(tmp);
}

// Stores the first `count` lanes of v (all of them when count >= the vector width).
template <class T>
inline void store_lanes(const Vec<T>& v, T* p, int64_t count) {
  if (count < Vec<T>::size()) {
    v.store(p, count);
  } else {
    v.store(p);
  }
}

// The forward row math in place: s[0, n) (scores, -inf at masked keys when `masked`) becomes the unnormalized
// weights (s - a) e_j (normalized) or s e_j (plain) with e_j = exp(s_j - max), times keep01[j] (dropout, 0/1, or
// null); zero at masked keys. The returned factor turns the row of W.V into the output row. Every key, the last
// partial vector's too, goes through the same vector code, so the backward recomputes exactly these values.
// `range`: the row's [max, min] when the caller has them (then s holds no -inf and masked is false), else null.
template <class T>
inline RowStats<T> forward_row(const Problem<T>& P, T* s, int64_t n, bool masked, bool want_idx, const T* keep01,
                               const T* range = nullptr) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const T inf = std::numeric_limits<T>::infinity();
  const V ninf(-inf), pinf(inf), zero(T(0));
  RowStats<T> st;
  T m = -inf, mn = inf;
  if (range != nullptr) {  // [max, min] already gathered by the score product (an unmasked row)
    m = range[0];
    mn = range[1];
  } else {
    V vmax(-inf), vmin(inf);
    for (int64_t j = 0; j < n; j += W) {
      const bool tail = j + W > n;
      const V x = tail ? load_tail<T>(s + j, n - j, -inf) : V::loadu(s + j);
      vmax = at::vec::maximum(vmax, x);
      vmin = at::vec::minimum(vmin, (masked || tail) ? V::blendv(x, pinf, x == ninf) : x);
    }
    alignas(64) T a1[W], a2[W];
    vmax.store(a1);
    vmin.store(a2);
    for (int64_t t = 0; t < W; ++t) {
      m = nan_max(m, a1[t]);
      mn = nan_min(mn, a2[t]);
    }
  }
  if (n == 0 || m == -inf) {  // no visible key: a zero row
    for (int64_t j = 0; j < n; ++j) s[j] = T(0);
    return st;
  }
  if (m != m) {  // a NaN score (NaN or inf in q or k): the row's softmax is NaN, and so is all it reaches (the
    // statistics too, so that the backward, whose zero-row test is linv == 0, gives NaN gradients, not zeros)
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t j = 0; j < n; ++j) s[j] = nan;
    st.m = st.linv = st.a = st.mn = st.factor = nan;
    st.empty = false;
    return st;
  }
  st.empty = false;
  const T a = P.normalize ? std::min(mn, T(0)) : T(0);
  const T b = std::max(m, T(0));
  if (want_idx) {
    st.imax = std::max<int64_t>(0, find_first<T>(s, n, m));
    st.imin = std::max<int64_t>(0, find_first<T>(s, n, mn));
  }
  const V vm(m), va(a);
  V vsum(T(0));
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min<int64_t>(W, n - j);
    const bool tail = count < W;
    const V x = tail ? load_tail<T>(s + j, count, -inf) : V::loadu(s + j);
    const V e = (x - vm).exp_u20();
    vsum = vsum + e;
    V w = (x - va) * e;
    if (masked || tail) w = V::blendv(w, zero, x == ninf);
    if (keep01 != nullptr) w = w * (tail ? load_tail<T>(keep01 + j, count, T(0)) : V::loadu(keep01 + j));
    store_lanes<T>(w, s + j, count);
  }
  st.m = m;
  st.linv = T(1) / hsum<T>(vsum);
  st.a = a;
  st.mn = mn;
  const T c = P.normalize ? T(1) / (b - a + P.eps) : T(1);
  st.factor = c * st.linv * (P.dropout ? P.keep_scale : T(1));
  return st;
}

// What the backward row math needs of a row: the forward's statistics and Delta = g.o (section 2 of the contract).
template <class T>
struct RowGrad {
  T m = 0, linv = 0, a = 0, c = 1, delta = 0;
};

template <class T>
inline RowGrad<T> row_grad(const Problem<T>& P, const T* stats, T delta) {
  RowGrad<T> r;
  r.m = stats[0];
  r.linv = stats[1];
  r.a = stats[2];
  r.c = P.normalize ? T(1) / (std::max(r.m, T(0)) - r.a + P.eps) : T(1);
  r.delta = delta;
  return r;
}

// The per-key quantities of the backward row math for keys [j, j + count) (count <= the vector width): x the score
// (-inf at masked keys and past count), P, u = (x - a) c, dPk = dp * keep, the weight W = u P (0 at masked keys when
// `masked` or count is short) and keep itself (1 without dropout). backward_row and delta_row both take them from
// here, so that Delta from the rows is the sum of exactly the products the main pass subtracts it from.
template <class T>
struct Lanes {
  Vec<T> x, p, u, g, w, k;
};

template <class T>
inline Lanes<T> lanes(const RowGrad<T>& r, const T* s, const T* dp, const T* keep, int64_t j, int64_t count,
                      bool masked) {
  using V = Vec<T>;
  const T inf = std::numeric_limits<T>::infinity();
  const bool tail = count < V::size();
  Lanes<T> l;
  l.x = tail ? load_tail<T>(s + j, count, -inf) : V::loadu(s + j);
  const V dpv = tail ? load_tail<T>(dp + j, count, T(0)) : V::loadu(dp + j);
  l.k = keep == nullptr ? V(T(1)) : (tail ? load_tail<T>(keep + j, count, T(0)) : V::loadu(keep + j));
  l.p = (l.x - V(r.m)).exp_u20() * V(r.linv);
  l.u = (l.x - V(r.a)) * V(r.c);
  l.g = keep == nullptr ? dpv : dpv * l.k;
  l.w = l.u * l.p;
  if (masked || tail) l.w = V::blendv(V(T(0)), l.w, l.x != V(-inf));  // (u = -inf there: blend, never multiply)
  return l;
}

// The backward row math of keys [0, n) of one row, one pass, FlashAttention-2 style (Delta given). In: s the
// recomputed scores (-inf at masked keys when `masked`), dp = g.v_j, keep (dropout factors 0 or 1/(1-p), or null).
// Out: s = dL/ds without the range terms, w = the weights applied to v (for dv). With u = (s - a) c (plain: a = 0,
// c = 1, so u = s) and dPk = dp * keep:
//   P = exp(s - m) / l,  W = u P,  ds = P ((u dPk + c dPk) - Delta)   (normalized)
//                                  ds = P ((u dPk - Delta) + c dPk)   (plain: where u = s is large, u dPk and
//                                  Delta are two nearly equal large numbers, subtracted first; see delta_row)
// Returns this part of Delta0 = sum P dPk (the arg-min range term needs it).
template <class T>
inline T backward_row(const Problem<T>& P, const RowGrad<T>& r, T* s, const T* dp, const T* keep, T* w, int64_t n,
                      bool masked) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  if (r.linv == T(0)) {  // a row with no visible key: no gradient
    for (int64_t j = 0; j < n; ++j) s[j] = w[j] = T(0);
    return T(0);
  }
  const V vc(r.c), vd(r.delta), zero(T(0)), ninf(-std::numeric_limits<T>::infinity());
  V vdelta0(T(0));
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min<int64_t>(W, n - j);
    const Lanes<T> l = lanes<T>(r, s, dp, keep, j, count, masked);
    const V& g = l.g;
    V p = l.p;
    V ds = P.normalize ? p * ((l.u * g + vc * g) - vd) : p * ((l.u * g - vd) + vc * g);
    if (masked || count < W) {
      const V vis = l.x != ninf;
      p = V::blendv(zero, p, vis);
      ds = V::blendv(zero, ds, vis);
    }
    vdelta0 = vdelta0 + p * g;
    store_lanes<T>(ds, s + j, count);
    store_lanes<T>(keep == nullptr ? l.w : l.w * l.k, w + j, count);
  }
  return hsum<T>(vdelta0);
}

// This row's part of Delta = sum W dPk over keys [0, n), from the row itself, with the products rounded exactly as
// backward_row rounds them (both take them from lanes()): the plain form's backward uses it where scores are large
// (a row whose softmax is one-hot then cancels u dPk against Delta exactly, as autograd through the reference does;
// Delta = g.o would leave the rounding error of o, ~|s| ulps of dP, in dS). In: s as prepared (not modified), dp,
// keep as for backward_row.
template <class T>
inline T delta_row(const RowGrad<T>& r, const T* s, const T* dp, const T* keep, int64_t n, bool masked) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  if (r.linv == T(0)) return T(0);
  V vdelta(T(0));
  for (int64_t j = 0; j < n; j += W) {
    const Lanes<T> l = lanes<T>(r, s, dp, keep, j, std::min<int64_t>(W, n - j), masked);
    vdelta = vdelta + l.w * l.g;
  }
  return hsum<T>(vdelta);
}

}  // namespace sa_cpu

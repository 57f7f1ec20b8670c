// Row math of the SA attention CPU kernel: one query row of scores at a time, vectorized with ATen's Vectorized<T>.
//
// Conventions (docs/contract.md): a row holds the scores s_j = scale * q.k_j (+ ALiBi, float-mask value, bias) of
// keys j in [0, n); a masked key (bool mask, or past the row's causal end) holds -inf. The row math leaves exact
// zeros at masked keys, so the matrix products that follow may run over all n keys.
// Built with -ffp-contract=off (cpp_backend.py): a product written twice must round the same way twice (the plain
// form's backward cancels u dPk against Delta), so the compiler may not fuse a multiply and an add on its own.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

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

  // keys [0, key_end) can be visible to query rows < i1 (at least 1, as in the chunked backend)
  int64_t key_end(int64_t i1) const {
    if (!causal) return Nk;
    return std::max<int64_t>(1, std::min<int64_t>(Nk, i1 + Nk - Nq));
  }
  // number of leading keys of row i that the causal mask leaves visible, clipped to [0, n]
  int64_t row_len(int64_t i, int64_t n) const {
    if (!causal) return n;
    return std::max<int64_t>(0, std::min<int64_t>(n, i + Nk - Nq + 1));
  }
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
inline void add_operand(const View4& op, int64_t b, int64_t h, int64_t i, T* s, int64_t len) {
  if (!op.present()) return;
  const T* p = op.row<T>(b, h, i);
  if (op.sj == 1) {
    for (int64_t j = 0; j < len; ++j) s[j] += p[j];
  } else if (op.sj == 0) {
    const T x = p[0];
    for (int64_t j = 0; j < len; ++j) s[j] += x;
  } else {
    for (int64_t j = 0; j < len; ++j) s[j] += p[j * op.sj];
  }
}

// Prepares row (b, h, i) of raw scores s[0, n) (scale * q.k): adds ALiBi, the float-mask values and the bias, and
// puts -inf at the keys the bool mask hides and at the keys after the row's causal end. Returns whether -inf
// entries can be present (then the row math takes its masked path; a causal row is processed over all n keys with
// -inf padding, so it gives bit for bit what the equivalent explicit mask gives).
template <class T>
inline bool prepare_row(const Problem<T>& P, int64_t b, int64_t h, int64_t i, T* s, int64_t n) {
  const int64_t len = P.row_len(i, n);
  const T ninf = -std::numeric_limits<T>::infinity();
  if (P.slopes != nullptr) {
    const T slope = P.slopes[b * P.slope_sb + h];
    const T qpos = T(i + P.Nk - P.Nq);
    for (int64_t j = 0; j < len; ++j) s[j] -= slope * std::abs(qpos - T(j));
  }
  add_operand<T>(P.madd, b, h, i, s, len);
  add_operand<T>(P.bias, b, h, i, s, len);
  for (int64_t j = len; j < n; ++j) s[j] = ninf;
  if (!P.keep.present()) return len < n;
  const bool* k = P.keep.template row<bool>(b, h, i);
  if (P.keep.sj == 0) {
    if (!k[0])
      for (int64_t j = 0; j < len; ++j) s[j] = ninf;
  } else {
    for (int64_t j = 0; j < len; ++j) s[j] = k[j * P.keep.sj] ? s[j] : ninf;
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

// Dropout factors of row (b, h, i), keys [0, len): `kept` where the counter-based hash keeps the entry, else 0.
// The hash is that of attention/dropout.py: flat index idx = ((b*Hq + h)*Nq + i)*Nk + j,
// h1 = fmix32(low32(idx) ^ seed_lo), h2 = fmix32(h1 ^ high32(idx) ^ seed_hi), kept iff h2 >= threshold.
template <class T>
inline void dropout_row(const Problem<T>& P, int64_t b, int64_t h, int64_t i, T kept, T* out, int64_t len) {
  const uint64_t base = ((uint64_t(b) * uint64_t(P.Hq) + uint64_t(h)) * uint64_t(P.Nq) + uint64_t(i)) *
                        uint64_t(P.Nk);
  const uint32_t lo = P.seed_lo, hi = P.seed_hi;
  const uint64_t thr = P.threshold;
  for (int64_t j = 0; j < len; ++j) {
    const uint64_t idx = base + uint64_t(j);
    uint32_t x = fmix32(uint32_t(idx) ^ lo);
    x = fmix32(x ^ uint32_t(idx >> 32) ^ hi);
    out[j] = uint64_t(x) >= thr ? kept : T(0);
  }
}

// Row statistics the forward saves for the backward: max m, 1/sum(exp(s - m)), a = min(min s, 0), and the arg-min /
// arg-max keys. An empty row (no visible key) has m = linv = a = 0, so that the backward's P = exp(s - m) * linv = 0.
template <class T>
struct RowStats {
  T m = 0, linv = 0, a = 0;
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

// The forward row math in place: s[0, n) (scores, -inf at masked keys when `masked`) becomes the unnormalized
// weights (s - a) e_j (normalized) or s e_j (plain) with e_j = exp(s_j - max), times keep01[j] (dropout, 0/1, or
// null); zero at masked keys. The returned factor turns the row of W.V into the output row. Every key, the last
// partial vector's too, goes through the same vector code, so the backward recomputes exactly these values.
template <class T>
inline RowStats<T> forward_row(const Problem<T>& P, T* s, int64_t n, bool masked, bool want_idx, const T* keep01) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const T inf = std::numeric_limits<T>::infinity();
  const V ninf(-inf), pinf(inf), zero(T(0));
  RowStats<T> st;
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
  T m = -inf, mn = inf;
  for (int64_t t = 0; t < W; ++t) {
    m = std::max(m, a1[t]);
    mn = std::min(mn, a2[t]);
  }
  if (n == 0 || m == -inf) {  // no visible key (or NaN scores): a zero row
    for (int64_t j = 0; j < n; ++j) s[j] = T(0);
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
    if (tail) {
      w.store(s + j, count);
    } else {
      w.store(s + j);
    }
  }
  st.m = m;
  st.linv = T(1) / hsum<T>(vsum);
  st.a = a;
  const T c = P.normalize ? T(1) / (b - a + P.eps) : T(1);
  st.factor = c * st.linv * (P.dropout ? P.keep_scale : T(1));
  return st;
}

// The backward row math. In: s[0, n) the recomputed scores (-inf at masked keys when `masked`), dp[0, n) = g.v_j,
// the row's saved statistics, keep (dropout factors 0 or 1/(1-p), or null). Out: s = dL/ds (range terms included
// unless detached), w = the weights applied to v (for dv); dp is clobbered. With u = (s - a) c (plain: a = 0, c = 1,
// so u = s) and dPk = dp * keep:
//   P = exp(s - m) / l,  W = u P,  Delta = sum W dPk,  ds = P ((u dPk - Delta) + c dPk)   (plain)
//                                                     ds = P ((u dPk + c dPk) - Delta)   (normalized)
// plus c (Delta - Delta0) at the arg-min key (if a < 0) and -c Delta at the arg-max key (if b > 0), with
// Delta0 = sum P dPk. Delta is taken from the row itself (not g.o), and u dPk - Delta is formed before c dPk is
// added: in the plain form, where u = s is large, the two large terms then carry the same rounding and cancel
// cleanly (as in autograd through the reference), at the price of computing P twice. In the normalized form
// u is in [0, 1], so the cheaper order (one exp) loses nothing.
template <class T>
inline void backward_row(const Problem<T>& P, const T* stats, const int64_t* idx, T* s, T* dp, T* w, int64_t n,
                         bool masked, const T* keep) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const T inf = std::numeric_limits<T>::infinity();
  const T m = stats[0], linv = stats[1], a = stats[2];
  if (linv == T(0)) {  // a row with no visible key: no gradient
    for (int64_t j = 0; j < n; ++j) s[j] = w[j] = T(0);
    return;
  }
  const T b = std::max(m, T(0));
  const T c = P.normalize ? T(1) / (b - a + P.eps) : T(1);
  const V vm(m), vl(linv), va(a), vc(c), zero(T(0)), ninf(-inf);
  V vdelta(T(0)), vdelta0(T(0));
  // pass 1: w <- W * keep; Delta, Delta0; plain: dp <- dPk (s kept, P recomputed in pass 2); normalized, where
  // u = (s - a) c is in [0, 1] and nothing cancels: s <- P, dp <- u dPk + c dPk (one exp per key)
  const bool norm = P.normalize;
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min<int64_t>(W, n - j);
    const bool tail = count < W;
    const V x = tail ? load_tail<T>(s + j, count, -inf) : V::loadu(s + j);
    V p = (x - vm).exp_u20() * vl;
    const V u = (x - va) * vc;
    V wv = u * p;
    V g = tail ? load_tail<T>(dp + j, count, T(0)) : V::loadu(dp + j);
    V kv(T(1));
    if (keep != nullptr) {
      kv = tail ? load_tail<T>(keep + j, count, T(0)) : V::loadu(keep + j);
      g = g * kv;
    }
    V fd = norm ? u * g + vc * g : g;
    if (masked || tail) {
      const V vis = x != ninf;
      p = V::blendv(zero, p, vis);
      wv = V::blendv(zero, wv, vis);
      if (norm) fd = V::blendv(zero, fd, vis);
    }
    vdelta = vdelta + wv * g;
    vdelta0 = vdelta0 + p * g;
    if (keep != nullptr) wv = wv * kv;
    if (tail) {
      wv.store(w + j, count);
      fd.store(dp + j, count);
      if (norm) p.store(s + j, count);
    } else {
      wv.store(w + j);
      fd.store(dp + j);
      if (norm) p.store(s + j);
    }
  }
  const T delta = hsum<T>(vdelta), delta0 = hsum<T>(vdelta0);
  const V vd(delta);
  // pass 2: s <- ds
  int64_t j = 0;
  if (norm) {
    for (; j + W <= n; j += W) (V::loadu(s + j) * (V::loadu(dp + j) - vd)).store(s + j);
    for (; j < n; ++j) s[j] = s[j] * (dp[j] - delta);
  }
  for (; j < n; j += W) {
    const int64_t count = std::min<int64_t>(W, n - j);
    const bool tail = count < W;
    const V x = tail ? load_tail<T>(s + j, count, -inf) : V::loadu(s + j);
    const V g = tail ? load_tail<T>(dp + j, count, T(0)) : V::loadu(dp + j);
    const V p = (x - vm).exp_u20() * vl;
    const V u = (x - va) * vc;
    V ds = p * ((u * g - vd) + vc * g);
    if (masked || tail) ds = V::blendv(zero, ds, x != ninf);
    if (tail) {
      ds.store(s + j, count);
    } else {
      ds.store(s + j);
    }
  }
  if (P.range_grad) {
    if (a < T(0)) s[idx[0]] += c * (delta - delta0);
    if (b > T(0)) s[idx[1]] -= c * delta;
  }
}

}  // namespace sa_cpu

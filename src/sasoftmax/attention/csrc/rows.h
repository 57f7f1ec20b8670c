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

// Prepares keys [j0, j0 + n) of row (b, h, i), raw scores s[0, n) (scale * q.k): adds ALiBi, the float-mask values
// and the bias, and puts -inf at the keys the bool mask hides and at the keys after the row's causal end. Returns
// whether -inf entries can be present (then the row math takes its masked path; a causal row is processed over all
// n keys with -inf padding, so it gives bit for bit what the equivalent explicit mask gives).
template <class T>
inline bool prepare_row(const Problem<T>& P, int64_t b, int64_t h, int64_t i, T* s, int64_t j0, int64_t n) {
  const int64_t len = std::max<int64_t>(0, P.row_len(i, j0 + n) - j0);
  const T ninf = -std::numeric_limits<T>::infinity();
  if (P.slopes != nullptr) {
    const T slope = P.slopes[b * P.slope_sb + h];
    const T qpos = T(i + P.Nk - P.Nq);
    for (int64_t j = 0; j < len; ++j) s[j] -= slope * std::abs(qpos - T(j0 + j));
  }
  add_operand<T>(P.madd, b, h, i, j0, s, len);
  add_operand<T>(P.bias, b, h, i, j0, s, len);
  for (int64_t j = len; j < n; ++j) s[j] = ninf;
  if (!P.keep.present()) return len < n;
  const bool* k = P.keep.template row<bool>(b, h, i);
  if (P.keep.sj == 0) {
    if (!k[0])
      for (int64_t j = 0; j < len; ++j) s[j] = ninf;
  } else {
    k += j0 * P.keep.sj;
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

// A row's statistics in the forward, gathered over its key blocks: max m and min mn of the visible scores with
// their first keys (scan_block), whether -inf entries occur, and the vector sum of exp(s - m) (weights_block).
template <class T>
struct RowScan {
  T m = -std::numeric_limits<T>::infinity(), mn = std::numeric_limits<T>::infinity();
  int64_t imax = 0, imin = 0;
  bool masked = false;
  Vec<T> sum = Vec<T>(T(0));
  bool empty() const { return m == -std::numeric_limits<T>::infinity(); }  // no visible key (or NaN scores)
  T a(bool normalize) const { return normalize && !empty() ? std::min(mn, T(0)) : T(0); }
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

// Forward pass 1 over keys [j0, j0 + n) of a prepared row, s[0, n) (-inf at masked keys when `masked`): folds
// their max and visible min into rs, and (want_idx) the first key of each, so that over all blocks in order the
// arg-max / arg-min are the row's first.
template <class T>
inline void scan_block(RowScan<T>& rs, const T* s, int64_t j0, int64_t n, bool masked, bool want_idx) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const T inf = std::numeric_limits<T>::infinity();
  const V ninf(-inf), pinf(inf);
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
  rs.masked = rs.masked || masked;
  if (m > rs.m) {
    rs.m = m;
    if (want_idx) rs.imax = j0 + std::max<int64_t>(0, find_first<T>(s, n, m));
  }
  if (mn < rs.mn) {
    rs.mn = mn;
    if (want_idx) rs.imin = j0 + std::max<int64_t>(0, find_first<T>(s, n, mn));
  }
}

// Forward pass 2 over the keys [0, n) of a block of a scanned row, in place: s becomes the unnormalized weights
// (s - a) e (normalized) or s e (plain) with e = exp(s - m), times keep01 (dropout, 0/1, or null), zero at masked
// keys (and everywhere in an empty row); the e are added to rs.sum. Every key, the last partial vector's too, goes
// through the same vector code.
template <class T>
inline void weights_block(RowScan<T>& rs, T a, T* s, int64_t n, const T* keep01) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  if (rs.empty()) {
    for (int64_t j = 0; j < n; ++j) s[j] = T(0);
    return;
  }
  const T inf = std::numeric_limits<T>::infinity();
  const V ninf(-inf), zero(T(0)), vm(rs.m), va(a);
  V vsum = rs.sum;
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min<int64_t>(W, n - j);
    const bool tail = count < W;
    const V x = tail ? load_tail<T>(s + j, count, -inf) : V::loadu(s + j);
    const V e = (x - vm).exp_u20();
    vsum = vsum + e;
    V w = (x - va) * e;
    if (rs.masked || tail) w = V::blendv(w, zero, x == ninf);
    if (keep01 != nullptr) w = w * (tail ? load_tail<T>(keep01 + j, count, T(0)) : V::loadu(keep01 + j));
    store_lanes<T>(w, s + j, count);
  }
  rs.sum = vsum;
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

// Vector lane loads of the backward row math: keys [j, j + count) of s (pad -inf), dp (pad 0), keep (pad 0).
template <class T>
struct Lanes {
  Vec<T> x, g, k;
};

template <class T>
inline Lanes<T> load_lanes(const T* s, const T* dp, const T* keep, int64_t j, int64_t count) {
  const T inf = std::numeric_limits<T>::infinity();
  const bool tail = count < Vec<T>::size();
  Lanes<T> l;
  l.x = tail ? load_tail<T>(s + j, count, -inf) : Vec<T>::loadu(s + j);
  l.g = tail ? load_tail<T>(dp + j, count, T(0)) : Vec<T>::loadu(dp + j);
  l.k = keep == nullptr ? Vec<T>(T(1)) : (tail ? load_tail<T>(keep + j, count, T(0)) : Vec<T>::loadu(keep + j));
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
  const V vm(r.m), vl(r.linv), va(r.a), vc(r.c), vd(r.delta), zero(T(0)), ninf(-std::numeric_limits<T>::infinity());
  V vdelta0(T(0));
  const bool norm = P.normalize;
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min<int64_t>(W, n - j);
    const Lanes<T> l = load_lanes<T>(s, dp, keep, j, count);
    V p = (l.x - vm).exp_u20() * vl;
    const V u = (l.x - va) * vc;
    const V g = keep == nullptr ? l.g : l.g * l.k;
    V wv = u * p;
    V ds = norm ? p * ((u * g + vc * g) - vd) : p * ((u * g - vd) + vc * g);
    if (masked || count < W) {  // (u = -inf there: blend, never multiply by 0)
      const V vis = l.x != ninf;
      p = V::blendv(zero, p, vis);
      wv = V::blendv(zero, wv, vis);
      ds = V::blendv(zero, ds, vis);
    }
    vdelta0 = vdelta0 + p * g;
    if (keep != nullptr) wv = wv * l.k;
    store_lanes<T>(ds, s + j, count);
    store_lanes<T>(wv, w + j, count);
  }
  return hsum<T>(vdelta0);
}

// This row's part of Delta = sum W dPk over keys [0, n), from the row itself, with the products rounded exactly as
// backward_row rounds them: the plain form's backward uses it where scores are large (a row whose softmax is one-hot
// then cancels u dPk against Delta exactly, as autograd through the reference does; Delta = g.o would leave the
// rounding error of o, ~|s| ulps of dP, in dS). In: s as prepared (not modified), dp, keep as for backward_row.
template <class T>
inline T delta_row(const RowGrad<T>& r, const T* s, const T* dp, const T* keep, int64_t n, bool masked) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  if (r.linv == T(0)) return T(0);
  const V vm(r.m), vl(r.linv), va(r.a), vc(r.c), zero(T(0)), ninf(-std::numeric_limits<T>::infinity());
  V vdelta(T(0));
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min<int64_t>(W, n - j);
    const Lanes<T> l = load_lanes<T>(s, dp, keep, j, count);
    const V p = (l.x - vm).exp_u20() * vl;
    const V u = (l.x - va) * vc;
    const V g = keep == nullptr ? l.g : l.g * l.k;
    V wv = u * p;
    if (masked || count < W) wv = V::blendv(zero, wv, l.x != ninf);
    vdelta = vdelta + wv * g;
  }
  return hsum<T>(vdelta);
}

}  // namespace sa_cpu

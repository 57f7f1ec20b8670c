// The forward's score product S = scale * Q K^T from keys packed once per call into panels (float32, AVX2/AVX512).
//
// BLAS packs K again for every block of query rows it multiplies (and, for half inputs, K had to be converted to
// float32 first). Here K is converted and transposed once per call into panels of kPanel keys: panel p of a
// key/value head holds K[p*kPanel + t, d] at [p][d][t] (keys past Nk are zeros), so a (rows x kPanel) tile of S is
// D broadcast-multiply-adds per row from one contiguous D x kPanel block that stays in L1. Same arithmetic as a
// BLAS product: a sum of D products per score, in order of d, then times scale.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "convert.h"
#include "nan.h"

namespace sa_cpu {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kPanelsAvailable = true;
#else
constexpr bool kPanelsAvailable = false;  // ATen's DEFAULT vectors are plain loops: BLAS is faster there
#endif

// Keys per panel: two vectors of float32 (16 with AVX2, 32 with AVX512).
constexpr int64_t kPanel = 2 * at::vec::Vectorized<float>::size();
// Query rows per register tile: 6 rows x 2 vectors of accumulators (12 of AVX2's 16 registers).
constexpr int kTileRows = 6;

// The panel path is taken when at least this many query rows share each key/value head (Nq * group size): packing
// costs about one pass over K (and V), repaid by not repacking them per block; a decoding step (one query row)
// keeps BLAS. The caller passes the threshold with each call (tests force either path on any shape).
constexpr int64_t kDefaultPanelMinRows = 16;

inline bool use_panels(at::ScalarType ct, int64_t rows_per_kv_head, int64_t Nk, int64_t min_rows) {
  return kPanelsAvailable && ct == at::kFloat && Nk > 0 && rows_per_kv_head >= std::max<int64_t>(min_rows, 1);
}

inline int64_t panel_count(int64_t Nk) { return (Nk + kPanel - 1) / kPanel; }

// Each of ts (k or v: (B, Hkv, Nk, X), any floating dtype and strides) -> (B * Hkv, panels, X, kPanel) float32
// panels, all in one parallel region (one synchronization, not one per tensor).
inline std::vector<at::Tensor> pack_panels(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> src, out;
  std::vector<int64_t> first{0};  // first task (one panel of one head) of each tensor
  for (const auto& t0 : ts) {
    src.push_back((t0.size(3) <= 1 || t0.stride(3) == 1) ? t0 : t0.contiguous());
    const at::Tensor& t = src.back();
    const int64_t np = panel_count(t.size(2));
    out.push_back(at::empty({t.size(0) * t.size(1), np, t.size(3), kPanel}, t.options().dtype(at::kFloat)));
    first.push_back(first.back() + t.size(0) * t.size(1) * np);
  }
  const int64_t width = std::max<int64_t>(src.empty() ? 1 : src[0].size(3) * kPanel, 1);
  at::parallel_for(0, first.back(), std::max<int64_t>(1, 8192 / width), [&](int64_t t0, int64_t t1) {
    std::vector<float> row;
    for (int64_t t = t0; t < t1; ++t) {
      size_t x = 0;
      while (first[x + 1] <= t) ++x;
      const at::Tensor& k = src[x];
      const int64_t task = t - first[x], H = k.size(1), N = k.size(2), D = k.size(3), np = panel_count(N);
      const int64_t bh = task / np, p = task % np, b = bh / H, h = bh % H;
      const char* base = static_cast<const char*>(k.data_ptr());
      const int64_t es = k.element_size();
      float* dst = out[x].data_ptr<float>() + task * D * kPanel;
      row.resize(std::max<int64_t>(D, 1));
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t j = p * kPanel + c;
        if (j < N) {
          load_row<float>(base + (b * k.stride(0) + h * k.stride(1) + j * k.stride(2)) * es, k.scalar_type(),
                          row.data(), D);
        } else {
          std::fill(row.begin(), row.end(), 0.f);
        }
        for (int64_t d = 0; d < D; ++d) dst[d * kPanel + c] = row[d];
      }
    }
  });
  return out;
}

// S[r, c] = scale * sum_d Q[r, d] Kp[d][c] for MR rows and the first `count` columns of one panel.
// range = [running max (one vector)][running min (one vector)] of one row, updated with the scores x0, x1.
inline void fold_range(float* range, const at::vec::Vectorized<float>& x0, const at::vec::Vectorized<float>& x1) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  at::vec::maximum(V::loadu(range), at::vec::maximum(x0, x1)).store(range);
  at::vec::minimum(V::loadu(range + W), at::vec::minimum(x0, x1)).store(range + W);
}

// With `range` (MR x 2 vectors: running max, running min of each row), also folds the tile's scores into it.
template <int MR>
__attribute__((always_inline)) inline void score_tile(int64_t D, float scale, const float* Q, int64_t ldq, const float* Kp, float* S, int64_t lds,
                       int64_t count, float* range) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  V c0[MR], c1[MR];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) c0[r] = c1[r] = V(0.f);
  for (int64_t d = 0; d < D; ++d) {
    const V b0 = V::loadu(Kp + d * kPanel), b1 = V::loadu(Kp + d * kPanel + W);
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
      const V a(Q[r * ldq + d]);
      c0[r] = at::vec::fmadd(a, b0, c0[r]);
      c1[r] = at::vec::fmadd(a, b1, c1[r]);
    }
  }
  const V vs(scale);
  if (count >= kPanel) {
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
      const V x0 = c0[r] * vs, x1 = c1[r] * vs;
      x0.store(S + r * lds);
      x1.store(S + r * lds + W);
      if (range != nullptr) fold_range(range + r * 2 * W, x0, x1);
    }
    return;
  }
  // the last, partial panel: through a local tile (a partial vector store would keep the accumulators in memory)
  alignas(64) float tile[MR * kPanel];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
    (c0[r] * vs).store(tile + r * kPanel);
    (c1[r] * vs).store(tile + r * kPanel + W);
  }
  const float inf = std::numeric_limits<float>::infinity();
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
    const float* t = tile + r * kPanel;
    std::copy(t, t + count, S + r * lds);
    if (range != nullptr) {  // the lanes past count leave the max and min as they are
      const int64_t n0 = std::min<int64_t>(count, W), n1 = std::max<int64_t>(count - W, 0);
      const V x0 = V::set(V(-inf), V::loadu(t), n0), x1 = V::set(V(-inf), V::loadu(t + W), n1);
      const V y0 = V::set(V(inf), V::loadu(t), n0), y1 = V::set(V(inf), V::loadu(t + W), n1);
      float* g = range + r * 2 * W;
      at::vec::maximum(V::loadu(g), at::vec::maximum(x0, x1)).store(g);
      at::vec::minimum(V::loadu(g + W), at::vec::minimum(y0, y1)).store(g + W);
    }
  }
}

// S (nr x n, leading dimension lds) = scale * Q (nr x D, leading dimension ldq) K[0, n)^T, K as panels (kp: the
// head's first panel). Panels outer, so each panel is read from memory once and stays in L1 for all rows. With
// `range` (nr x 2 vectors, see range_of), each row's max and min over its n scores are gathered on the way.
inline void scores_from_panels(int64_t nr, int64_t n, int64_t D, float scale, const float* Q, int64_t ldq,
                               const float* kp, float* S, int64_t lds, float* range) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  const float inf = std::numeric_limits<float>::infinity();
  if (range != nullptr) {
    for (int64_t r = 0; r < nr; ++r) {
      V(-inf).store(range + r * 2 * W);
      V(inf).store(range + r * 2 * W + W);
    }
  }
  for (int64_t j = 0; j < n; j += kPanel) {
    const float* p = kp + (j / kPanel) * D * kPanel;
    const int64_t count = std::min<int64_t>(kPanel, n - j);
    int64_t r = 0;
    for (; r + kTileRows <= nr; r += kTileRows) score_tile<kTileRows>(D, scale, Q + r * ldq, ldq, p, S + r * lds + j, lds, count,
                                     range == nullptr ? nullptr : range + r * 2 * W);
    const float* q = Q + r * ldq;
    float* s = S + r * lds + j;
    float* g = range == nullptr ? nullptr : range + r * 2 * W;
    switch (nr - r) {
      case 5: score_tile<5>(D, scale, q, ldq, p, s, lds, count, g); break;
      case 4: score_tile<4>(D, scale, q, ldq, p, s, lds, count, g); break;
      case 3: score_tile<3>(D, scale, q, ldq, p, s, lds, count, g); break;
      case 2: score_tile<2>(D, scale, q, ldq, p, s, lds, count, g); break;
      case 1: score_tile<1>(D, scale, q, ldq, p, s, lds, count, g); break;
      default: break;
    }
  }
}

// The max and min of one row from its range lanes (scores_from_panels).
inline void range_of(const float* range, float& mx, float& mn) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  alignas(64) float a[W], b[W];
  V::loadu(range).store(a);
  V::loadu(range + W).store(b);
  mx = -std::numeric_limits<float>::infinity();  // (reduced as forward_row reduces its own lanes)
  mn = std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < W; ++t) {
    mx = nan_max(mx, a[t]);
    mn = nan_min(mn, b[t]);
  }
}

}  // namespace sa_cpu

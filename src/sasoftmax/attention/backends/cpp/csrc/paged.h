// SA attention of one-token queries (decode) over a paged key/value cache, read in place (docs/cpu_kernel.md).
//
// The cache is (num_blocks, Hkv, block_size, 2 * D): a slot holds [key | value] (the layout of
// sasoftmax.integrations.vllm.paged). Request r has seq_lens[r] tokens in the blocks block_table[r, :], its query is
// the last of them, so it sees every key (causal, bottom-right aligned) within its sliding window. Per task (request,
// key/value head): the scores of the group's query heads against each key row where it lies in the cache, the row
// math of the fused kernel (rows.h: soft-cap, ALiBi, window, max, min, exp, sum, SA weights), then the weighted sum
// of the value rows, again where they lie. Nothing of the history is gathered or copied (a half cache's rows are
// converted one at a time). Inference only: no statistics are kept for a backward.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "convert.h"
#include "rows.h"

namespace sa_cpu {

template <class T>
inline T vec_dot(const T* a, const T* b, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V acc(T(0));
  int64_t d = 0;
  for (; d + W <= n; d += W) acc = acc + V::loadu(a + d) * V::loadu(b + d);
  T s = hsum<T>(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <class T>
inline void vec_axpy(T w, const T* x, T* y, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V vw(w);
  int64_t d = 0;
  for (; d + W <= n; d += W) (V::loadu(y + d) + vw * V::loadu(x + d)).store(y + d);
  for (; d < n; ++d) y[d] += w * x[d];
}

struct PagedCall {
  int64_t R = 0, Hq = 0, Hkv = 0, G = 1, D = 0, block_size = 0, max_blocks = 0;
  const void* cache = nullptr;
  at::ScalarType cache_dtype = at::kFloat;
  int64_t cache_esize = 4, block_stride = 0, head_stride = 0, slot_stride = 0;  // in elements
  const int64_t* table = nullptr;  // (R, max_blocks)
  const int64_t* lens = nullptr;   // (R,)
  int64_t win_left = -1;
};

template <class T>
void paged_decode_kernel(const PagedCall& C, const Problem<T>& base, const T* q, T* out) {
  const bool in_place = C.cache_dtype == (std::is_same_v<T, double> ? at::kDouble : at::kFloat);
  const int64_t D = C.D, G = C.G;
  int64_t longest = 1;
  for (int64_t r = 0; r < C.R; ++r) longest = std::max(longest, C.lens[r]);
  // tasks per parallel chunk: at least ~2^18 multiply-adds each (a short batch stays on one thread)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(G * longest * 2 * D, 1));
  at::parallel_for(0, C.R * C.Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<T> S(G * longest), row(in_place ? 0 : 2 * D), factor(G);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / C.Hkv, g = t % C.Hkv, L = C.lens[r];
      const int64_t* blocks = C.table + r * C.max_blocks;
      // the keys the window leaves visible to the query at position L - 1: [j0, L)
      const int64_t j0 = C.win_left < 0 ? 0 : std::max<int64_t>(0, L - 1 - C.win_left), n = L - j0;
      auto kv_row = [&](int64_t j) -> const T* {  // [key | value] of token j of request r, head g
        const int64_t off = blocks[j / C.block_size] * C.block_stride + g * C.head_stride +
                            (j % C.block_size) * C.slot_stride;
        const char* p = static_cast<const char*>(C.cache) + off * C.cache_esize;
        if (in_place) return reinterpret_cast<const T*>(p);
        load_row<T>(p, C.cache_dtype, row.data(), 2 * D);
        return row.data();
      };
      Problem<T> P = base;  // this request's geometry: one query row at the end of L keys
      P.Nq = 1;
      P.Nk = L;
      const T* qg = q + (r * C.Hq + g * G) * D;
      for (int64_t j = j0; j < L; ++j) {
        const T* k = kv_row(j);
        for (int64_t x = 0; x < G; ++x) S[x * n + (j - j0)] = base.scale * vec_dot<T>(qg + x * D, k, D);
      }
      for (int64_t x = 0; x < G; ++x) {
        T* s = S.data() + x * n;
        const bool masked = prepare_row<T>(P, 0, g * G + x, 0, s, j0, n);
        factor[x] = forward_row<T>(P, s, n, masked, false, nullptr).factor;
      }
      T* o = out + (r * C.Hq + g * G) * D;
      std::fill(o, o + G * D, T(0));
      for (int64_t j = j0; j < L; ++j) {
        const T* v = kv_row(j) + D;
        for (int64_t x = 0; x < G; ++x) vec_axpy<T>(S[x * n + (j - j0)], v, o + x * D, D);
      }
      for (int64_t x = 0; x < G; ++x)
        for (int64_t d = 0; d < D; ++d) o[x * D + d] *= factor[x];
    }
  });
}

// q (R, Hq, D); kv_cache (num_blocks, Hkv, block_size, 2 * D), unit stride along the last dim; block_table
// (R, max_blocks) and seq_lens (R,) integer; slopes (Hq,) in the compute dtype or undefined. win_left < 0: no window,
// else the query sees the win_left keys before it and itself. Returns (R, Hq, D) in q's dtype.
inline at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                               const at::Tensor& seq_lens, const c10::optional<at::Tensor>& slopes, double scale,
                               bool normalize, double eps, int64_t win_left, double softcap) {
  pybind11::gil_scoped_release no_gil;
  TORCH_CHECK(q.dim() == 3, "sa_cpu.paged_decode: `query` must be (R, Hq, D), got ", q.sizes());
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(3) == 2 * q.size(2) && kv_cache.stride(3) == 1,
              "sa_cpu.paged_decode: `kv_cache` must be (num_blocks, Hkv, block_size, 2 * D) with D = ", q.size(2),
              " and unit stride along the last dim, got ", kv_cache.sizes());
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kv_cache.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "sa_cpu.paged_decode: query heads (", Hq,
              ") must be a multiple of the cache's key/value heads (", Hkv, ")");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == R,
              "sa_cpu.paged_decode: `block_table` must be (R, max_blocks) with R = ", R, ", got ", block_table.sizes());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == R, "sa_cpu.paged_decode: `seq_lens` must be (R,) with R = ",
              R, ", got ", seq_lens.sizes());
  const at::Tensor table = block_table.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  const int64_t num_blocks = kv_cache.size(0), bs = kv_cache.size(2), mb = table.size(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(lp[r] >= 1 && lp[r] <= mb * bs, "sa_cpu.paged_decode: `seq_lens`[", r, "] = ", lp[r],
                " must be in [1, max_blocks * block_size = ", mb * bs, "]");
    for (int64_t i = 0; i < (lp[r] + bs - 1) / bs; ++i)
      TORCH_CHECK(tp[r * mb + i] >= 0 && tp[r * mb + i] < num_blocks, "sa_cpu.paged_decode: `block_table`[", r, ", ",
                  i, "] = ", tp[r * mb + i], " is not a block of the cache (", num_blocks, " blocks)");
  }
  const auto ct = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(!slopes.has_value() || !slopes->defined() ||
                  (slopes->scalar_type() == ct && slopes->numel() == Hq && slopes->is_contiguous()),
              "sa_cpu.paged_decode: `alibi_slopes` must be (Hq,) contiguous in the compute dtype");
  const at::Tensor qc = q.to(ct).contiguous();
  at::Tensor out = at::empty({R, Hq, D}, q.options().dtype(ct));
  PagedCall C;
  C.R = R;
  C.Hq = Hq;
  C.Hkv = Hkv;
  C.G = Hq / Hkv;
  C.D = D;
  C.block_size = bs;
  C.max_blocks = mb;
  C.cache = kv_cache.data_ptr();
  C.cache_dtype = kv_cache.scalar_type();
  C.cache_esize = kv_cache.element_size();
  C.block_stride = kv_cache.stride(0);
  C.head_stride = kv_cache.stride(1);
  C.slot_stride = kv_cache.stride(2);
  C.table = tp;
  C.lens = lp;
  C.win_left = win_left;
  AT_DISPATCH_FLOATING_TYPES(ct, "sa_cpu_paged_decode", [&] {
    Problem<scalar_t> P;
    P.B = 1;
    P.Hq = Hq;
    P.Hkv = Hkv;
    P.G = C.G;
    P.D = P.Dv = D;
    P.scale = scalar_t(scale);
    P.eps = scalar_t(eps);
    P.normalize = normalize;
    P.win_left = win_left;
    P.softcap = scalar_t(softcap);
    if (slopes.has_value() && slopes->defined()) P.slopes = slopes->data_ptr<scalar_t>();
    paged_decode_kernel<scalar_t>(C, P, qc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

}  // namespace sa_cpu

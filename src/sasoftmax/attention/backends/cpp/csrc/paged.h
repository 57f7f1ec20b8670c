// SA attention of one-token queries (decode) over a paged key/value cache, read in place (docs/cpu_kernel.md).
//
// The cache is (num_blocks, Hkv, block_size, 2 * D): a slot holds [key | value] (the layout of
// sasoftmax.integrations.vllm.paged). Request r has seq_lens[r] tokens in the blocks block_table[r, :], its query is
// the last of them, so it sees every key (causal, bottom-right aligned) within its sliding window. Per task (request,
// key/value head): the scores of the group's query heads against each key row where it lies in the cache, the row
// math of the fused kernel (rows.h: soft-cap, ALiBi, window, max, min, exp, sum, SA weights), then the weighted sum
// of the value rows, again where they lie. Nothing of the history is gathered or copied (a half cache's rows are
// converted one at a time). Inference only: no statistics are kept for a backward. paged_store writes a step's new
// rows into their slots (one pass, no intermediate tensors: a serving step calls it once per layer).
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cstring>
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
  // shuffles, not a store and a scalar loop: one reduction per key and head is most of a decode step's work
  T s = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, acc);
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

// A 1-d or 2-d integer tensor (int32 or int64, contiguous) read as int64 without a conversion pass.
struct Ints {
  const void* p = nullptr;
  bool wide = true;
  int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
  }
};

inline Ints ints(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "sa_cpu: `", name,
                    "` must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "sa_cpu: `", name, "` must be contiguous");
  return Ints{t.data_ptr(), t.scalar_type() == at::kLong};
}

struct PagedCall {
  int64_t R = 0, Hq = 0, Hkv = 0, G = 1, D = 0, block_size = 0, max_blocks = 0;
  const void* cache = nullptr;
  at::ScalarType cache_dtype = at::kFloat;
  int64_t cache_esize = 4, block_stride = 0, head_stride = 0, slot_stride = 0;  // in elements
  Ints table;  // (R, max_blocks)
  Ints lens;   // (R,)
  int64_t win_left = -1;
};

template <class T>
void paged_decode_kernel(const PagedCall& C, const Problem<T>& base, const T* q, T* out) {
  const bool in_place = C.cache_dtype == (std::is_same_v<T, double> ? at::kDouble : at::kFloat);
  const int64_t D = C.D, G = C.G;
  int64_t longest = 1;
  for (int64_t r = 0; r < C.R; ++r) longest = std::max<int64_t>(longest, C.lens[r]);
  // tasks per parallel chunk: at least ~2^16 multiply-adds each (a short batch stays on one thread)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(G * longest * 2 * D, 1));
  at::parallel_for(0, C.R * C.Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<T> S(G * longest), row(in_place ? 0 : 2 * D), factor(G);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / C.Hkv, g = t % C.Hkv, L = C.lens[r];
      const int64_t first = r * C.max_blocks;  // this request's row of the block table
      // the keys the window leaves visible to the query at position L - 1: [j0, L)
      const int64_t j0 = C.win_left < 0 ? 0 : std::max<int64_t>(0, L - 1 - C.win_left), n = L - j0;
      // fn(j, [key | value] row) for tokens j in [j0, L) of request r, head g, block by block (no division per
      // token); a half cache's rows are converted into `row` one at a time
      auto each_row = [&](auto&& fn) {
        for (int64_t j = j0; j < L;) {
          const int64_t slot0 = j % C.block_size, count = std::min(C.block_size - slot0, L - j);
          const char* p = static_cast<const char*>(C.cache) +
                          (C.table[first + j / C.block_size] * C.block_stride + g * C.head_stride +
                           slot0 * C.slot_stride) * C.cache_esize;
          for (int64_t t = 0; t < count; ++t, ++j, p += C.slot_stride * C.cache_esize) {
            if (in_place) {
              fn(j, reinterpret_cast<const T*>(p));
            } else {
              load_row<T>(p, C.cache_dtype, row.data(), 2 * D);
              fn(j, static_cast<const T*>(row.data()));
            }
          }
        }
      };
      Problem<T> P = base;  // this request's geometry: one query row at the end of L keys
      P.Nq = 1;
      P.Nk = L;
      const T* qg = q + (r * C.Hq + g * G) * D;
      each_row([&](int64_t j, const T* k) {
        for (int64_t x = 0; x < G; ++x) S[x * n + (j - j0)] = base.scale * vec_dot<T>(qg + x * D, k, D);
      });
      for (int64_t x = 0; x < G; ++x) {
        T* s = S.data() + x * n;
        const bool masked = prepare_row<T>(P, 0, g * G + x, 0, s, j0, n);
        factor[x] = forward_row<T>(P, s, n, masked, false, nullptr).factor;
      }
      T* o = out + (r * C.Hq + g * G) * D;
      std::fill(o, o + G * D, T(0));
      each_row([&](int64_t j, const T* kv) {
        for (int64_t x = 0; x < G; ++x) vec_axpy<T>(S[x * n + (j - j0)], kv + D, o + x * D, D);
      });
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
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  const Ints tp = ints(table, "block_table"), lp = ints(lens, "seq_lens");
  const int64_t num_blocks = kv_cache.size(0), bs = kv_cache.size(2), mb = table.size(1);
  // value errors (Python ValueError): a length or block id that would read outside the cache
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK_VALUE(lp[r] >= 1 && lp[r] <= mb * bs, "`seq_lens` must be in [1, max_blocks * block_size = ", mb * bs,
                      "], got seq_lens[", r, "] = ", lp[r]);
    for (int64_t i = 0; i < (lp[r] + bs - 1) / bs; ++i)
      TORCH_CHECK_VALUE(tp[r * mb + i] >= 0 && tp[r * mb + i] < num_blocks, "`block_table`[", r, ", ", i, "] = ",
                        tp[r * mb + i], " is not a block of the cache (", num_blocks, " blocks)");
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

// Writes token i's key and value rows (key, value: (n, Hkv, D), any row strides, unit stride along D) into slot
// slot_mapping[i] of the cache (block slot / block_size, position slot % block_size), converted to the cache's dtype;
// a negative slot (a padding token) is skipped. Tokens past slot_mapping's length are not written.
inline void paged_store(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                        const at::Tensor& slot_mapping) {
  pybind11::gil_scoped_release no_gil;
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "sa_cpu.paged_store: `key` and `value` must be "
              "(n, Hkv, D) of one shape, got ", key.sizes(), " and ", value.sizes());
  const int64_t Hkv = key.size(1), D = key.size(2);
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(1) == Hkv && kv_cache.size(3) == 2 * D && kv_cache.stride(3) == 1,
              "sa_cpu.paged_store: `kv_cache` must be (num_blocks, ", Hkv, ", block_size, ", 2 * D,
              ") with unit stride along the last dim, got ", kv_cache.sizes());
  TORCH_CHECK(slot_mapping.dim() == 1, "sa_cpu.paged_store: `slot_mapping` must be 1-d");
  const at::Tensor kc = key.stride(2) == 1 ? key : key.contiguous(), vc = value.stride(2) == 1 ? value : value.contiguous();
  const at::Tensor sm = slot_mapping.contiguous();
  const Ints slots = ints(sm, "slot_mapping");
  const int64_t n = std::min<int64_t>(key.size(0), sm.size(0)), bs = kv_cache.size(2);
  const int64_t capacity = kv_cache.size(0) * bs;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(slots[i] < capacity, "`slot_mapping`[", i, "] = ", slots[i], " is past the cache's ",
                      capacity, " slots");
  const int64_t ce = kv_cache.element_size();
  const at::ScalarType cdt = kv_cache.scalar_type();
  char* base = static_cast<char*>(kv_cache.data_ptr());
  std::vector<double> buf(key.scalar_type() == cdt ? 0 : D);
  auto put = [&](const at::Tensor& src, int64_t i, int64_t h, char* dst) {
    const char* from = static_cast<const char*>(src.data_ptr()) + (i * src.stride(0) + h * src.stride(1)) *
                                                                       src.element_size();
    if (src.scalar_type() == cdt) {
      std::memcpy(dst, from, D * ce);
    } else {
      load_row<double>(from, src.scalar_type(), buf.data(), D);
      store_row<double>(buf.data(), dst, cdt, D);
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;
    for (int64_t h = 0; h < Hkv; ++h) {
      char* row = base + ((slot / bs) * kv_cache.stride(0) + h * kv_cache.stride(1) + (slot % bs) * kv_cache.stride(2)) * ce;
      put(kc, i, h, row);
      put(vc, i, h, row + D * ce);
    }
  }
}

}  // namespace sa_cpu

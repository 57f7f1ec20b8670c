// Fused SA-Softmax attention for the CPU: forward and analytic backward (docs/contract.md, docs/cpu_kernel.md).
//
// Forward, per task (batch b, query head h, block of `rows` query rows):
//   S = scale * Q_blk K^T over all keys the block can see, into a per-thread buffer (from K panels, panels.h, for
//   float32 compute with enough query rows per key/value head, with the row max/min of unmasked rows; else BLAS);
//   exact row math on whole rows (rows.h: ALiBi, float mask, bias, bool mask, dropout; max, min, exp, sum, weights);
//   O_blk = W V (one matrix product), each row times its factor. Saved per row: max, 1/sum, a, min, arg-min, arg-max.
// Backward, per task (batch b, key/value head, chunk of query blocks), looping over the group's query heads and, for
// each query block, FlashAttention-2 style over blocks of kKeyBlock keys (the buffers stay in a core's L2):
//   Delta = g.o per row first (the plain form with large scores: from the rows, see block_deltas);
//   S = scale * Q_blk K_j^T, dP = dO_blk V_j^T (the forward's way: panels or BLAS); one pass of row math (rows.h)
//   gives dS and the applied weights W;
//   dV_j += W^T dO_blk, dQ_blk += scale * dS K_j, dK_j += scale * dS^T Q_blk, dbias += dS (summed over broadcast
//   dims); then the range terms at each row's arg-min / arg-max key (O(D) per row).
// The dk/dv of one key/value head are written by one task only (chunks of query blocks get their own partial sums
// when there are fewer heads than threads). Everything runs in float32 (float64 for float64 inputs). q, k, v and the
// output gradient are read in place with their strides when they are in the compute type (e.g. the (B, N, H, D)
// layout of a model's projections, transposed); half inputs are converted to float32 in one parallel pass (K and V
// as they are packed into panels), and the results are written in the caller's dtype by the tasks themselves.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <memory>
#include <string>
#include <vector>

#include "convert.h"
#include "gemm.h"
#include "paged.h"
#include "panels.h"
#include "rows.h"

namespace sa_cpu {

using OptTensor = c10::optional<at::Tensor>;

View4 view4(const OptTensor& t, const char* name) {
  View4 v;
  if (!t.has_value() || !t->defined()) return v;
  TORCH_CHECK(t->dim() == 4, "sa_cpu: `", name, "` must be 4-d (broadcastable to (B, Hq, Nq, Nk))");
  v.ptr = t->data_ptr();
  auto st = [&](int d) { return t->size(d) == 1 ? int64_t(0) : t->stride(d); };
  v.sb = st(0);
  v.sh = st(1);
  v.si = st(2);
  v.sj = st(3);
  return v;
}

// A (B, H, N, X) operand with unit stride along X, as the kernel reads it.
template <class T>
struct Mat {
  const T* p = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
  const T* at(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * sn; }
};

template <class T>
Mat<T> mat(const at::Tensor& t) {
  // (a single row's stride is never used, but BLAS wants a leading dimension of at least the row length)
  const int64_t sn = t.size(2) <= 1 ? std::max<int64_t>(t.size(3), 1) : t.stride(2);
  return Mat<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), sn};
}

// Whether the kernel can read t in place: compute type, unit stride along the last dim, rows that do not overlap
// (a BLAS leading dimension of at least the row length). Batch and head strides may be anything, 0 included.
bool readable_in_place(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() != ct) return false;
  if (t.size(3) > 1 && t.stride(3) != 1) return false;
  return t.size(2) <= 1 || t.stride(2) >= std::max<int64_t>(t.size(3), 1);
}

// The tensors the kernel reads: each one itself when it is in the compute type with unit last stride, else a
// contiguous compute-type copy; all conversions run in one parallel pass (one synchronization, not one per tensor).
std::vector<at::Tensor> compute_operands(const std::vector<at::Tensor>& ts, at::ScalarType ct) {
  std::vector<at::Tensor> out, src, dst;
  for (const auto& t0 : ts) {
    if (readable_in_place(t0, ct)) {
      out.push_back(t0);
      continue;
    }
    const at::Tensor t = (t0.stride(3) == 1 || t0.size(3) <= 1) ? t0 : t0.contiguous();
    out.push_back(at::empty(t.sizes(), t.options().dtype(ct)));
    src.push_back(t);
    dst.push_back(out.back());
  }
  if (src.empty()) return out;
  std::vector<int64_t> first{0};  // first row of each job in the flat row index
  for (const auto& t : src) first.push_back(first.back() + t.size(0) * t.size(1) * t.size(2));
  const int64_t width = src[0].size(3) > 0 ? src[0].size(3) : 1;
  at::parallel_for(0, first.back(), std::max<int64_t>(1, 4096 / width), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      size_t j = 0;
      while (first[j + 1] <= r) ++j;
      const at::Tensor& t = src[j];
      const int64_t row = r - first[j], H = t.size(1), N = t.size(2), X = t.size(3);
      const int64_t b = row / (H * N), h = (row / N) % H, i = row % N;
      const char* from = static_cast<const char*>(t.data_ptr()) +
                         (b * t.stride(0) + h * t.stride(1) + i * t.stride(2)) * t.element_size();
      AT_DISPATCH_FLOATING_TYPES(ct, "sa_cpu_load", [&] {
        load_row<scalar_t>(from, t.scalar_type(), dst[j].data_ptr<scalar_t>() + row * X, X);
      });
    }
  });
  return out;
}

// Where a block's result rows go: straight into the output when it is in the compute type, else through a
// per-thread buffer and a conversion.
struct RowsOut {
  void* base = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t esize = 4, width = 0;
  bool direct = false;
  template <class T>
  T* target(int64_t row, T* scratch) const {
    return direct ? static_cast<T*>(base) + row * width : scratch;
  }
  template <class T>
  void finish(int64_t row, const T* scratch, int64_t nrows) const {
    if (direct) return;
    for (int64_t r = 0; r < nrows; ++r)
      store_row<T>(scratch + r * width, static_cast<char*>(base) + (row + r) * width * esize, dtype, width);
  }
};

RowsOut rows_out(const at::Tensor& t, at::ScalarType ct) {
  RowsOut o;
  o.base = t.data_ptr();
  o.dtype = t.scalar_type();
  o.esize = t.element_size();
  o.width = t.size(-1);
  o.direct = t.scalar_type() == ct;
  return o;
}

struct Options {
  bool causal = false, normalize = true, detach_range = false;
  double scale = 1, eps = 1e-10, dropout_p = 0, softcap = 0;
  int64_t seed = 0, rows = 32, win_left = -1, win_right = -1;
};

template <class T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& keep,
                        const OptTensor& madd, const OptTensor& bias, const OptTensor& slopes, const Options& o) {
  Problem<T> P;
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Nq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Nk = k.size(2);
  P.Dv = v.size(3);
  P.G = P.Hq / P.Hkv;
  P.scale = T(o.scale);
  P.eps = T(o.eps);
  P.causal = o.causal;
  P.normalize = o.normalize;
  P.range_grad = o.normalize && !o.detach_range;
  P.dropout = o.dropout_p > 0;
  const uint64_t seed = static_cast<uint64_t>(o.seed);
  P.seed_lo = uint32_t(seed & 0xFFFFFFFFull);
  P.seed_hi = uint32_t((seed >> 32) & 0xFFFFFFFFull);
  P.threshold = static_cast<uint64_t>(o.dropout_p * 4294967296.0);  // int(p * 2**32), as dropout.py
  P.keep_scale = T(1.0 / (1.0 - o.dropout_p));
  P.keep = view4(keep, "attn_mask");
  P.madd = view4(madd, "attn_mask");
  P.bias = view4(bias, "bias");
  if (slopes.has_value() && slopes->defined()) {
    P.slopes = slopes->data_ptr<T>();
    P.slope_sb = slopes->size(0) == 1 ? 0 : P.Hq;
  }
  P.rows = std::max<int64_t>(1, std::min<int64_t>(o.rows, std::max<int64_t>(P.Nq, 1)));
  P.win_left = o.win_left;
  P.win_right = o.win_right;
  P.softcap = T(o.softcap);
  return P;
}

// Per-row statistics saved by the forward: max, 1/sum of exp(s - max), a, min.
constexpr int64_t kStats = 4;
// Keys per block of the backward: its three (rows x keys) buffers and the block's dk/dv rows stay in a core's L2.
// (The forward keeps whole rows: blocking it by keys did not make it faster, see docs/cpu_kernel.md.)
constexpr int64_t kKeyBlock = 256;
// The plain form's backward takes Delta from the rows (delta_row) instead of g.o in a query block whose scores reach
// this magnitude (see delta_row; below it the two agree to the rounding of the reference itself).
constexpr double kPlainDeltaBound = 32;

template <class U>
std::unique_ptr<U[]> buffer(int64_t n) {
  return std::unique_ptr<U[]>(new U[std::max<int64_t>(n, 1)]);
}

// Causal blocks get more expensive with the block index: visit them low, high, low, high, ... so that the contiguous
// task ranges at::parallel_for hands each thread carry similar work.
inline int64_t zigzag(int64_t slot, int64_t nblk, bool causal) {
  if (!causal) return slot;
  return (slot % 2 == 0) ? slot / 2 : nblk - 1 - slot / 2;
}

// Tasks per parallel chunk such that a chunk holds at least ~2^18 multiply-adds (smaller calls stay serial).
inline int64_t grain_for(int64_t work_per_task) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(work_per_task, 1)); }

template <class T>
void forward_kernel(const Problem<T>& P, const Mat<T>& q, const Mat<T>& k, const Mat<T>& v, const RowsOut& out,
                    T* stats, int64_t* idx, const float* key_panels) {
  const int64_t R = P.rows, nblk = (P.Nq + R - 1) / R;
  const int64_t ntasks = P.B * P.Hq * nblk;
  const bool want_idx = idx != nullptr;
  const int64_t grain = grain_for(R * P.Nk * (P.D + P.Dv));
  // rows nothing is added to or hidden from: the score product can gather their max and min (panels only)
  const bool fold = key_panels != nullptr && !P.causal && P.slopes == nullptr && !P.madd.present() &&
                    !P.bias.present() && !P.keep.present() && P.win_left < 0 && P.win_right < 0 &&
                    P.softcap == T(0);
  at::parallel_for(0, ntasks, grain, [&](int64_t t0, int64_t t1) {
    auto S = buffer<T>(R * P.Nk);
    auto range = buffer<float>(fold ? R * kPanel : 0);
    auto keep01 = buffer<T>(P.dropout ? P.Nk : 0);
    auto factor = buffer<T>(R);
    auto Obuf = buffer<T>(out.direct ? 0 : R * P.Dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nblk, blk = zigzag(t % nblk, nblk, P.causal);
      const int64_t b = bh / P.Hq, h = bh % P.Hq, hk = h / P.G;
      const int64_t i0 = blk * R, i1 = std::min(P.Nq, i0 + R), nr = i1 - i0;
      // keys [j0, j0 + n) of the block: past its causal/window end and before its window start nothing is visible
      // (j0 on a key-block boundary, so the backward forms the same scores from the same panels)
      const int64_t j0 = P.key_start(i0, kKeyBlock), n = P.key_end(i1) - j0;
      T* Ob = out.template target<T>(bh * P.Nq + i0, Obuf.get());
      if constexpr (std::is_same_v<T, float>) {
        if (key_panels != nullptr) {
          const float* kp = key_panels + ((b * P.Hkv + hk) * panel_count(P.Nk) + j0 / kPanel) * P.D * kPanel;
          scores_from_panels(nr, n, P.D, P.scale, q.at(b, h, i0), q.sn, kp, S.get(), n, fold ? range.get() : nullptr);
        }
      }
      if (key_panels == nullptr)
        gemm<T>(false, true, nr, n, P.D, P.scale, q.at(b, h, i0), q.sn, k.at(b, hk, j0), k.sn, T(0), S.get(), n);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        T* s = S.get() + r * n;
        const bool masked = prepare_row<T>(P, b, h, i, s, j0, n);
        if (P.dropout) dropout_row<T>(P, b, h, i, T(1), keep01.get(), j0, n);
        T mm[2];
        if constexpr (std::is_same_v<T, float>) {
          if (fold) range_of(range.get() + r * kPanel, mm[0], mm[1]);
        }
        const RowStats<T> st =
            forward_row<T>(P, s, n, masked, want_idx, P.dropout ? keep01.get() : nullptr, fold ? mm : nullptr);
        factor[r] = st.factor;
        if (stats != nullptr) {
          T* sp = stats + (bh * P.Nq + i) * kStats;
          sp[0] = st.m;
          sp[1] = st.linv;
          sp[2] = st.a;
          sp[3] = st.mn;
        }
        if (want_idx) {
          int64_t* ip = idx + (bh * P.Nq + i) * 2;
          ip[0] = j0 + st.imin;
          ip[1] = j0 + st.imax;
        }
      }
      gemm<T>(false, false, nr, P.Dv, n, T(1), S.get(), n, v.at(b, hk, j0), v.sn, T(0), Ob, P.Dv);
      for (int64_t r = 0; r < nr; ++r) {
        T* o = Ob + r * P.Dv;
        const T f = factor[r];
        for (int64_t d = 0; d < P.Dv; ++d) o[d] *= f;
      }
      out.template finish<T>(bh * P.Nq + i0, Obuf.get(), nr);
    }
  });
}

// Where the score gradient of a row goes in the bias gradient: a buffer of the bias's (4-d) shape, size-1 dims
// summed over. `shared`: tasks of different threads write the same entries, so each thread has its own copy.
template <class T>
struct BiasGrad {
  T* base = nullptr;
  int64_t numel = 0, sb = 0, sh = 0, si = 0, nk = 0;
  bool shared = false;
  T* row(int64_t b, int64_t h, int64_t i) const {
    const int64_t tid = shared ? at::get_thread_num() : 0;
    return base + tid * numel + b * sb + h * sh + i * si;
  }
  // keys [j0, j0 + n) of row (b, h, i) get ds[0, n)
  void add(int64_t b, int64_t h, int64_t i, int64_t j0, const T* ds, int64_t n) const {
    T* d = row(b, h, i);
    if (nk == 1) {
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += ds[j];
      d[0] += acc;
    } else {
      for (int64_t j = 0; j < n; ++j) d[j0 + j] += ds[j];
    }
  }
  void add_at(int64_t b, int64_t h, int64_t i, int64_t j, T x) const { row(b, h, i)[nk == 1 ? 0 : j] += x; }
};

// The accumulator of one key/value head's dk (or dv), rows [0, Nk): the output itself (compute type, one chunk), a
// per-thread buffer converted into the output when the task ends (half outputs, one chunk), or the chunk's slice
// of a partial-sum buffer (several chunks, summed afterwards).
template <class T>
struct KVGrad {
  bool on = false;
  int64_t chunks = 1, width = 0, Nk = 0, BH = 0;
  T* partial = nullptr;  // chunks > 1: (chunks, B * Hkv, Nk, width)
  RowsOut out;           // chunks == 1: the (B * Hkv * Nk, width) output
  bool needs_scratch() const { return on && chunks == 1 && !out.direct; }
  T* begin(int64_t chunk, int64_t bk, T* scratch) const {
    if (!on) return nullptr;
    T* acc = chunks > 1 ? partial + (chunk * BH + bk) * Nk * width : out.target<T>(bk * Nk, scratch);
    std::fill(acc, acc + Nk * width, T(0));
    return acc;
  }
  void end(int64_t bk, const T* scratch) const {
    if (on && chunks == 1) out.finish<T>(bk * Nk, scratch, Nk);
  }
};

template <class T>
struct Grads {
  const RowsOut* dq = nullptr;
  KVGrad<T> dk, dv;
  bool dbias = false;
};

// What every backward task reads: the operands (g = the output gradient, o = the output), the forward's per-row
// statistics, and where the gradients go.
template <class T>
struct BackwardArgs {
  const Problem<T>& P;
  Mat<T> q, k, v, g, o;
  const T* stats;
  const int64_t* idx;
  const Grads<T>& out;
  const BiasGrad<T>& db;
  const float* kp = nullptr;  // K and V as panels (panels.h; float32 only), or null: S and dP by BLAS
  const float* vp = nullptr;
};

template <class T>
struct BackwardBuffers {
  std::unique_ptr<T[]> S, dP, W, keep, dQ, dK, dV, delta0, cap;
  std::unique_ptr<RowGrad<T>[]> rows;
};

template <class T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

// S = scale Q_blk K_j^T and dP = dO_blk V_j^T of query rows [i0, i0 + nr) and keys [j0, j0 + nk) (ld nk).
template <class T>
void score_products(const BackwardArgs<T>& A, BackwardBuffers<T>& buf, int64_t b, int64_t h, int64_t i0, int64_t nr,
                    int64_t j0, int64_t nk) {
  const Problem<T>& P = A.P;
  const int64_t hk = h / P.G;
  if constexpr (std::is_same_v<T, float>) {
    if (A.kp != nullptr) {  // the forward's score product, so S is bit for bit the forward's
      static_assert(kKeyBlock % kPanel == 0, "key blocks must start at a panel");
      const int64_t first = (b * P.Hkv + hk) * panel_count(P.Nk) + j0 / kPanel;
      scores_from_panels(nr, nk, P.D, P.scale, A.q.at(b, h, i0), A.q.sn, A.kp + first * P.D * kPanel, buf.S.get(),
                         nk, nullptr);
      scores_from_panels(nr, nk, P.Dv, 1.f, A.g.at(b, h, i0), A.g.sn, A.vp + first * P.Dv * kPanel, buf.dP.get(),
                         nk, nullptr);
      return;
    }
  }
  gemm<T>(false, true, nr, nk, P.D, P.scale, A.q.at(b, h, i0), A.q.sn, A.k.at(b, hk, j0), A.k.sn, T(0), buf.S.get(),
          nk);
  gemm<T>(false, true, nr, nk, P.Dv, T(1), A.g.at(b, h, i0), A.g.sn, A.v.at(b, hk, j0), A.v.sn, T(0), buf.dP.get(),
          nk);
}

// Delta of each row of the block [i0, i0 + nr) into buf.rows: g.o (FlashAttention-2), or, for the plain form where
// the block's scores reach kPlainDeltaBound, from the rows themselves (one more pass of the two score products).
template <class T>
void block_deltas(const BackwardArgs<T>& A, BackwardBuffers<T>& buf, int64_t b, int64_t h, int64_t i0, int64_t nr,
                  int64_t n) {
  const Problem<T>& P = A.P;
  const int64_t bh = b * P.Hq + h;
  T big = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const T* st = A.stats + (bh * P.Nq + i0 + r) * kStats;
    buf.rows[r] = row_grad<T>(P, st, T(0));
    big = std::max(big, std::max(std::abs(st[0]), std::abs(st[3])));
  }
  if (P.normalize || double(big) < kPlainDeltaBound) {
    for (int64_t r = 0; r < nr; ++r) buf.rows[r].delta = dot<T>(A.g.at(b, h, i0 + r), A.o.at(b, h, i0 + r), P.Dv);
    return;
  }
  for (int64_t j0 = P.key_start(i0, kKeyBlock); j0 < n; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, n - j0);
    score_products<T>(A, buf, b, h, i0, nr, j0, nk);
    for (int64_t r = 0; r < nr; ++r) {
      T* s = buf.S.get() + r * nk;
      const bool masked = prepare_row<T>(P, b, h, i0 + r, s, j0, nk);
      if (P.dropout) dropout_row<T>(P, b, h, i0 + r, P.keep_scale, buf.keep.get(), j0, nk);
      buf.rows[r].delta += delta_row<T>(buf.rows[r], s, buf.dP.get() + r * nk, P.dropout ? buf.keep.get() : nullptr,
                                        nk, masked);
    }
  }
}

// The range terms of the block's rows (contract section 2): dL/da = c (Delta - Delta0) at the arg-min key (if a < 0)
// and dL/db = -c Delta at the arg-max key (if b > 0), into dq (rows of the block), dk and dbias.
template <class T>
void range_terms(const BackwardArgs<T>& A, const BackwardBuffers<T>& buf, int64_t b, int64_t h, int64_t i0,
                 int64_t nr, T* dQb, T* dKb) {
  const Problem<T>& P = A.P;
  const int64_t hk = h / P.G, bh = b * P.Hq + h;
  for (int64_t r = 0; r < nr; ++r) {
    const RowGrad<T>& rg = buf.rows[r];
    if (rg.linv == T(0)) continue;
    const int64_t* ip = A.idx + (bh * P.Nq + i0 + r) * 2;
    const T terms[2] = {rg.a < T(0) ? rg.c * (rg.delta - buf.delta0[r]) : T(0),
                        rg.m > T(0) ? -rg.c * rg.delta : T(0)};
    const T* qi = A.q.at(b, h, i0 + r);
    for (int t = 0; t < 2; ++t) {
      if (terms[t] == T(0)) continue;
      const T x = terms[t];
      const T* kj = A.k.at(b, hk, ip[t]);
      T sx = P.scale * x;
      if (P.softcap > T(0)) {  // through the cap at that key: 1 - tanh^2 of its scaled product
        const T tc = std::tanh(P.scale * dot<T>(qi, kj, P.D) / P.softcap);
        sx *= T(1) - tc * tc;
      }
      if (dQb != nullptr)
        for (int64_t d = 0; d < P.D; ++d) dQb[r * P.D + d] += sx * kj[d];
      if (dKb != nullptr)
        for (int64_t d = 0; d < P.D; ++d) dKb[ip[t] * P.D + d] += sx * qi[d];
      if (A.out.dbias) A.db.add_at(b, h, i0 + r, ip[t], x);
    }
  }
}

// One query block of the backward (rows [i0, i1) of query head h), FlashAttention-2 style: Delta per row first,
// then per block of kKeyBlock keys: recompute S and dP, the row math, and the products into dq (rows of the block)
// and into the task's dk, dv accumulators (the block's keys); the range terms last.
template <class T>
void backward_block(const BackwardArgs<T>& A, BackwardBuffers<T>& buf, int64_t b, int64_t h, int64_t blk, T* dKb,
                    T* dVb) {
  const Problem<T>& P = A.P;
  const int64_t hk = h / P.G, bh = b * P.Hq + h;
  const int64_t i0 = blk * P.rows, i1 = std::min(P.Nq, i0 + P.rows), nr = i1 - i0;
  const int64_t n = P.key_end(i1);
  T* S = buf.S.get();
  T* W = buf.W.get();
  block_deltas<T>(A, buf, b, h, i0, nr, n);
  std::fill(buf.delta0.get(), buf.delta0.get() + nr, T(0));
  T* dQb = A.out.dq == nullptr ? nullptr : A.out.dq->template target<T>(bh * P.Nq + i0, buf.dQ.get());
  const int64_t start = P.key_start(i0, kKeyBlock);
  for (int64_t j0 = start; j0 < n; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, n - j0);
    score_products<T>(A, buf, b, h, i0, nr, j0, nk);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = i0 + r;
      T* s = S + r * nk;
      T* cap = P.softcap > T(0) ? buf.cap.get() + r * nk : nullptr;
      const bool masked = prepare_row<T>(P, b, h, i, s, j0, nk, cap);
      if (P.dropout) dropout_row<T>(P, b, h, i, P.keep_scale, buf.keep.get(), j0, nk);
      buf.delta0[r] += backward_row<T>(P, buf.rows[r], s, buf.dP.get() + r * nk, P.dropout ? buf.keep.get() : nullptr,
                                       W + r * nk, nk, masked);
      if (A.out.dbias) A.db.add(b, h, i, j0, s, nk);  // (the bias is added after the cap)
      if (cap != nullptr)
        for (int64_t j = 0; j < nk; ++j) s[j] *= cap[j];
    }
    if (dVb != nullptr)
      gemm<T>(true, false, nk, P.Dv, nr, T(1), W, nk, A.g.at(b, h, i0), A.g.sn, T(1), dVb + j0 * P.Dv, P.Dv);
    if (dQb != nullptr)
      gemm<T>(false, false, nr, P.D, nk, P.scale, S, nk, A.k.at(b, hk, j0), A.k.sn, j0 == start ? T(0) : T(1), dQb,
              P.D);
    if (dKb != nullptr)
      gemm<T>(true, false, nk, P.D, nr, P.scale, S, nk, A.q.at(b, h, i0), A.q.sn, T(1), dKb + j0 * P.D, P.D);
  }
  if (P.range_grad) range_terms<T>(A, buf, b, h, i0, nr, dQb, dKb);
  if (dQb != nullptr) A.out.dq->template finish<T>(bh * P.Nq + i0, buf.dQ.get(), nr);
}

template <class T>
void backward_kernel(const BackwardArgs<T>& A, int64_t chunks) {
  const Problem<T>& P = A.P;
  const int64_t R = P.rows, nblk = (P.Nq + R - 1) / R, KB = std::min(kKeyBlock, std::max<int64_t>(P.Nk, 1));
  const int64_t ntasks = P.B * P.Hkv * chunks;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    BackwardBuffers<T> buf;
    buf.S = buffer<T>(R * KB);
    buf.dP = buffer<T>(R * KB);
    buf.W = buffer<T>(R * KB);
    buf.keep = buffer<T>(P.dropout ? KB : 0);
    buf.dQ = buffer<T>(A.out.dq != nullptr && !A.out.dq->direct ? R * P.D : 0);
    buf.dK = buffer<T>(A.out.dk.needs_scratch() ? P.Nk * P.D : 0);
    buf.dV = buffer<T>(A.out.dv.needs_scratch() ? P.Nk * P.Dv : 0);
    buf.delta0 = buffer<T>(R);
    buf.cap = buffer<T>(P.softcap > T(0) ? R * KB : 0);
    buf.rows = std::unique_ptr<RowGrad<T>[]>(new RowGrad<T>[R]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bk = t / chunks, chunk = t % chunks;
      const int64_t b = bk / P.Hkv, hk = bk % P.Hkv;
      T* dKb = A.out.dk.begin(chunk, bk, buf.dK.get());
      T* dVb = A.out.dv.begin(chunk, bk, buf.dV.get());
      const int64_t s0 = chunk * nblk / chunks, s1 = (chunk + 1) * nblk / chunks;
      for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h)
        for (int64_t slot = s0; slot < s1; ++slot)
          backward_block<T>(A, buf, b, h, zigzag(slot, nblk, P.causal), dKb, dVb);
      A.out.dk.end(bk, buf.dK.get());
      A.out.dv.end(bk, buf.dV.get());
    }
  });
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether a call's score products come from K/V panels (panels.h): the one rule the forward and the backward share.
bool panels_for(at::ScalarType ct, const at::Tensor& q, const at::Tensor& k, int64_t panel_rows) {
  return use_panels(ct, q.size(2) * (q.size(1) / std::max<int64_t>(k.size(1), 1)), k.size(2), panel_rows);
}

void check_operand(const OptTensor& t, at::ScalarType ct, const char* name) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->scalar_type() == ct, "sa_cpu: `", name, "` must be in the compute dtype ", ct);
}

Options options(bool causal, double scale, bool normalize, bool detach_range, double eps, double dropout_p,
                int64_t win_left, int64_t win_right, double softcap, int64_t seed, int64_t rows) {
  Options o;
  o.win_left = win_left;
  o.win_right = win_right;
  o.softcap = softcap;
  o.causal = causal;
  o.scale = scale;
  o.normalize = normalize;
  o.detach_range = detach_range;
  o.eps = eps;
  o.dropout_p = dropout_p;
  o.seed = seed;
  o.rows = rows;
  return o;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& keep,
                  const OptTensor& madd, const OptTensor& bias, const OptTensor& slopes, at::ScalarType ct) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "sa_cpu: q, k, v must be 4-d");
  check_operand(madd, ct, "attn_mask");
  check_operand(bias, ct, "bias");
  check_operand(slopes, ct, "alibi_slopes");
  if (keep.has_value() && keep->defined())
    TORCH_CHECK(keep->scalar_type() == at::kBool, "sa_cpu: the keep mask must be bool");
}

// Returns {out (B, Hq, Nq, Dv) in q's dtype, stats (B, Hq, Nq, 4) [max, 1/sum, a, min] in the compute dtype or empty,
// idx (B, Hq, Nq, 2) int64 [arg-min, arg-max] or empty}. Stats only with need_stats; idx only with need_stats and a
// differentiated range (normalize and not detach_range).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& keep,
                                const OptTensor& madd, const OptTensor& bias, const OptTensor& slopes, bool causal,
                                double scale, bool normalize, bool detach_range, double eps, double dropout_p,
                                int64_t win_left, int64_t win_right, double softcap, int64_t seed, int64_t rows,
                                int64_t panel_rows, bool need_stats) {
  pybind11::gil_scoped_release no_gil;
  const auto ct = compute_type(q);
  check_inputs(q, k, v, keep, madd, bias, slopes, ct);
  // K as float32 panels (converted and transposed in one pass) when enough query rows share each of its heads
  const bool panels = panels_for(ct, q, k, panel_rows);
  const auto ops = compute_operands(panels ? std::vector<at::Tensor>{q, v} : std::vector<at::Tensor>{q, k, v}, ct);
  const at::Tensor& qc = ops[0];
  const at::Tensor& kc = panels ? k : ops[1];
  const at::Tensor& vc = ops.back();
  const at::Tensor kp = panels ? pack_panels({k})[0] : at::Tensor();
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, Hq, Nq, Dv}, q.options());
  const auto copt = q.options().dtype(ct);
  const bool want_idx = need_stats && normalize && !detach_range;
  at::Tensor stats = need_stats ? at::empty({B, Hq, Nq, kStats}, copt) : at::empty({0}, copt);
  at::Tensor idx = want_idx ? at::empty({B, Hq, Nq, 2}, copt.dtype(at::kLong)) : at::empty({0}, copt.dtype(at::kLong));
  const Options o = options(causal, scale, normalize, detach_range, eps, dropout_p, win_left, win_right, softcap, seed,
                            rows);
  AT_DISPATCH_FLOATING_TYPES(ct, "sa_cpu_forward", [&] {
    const auto P = make_problem<scalar_t>(qc, kc, vc, keep, madd, bias, slopes, o);
    forward_kernel<scalar_t>(P, mat<scalar_t>(qc), panels ? Mat<scalar_t>{} : mat<scalar_t>(kc), mat<scalar_t>(vc),
                             rows_out(out, ct), need_stats ? stats.data_ptr<scalar_t>() : nullptr,
                             want_idx ? idx.data_ptr<int64_t>() : nullptr, panels ? kp.data_ptr<float>() : nullptr);
  });
  return {out, stats, idx};
}

template <class T>
BiasGrad<T> bias_grad(const at::Tensor& bt, at::Tensor& dbias, int64_t B, int64_t Hkv, int64_t chunks,
                      int64_t nthreads, const at::TensorOptions& opt) {
  BiasGrad<T> db;
  db.shared = (bt.size(0) == 1 && B > 1) || (bt.size(1) == 1 && Hkv > 1) || (bt.size(2) == 1 && chunks > 1);
  const int64_t copies = db.shared ? nthreads : 1;
  dbias = at::zeros({copies, bt.size(0), bt.size(1), bt.size(2), bt.size(3)}, opt);
  db.base = dbias.data_ptr<T>();
  db.numel = bt.numel();
  db.nk = bt.size(3);
  db.sb = bt.size(0) == 1 ? 0 : bt.size(1) * bt.size(2) * bt.size(3);
  db.sh = bt.size(1) == 1 ? 0 : bt.size(2) * bt.size(3);
  db.si = bt.size(2) == 1 ? 0 : bt.size(3);
  return db;
}

// dk or dv: the output tensor (one chunk) or a partial-sum buffer (several), and its accumulator description.
template <class T>
at::Tensor kv_grad(const at::Tensor& like, bool need, int64_t chunks, at::ScalarType ct, KVGrad<T>& g) {
  if (!need) return at::Tensor();
  const int64_t B = like.size(0), H = like.size(1), N = like.size(2), X = like.size(3);
  g.on = true;
  g.chunks = chunks;
  g.width = X;
  g.Nk = N;
  g.BH = B * H;
  if (chunks == 1) {
    at::Tensor t = at::empty({B, H, N, X}, like.options());
    g.out = rows_out(t, ct);
    return t;
  }
  at::Tensor part = at::empty({chunks, B, H, N, X}, like.options().dtype(ct));
  g.partial = part.data_ptr<T>();
  return part;
}

// Returns {dq, dk, dv, dbias}, each in the dtype of its input (dbias in the bias's 4-d shape), or an empty tensor
// where not requested.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& stats, const at::Tensor& idx,
                                 const OptTensor& keep, const OptTensor& madd, const OptTensor& bias,
                                 const OptTensor& slopes, bool causal, double scale, bool normalize,
                                 bool detach_range, double eps, double dropout_p, int64_t win_left,
                                 int64_t win_right, double softcap, int64_t seed, int64_t rows, int64_t panel_rows,
                                 bool need_dq, bool need_dk, bool need_dv, bool need_dbias) {
  pybind11::gil_scoped_release no_gil;
  const auto ct = compute_type(q);
  check_inputs(q, k, v, keep, madd, bias, slopes, ct);
  TORCH_CHECK(stats.scalar_type() == ct && stats.dim() == 4 && stats.size(3) == kStats,
              "sa_cpu: stats must come from sa_cpu.forward");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2) &&
                  out.size(3) == v.size(3),
              "sa_cpu: `out` must be the forward's output (B, Hq, Nq, Dv)");
  const bool range_grad = normalize && !detach_range;
  TORCH_CHECK(!range_grad || idx.dim() == 4, "sa_cpu: the arg-min/arg-max indices are missing");
  need_dbias = need_dbias && bias.has_value() && bias->defined();
  // the forward's choice (same rule), so the recomputed scores are the forward's
  const bool panels = panels_for(ct, q, k, panel_rows);
  const auto ops = compute_operands(panels ? std::vector<at::Tensor>{q, k, grad_out, out}
                                           : std::vector<at::Tensor>{q, k, v, grad_out, out}, ct);
  const at::Tensor& vc = panels ? v : ops[2];
  const at::Tensor& gc = ops[panels ? 2 : 3];
  const at::Tensor& oc = ops[panels ? 3 : 4];
  const std::vector<at::Tensor> kvp = panels ? pack_panels({k, v}) : std::vector<at::Tensor>{};
  const at::Tensor sc = stats.contiguous(), ic = range_grad ? idx.contiguous() : idx;
  const int64_t B = q.size(0), Hkv = k.size(1);
  const Options o = options(causal, scale, normalize, detach_range, eps, dropout_p, win_left, win_right, softcap, seed,
                            rows);
  const int64_t nthreads = at::get_num_threads();
  const int64_t nblk = (q.size(2) + std::max<int64_t>(rows, 1) - 1) / std::max<int64_t>(rows, 1);
  // fewer (batch, kv-head) tasks than threads: split the query blocks into chunks with their own dk/dv sums
  const int64_t chunks = B * Hkv >= nthreads ? 1 : std::min(nblk, (nthreads + B * Hkv - 1) / (B * Hkv));
  at::Tensor dq = need_dq ? at::empty(q.sizes(), q.options()) : at::Tensor();
  at::Tensor dk, dv, dbias;
  AT_DISPATCH_FLOATING_TYPES(ct, "sa_cpu_backward", [&] {
    const auto P = make_problem<scalar_t>(ops[0], ops[1], vc, keep, madd, bias, slopes, o);
    Grads<scalar_t> grads;
    const RowsOut dq_rows = need_dq ? rows_out(dq, ct) : RowsOut();
    grads.dq = need_dq ? &dq_rows : nullptr;
    dk = kv_grad<scalar_t>(k, need_dk, chunks, ct, grads.dk);
    dv = kv_grad<scalar_t>(v, need_dv, chunks, ct, grads.dv);
    grads.dbias = need_dbias;
    BiasGrad<scalar_t> db;
    if (need_dbias) db = bias_grad<scalar_t>(*bias, dbias, B, Hkv, chunks, nthreads, ops[0].options());
    const BackwardArgs<scalar_t> A{P, mat<scalar_t>(ops[0]), mat<scalar_t>(ops[1]),
                                   panels ? Mat<scalar_t>{} : mat<scalar_t>(vc), mat<scalar_t>(gc), mat<scalar_t>(oc),
                                   sc.data_ptr<scalar_t>(), range_grad ? ic.data_ptr<int64_t>() : nullptr, grads, db,
                                   panels ? kvp[0].data_ptr<float>() : nullptr,
                                   panels ? kvp[1].data_ptr<float>() : nullptr};
    backward_kernel<scalar_t>(A, chunks);
  });
  auto reduce = [&](const at::Tensor& t, at::ScalarType dt) {
    if (!t.defined()) return at::empty({0}, q.options());
    return t.dim() == 5 ? t.sum(0).to(dt) : t;
  };
  return {need_dq ? dq : at::empty({0}, q.options()), reduce(dk, k.scalar_type()), reduce(dv, v.scalar_type()),
          need_dbias ? (dbias.size(0) == 1 ? dbias[0] : dbias.sum(0)).to(bias->scalar_type())
                     : at::empty({0}, q.options())};
}

std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace sa_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SA-Softmax attention for the CPU (sasoftmax.attention.backends.cpp)";
  m.def("forward", &sa_cpu::forward, "SA attention forward");
  m.def("backward", &sa_cpu::backward, "SA attention backward");
  m.def("paged_decode", &sa_cpu::paged_decode, "SA attention of one-token queries over a paged KV cache");
  m.def("paged_store", &sa_cpu::paged_store, "write new key/value rows into a paged KV cache");
  m.def("select_gemm", &sa_cpu::select_gemm, "choose the matrix-product implementation ('blas' or 'aten')");
  m.attr("DEFAULT_PANEL_MIN_ROWS") = sa_cpu::kDefaultPanelMinRows;
  m.def("panels_available", []() { return sa_cpu::kPanelsAvailable; }, "whether this build has the panel path");
  m.def("capability", &sa_cpu::capability, "the vector instruction set the kernel was compiled for");
}

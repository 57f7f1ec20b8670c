// Fused SA-Softmax attention for the CPU: forward and analytic backward (docs/contract.md, docs/cpu_kernel.md).
//
// Forward, per task (batch b, query head h, block of `rows` query rows):
//   S = scale * Q_blk K^T over all keys the block can see (one matrix product into a per-thread buffer);
//   exact row math on whole rows (rows.h: ALiBi, float mask, bias, bool mask, dropout; max, min, exp, sum, weights);
//   O_blk = W V (one matrix product), each row times its factor. Saved per row: max, 1/sum, a, arg-min, arg-max.
// Backward, per task (batch b, key/value head, chunk of query blocks), looping over the group's query heads:
//   S = scale * Q_blk K^T, dP = dO_blk V^T; row math (rows.h) gives dS and the applied weights W;
//   dV += W^T dO_blk, dQ_blk = scale * dS K, dK += scale * dS^T Q_blk, dbias += dS (summed over broadcast dims).
// The dk/dv of one key/value head are written by one task only (chunks of query blocks get their own partial sums
// when there are fewer heads than threads). Everything runs in float32 (float64 for float64 inputs).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <memory>
#include <string>
#include <vector>

#include "gemm.h"
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

struct Options {
  bool causal = false, normalize = true, detach_range = false;
  double scale = 1, eps = 1e-10, dropout_p = 0;
  int64_t seed = 0, rows = 32, threads_hint = 0;
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
  return P;
}

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
void forward_kernel(const Problem<T>& P, const T* q, const T* k, const T* v, T* out, T* stats, int64_t* idx) {
  const int64_t R = P.rows, nblk = (P.Nq + R - 1) / R;
  const int64_t ntasks = P.B * P.Hq * nblk;
  const bool want_idx = idx != nullptr;
  const int64_t grain = grain_for(R * P.Nk * (P.D + P.Dv));
  at::parallel_for(0, ntasks, grain, [&](int64_t t0, int64_t t1) {
    auto S = buffer<T>(R * P.Nk);
    auto keep01 = buffer<T>(P.dropout ? P.Nk : 0);
    auto factor = buffer<T>(R);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nblk, blk = zigzag(t % nblk, nblk, P.causal);
      const int64_t b = bh / P.Hq, h = bh % P.Hq, hk = h / P.G;
      const int64_t i0 = blk * R, i1 = std::min(P.Nq, i0 + R), nr = i1 - i0;
      const int64_t n = P.key_end(i1);
      const T* Qb = q + (bh * P.Nq + i0) * P.D;
      const T* Kb = k + (b * P.Hkv + hk) * P.Nk * P.D;
      const T* Vb = v + (b * P.Hkv + hk) * P.Nk * P.Dv;
      T* Ob = out + (bh * P.Nq + i0) * P.Dv;
      gemm<T>(false, true, nr, n, P.D, P.scale, Qb, P.D, Kb, P.D, T(0), S.get(), n);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        T* s = S.get() + r * n;
        const bool masked = prepare_row<T>(P, b, h, i, s, n);
        if (P.dropout) dropout_row<T>(P, b, h, i, T(1), keep01.get(), n);
        const RowStats<T> st = forward_row<T>(P, s, n, masked, want_idx, P.dropout ? keep01.get() : nullptr);
        factor[r] = st.factor;
        if (stats != nullptr) {
          T* sp = stats + (bh * P.Nq + i) * 3;
          sp[0] = st.m;
          sp[1] = st.linv;
          sp[2] = st.a;
        }
        if (want_idx) {
          int64_t* ip = idx + (bh * P.Nq + i) * 2;
          ip[0] = st.imin;
          ip[1] = st.imax;
        }
      }
      gemm<T>(false, false, nr, P.Dv, n, T(1), S.get(), n, Vb, P.Dv, T(0), Ob, P.Dv);
      for (int64_t r = 0; r < nr; ++r) {
        T* o = Ob + r * P.Dv;
        const T f = factor[r];
        for (int64_t d = 0; d < P.Dv; ++d) o[d] *= f;
      }
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
  void add(int64_t b, int64_t h, int64_t i, const T* ds, int64_t n) const {
    T* d = row(b, h, i);
    if (nk == 1) {
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += ds[j];
      d[0] += acc;
    } else {
      for (int64_t j = 0; j < n; ++j) d[j] += ds[j];
    }
  }
};

struct Grads {
  bool dq = true, dk = true, dv = true, dbias = false;
};

template <class T>
void backward_kernel(const Problem<T>& P, const T* q, const T* k, const T* v, const T* g, const T* stats,
                     const int64_t* idx, T* dq, T* dk, T* dv, int64_t chunks, const BiasGrad<T>& db,
                     const Grads& want) {
  const int64_t R = P.rows, nblk = (P.Nq + R - 1) / R;
  const int64_t ntasks = P.B * P.Hkv * chunks;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    auto S = buffer<T>(R * P.Nk), dP = buffer<T>(R * P.Nk), Wb = buffer<T>(R * P.Nk);
    auto keep = buffer<T>(P.dropout ? P.Nk : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bk = t / chunks, chunk = t % chunks;
      const int64_t b = bk / P.Hkv, hk = bk % P.Hkv;
      const T* Kb = k + bk * P.Nk * P.D;
      const T* Vb = v + bk * P.Nk * P.Dv;
      T* dKb = dk == nullptr ? nullptr : dk + (chunk * P.B * P.Hkv + bk) * P.Nk * P.D;
      T* dVb = dv == nullptr ? nullptr : dv + (chunk * P.B * P.Hkv + bk) * P.Nk * P.Dv;
      const int64_t s0 = chunk * nblk / chunks, s1 = (chunk + 1) * nblk / chunks;
      for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h) {
        const int64_t bh = b * P.Hq + h;
        for (int64_t slot = s0; slot < s1; ++slot) {
          const int64_t blk = zigzag(slot, nblk, P.causal);
          const int64_t i0 = blk * R, i1 = std::min(P.Nq, i0 + R), nr = i1 - i0;
          const int64_t n = P.key_end(i1);
          const T* Qb = q + (bh * P.Nq + i0) * P.D;
          const T* Gb = g + (bh * P.Nq + i0) * P.Dv;
          gemm<T>(false, true, nr, n, P.D, P.scale, Qb, P.D, Kb, P.D, T(0), S.get(), n);
          gemm<T>(false, true, nr, n, P.Dv, T(1), Gb, P.Dv, Vb, P.Dv, T(0), dP.get(), n);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = i0 + r;
            T* s = S.get() + r * n;
            const bool masked = prepare_row<T>(P, b, h, i, s, n);
            if (P.dropout) dropout_row<T>(P, b, h, i, P.keep_scale, keep.get(), n);
            const int64_t* ip = idx == nullptr ? nullptr : idx + (bh * P.Nq + i) * 2;
            backward_row<T>(P, stats + (bh * P.Nq + i) * 3, ip, s, dP.get() + r * n, Wb.get() + r * n, n, masked,
                            P.dropout ? keep.get() : nullptr);
            if (want.dbias) db.add(b, h, i, s, n);
          }
          if (dVb != nullptr) gemm<T>(true, false, n, P.Dv, nr, T(1), Wb.get(), n, Gb, P.Dv, T(1), dVb, P.Dv);
          if (dq != nullptr)
            gemm<T>(false, false, nr, P.D, n, P.scale, S.get(), n, Kb, P.D, T(0), dq + (bh * P.Nq + i0) * P.D, P.D);
          if (dKb != nullptr) gemm<T>(true, false, n, P.D, nr, P.scale, S.get(), n, Qb, P.D, T(1), dKb, P.D);
        }
      }
    }
  });
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_operand(const OptTensor& t, at::ScalarType ct, const char* name) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->scalar_type() == ct, "sa_cpu: `", name, "` must be in the compute dtype ", ct);
}

Options options(bool causal, double scale, bool normalize, bool detach_range, double eps, double dropout_p,
                int64_t seed, int64_t rows) {
  Options o;
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

// Returns {out (B, Hq, Nq, Dv) in q's dtype, stats (B, Hq, Nq, 3) [max, 1/sum, a] in the compute dtype or empty,
// idx (B, Hq, Nq, 2) int64 [arg-min, arg-max] or empty}. Stats only with need_stats; idx only with need_stats and a
// differentiated range (normalize and not detach_range).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& keep,
                                const OptTensor& madd, const OptTensor& bias, const OptTensor& slopes, bool causal,
                                double scale, bool normalize, bool detach_range, double eps, double dropout_p,
                                int64_t seed, int64_t rows, bool need_stats) {
  pybind11::gil_scoped_release no_gil;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "sa_cpu: q, k, v must be 4-d");
  const auto ct = compute_type(q);
  check_operand(madd, ct, "attn_mask");
  check_operand(bias, ct, "bias");
  check_operand(slopes, ct, "alibi_slopes");
  if (keep.has_value() && keep->defined())
    TORCH_CHECK(keep->scalar_type() == at::kBool, "sa_cpu: the keep mask must be bool");
  const at::Tensor qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, Hq, Nq, Dv}, qc.options());
  const bool want_idx = need_stats && normalize && !detach_range;
  at::Tensor stats = need_stats ? at::empty({B, Hq, Nq, 3}, qc.options()) : at::empty({0}, qc.options());
  at::Tensor idx = want_idx ? at::empty({B, Hq, Nq, 2}, qc.options().dtype(at::kLong))
                            : at::empty({0}, qc.options().dtype(at::kLong));
  const Options o = options(causal, scale, normalize, detach_range, eps, dropout_p, seed, rows);
  AT_DISPATCH_FLOATING_TYPES(ct, "sa_cpu_forward", [&] {
    const auto P = make_problem<scalar_t>(qc, kc, vc, keep, madd, bias, slopes, o);
    forward_kernel<scalar_t>(P, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), need_stats ? stats.data_ptr<scalar_t>() : nullptr,
                             want_idx ? idx.data_ptr<int64_t>() : nullptr);
  });
  return {out.to(q.scalar_type()), stats, idx};
}

// Returns {dq, dk, dv, dbias}, each in the dtype of its input (dbias in the bias's 4-d shape), or an empty tensor
// where not requested.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& stats, const at::Tensor& idx,
                                 const OptTensor& keep, const OptTensor& madd, const OptTensor& bias,
                                 const OptTensor& slopes, bool causal, double scale, bool normalize,
                                 bool detach_range, double eps, double dropout_p, int64_t seed, int64_t rows,
                                 bool need_dq, bool need_dk, bool need_dv, bool need_dbias) {
  pybind11::gil_scoped_release no_gil;
  const auto ct = compute_type(q);
  TORCH_CHECK(stats.scalar_type() == ct && stats.dim() == 4, "sa_cpu: stats must come from sa_cpu.forward");
  const bool range_grad = normalize && !detach_range;
  TORCH_CHECK(!range_grad || idx.dim() == 4, "sa_cpu: the arg-min/arg-max indices are missing");
  check_operand(madd, ct, "attn_mask");
  check_operand(bias, ct, "bias");
  check_operand(slopes, ct, "alibi_slopes");
  need_dbias = need_dbias && bias.has_value() && bias->defined();
  const at::Tensor qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  const at::Tensor gc = grad_out.to(ct).contiguous(), sc = stats.contiguous();
  const at::Tensor ic = range_grad ? idx.contiguous() : idx;
  const int64_t B = q.size(0), Hkv = k.size(1), Nk = k.size(2), D = q.size(3), Dv = v.size(3);
  const Options o = options(causal, scale, normalize, detach_range, eps, dropout_p, seed, rows);
  const int64_t nthreads = at::get_num_threads();
  const int64_t nblk = (q.size(2) + std::max<int64_t>(rows, 1) - 1) / std::max<int64_t>(rows, 1);
  // fewer (batch, kv-head) tasks than threads: split the query blocks into chunks with their own dk/dv sums
  const int64_t chunks = B * Hkv >= nthreads ? 1 : std::min(nblk, (nthreads + B * Hkv - 1) / (B * Hkv));
  at::Tensor dq = need_dq ? at::empty_like(qc) : at::Tensor();
  at::Tensor dk = need_dk ? at::zeros({chunks, B, Hkv, Nk, D}, qc.options()) : at::Tensor();
  at::Tensor dv = need_dv ? at::zeros({chunks, B, Hkv, Nk, Dv}, qc.options()) : at::Tensor();
  at::Tensor dbias;
  AT_DISPATCH_FLOATING_TYPES(ct, "sa_cpu_backward", [&] {
    const auto P = make_problem<scalar_t>(qc, kc, vc, keep, madd, bias, slopes, o);
    BiasGrad<scalar_t> db;
    if (need_dbias) {
      const auto& bt = *bias;
      db.shared = (bt.size(0) == 1 && B > 1) || (bt.size(1) == 1 && Hkv > 1) || (bt.size(2) == 1 && chunks > 1);
      const int64_t copies = db.shared ? nthreads : 1;
      dbias = at::zeros({copies, bt.size(0), bt.size(1), bt.size(2), bt.size(3)}, qc.options());
      db.base = dbias.data_ptr<scalar_t>();
      db.numel = bt.numel();
      db.nk = bt.size(3);
      db.sb = bt.size(0) == 1 ? 0 : bt.size(1) * bt.size(2) * bt.size(3);
      db.sh = bt.size(1) == 1 ? 0 : bt.size(2) * bt.size(3);
      db.si = bt.size(2) == 1 ? 0 : bt.size(3);
    }
    Grads want;
    want.dq = need_dq;
    want.dk = need_dk;
    want.dv = need_dv;
    want.dbias = need_dbias;
    backward_kernel<scalar_t>(P, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                              gc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                              range_grad ? ic.data_ptr<int64_t>() : nullptr,
                              need_dq ? dq.data_ptr<scalar_t>() : nullptr, need_dk ? dk.data_ptr<scalar_t>() : nullptr,
                              need_dv ? dv.data_ptr<scalar_t>() : nullptr, chunks, db, want);
  });
  auto finish = [](const at::Tensor& t, at::ScalarType dt) {
    if (!t.defined()) return at::empty({0}, at::TensorOptions().dtype(dt));
    return (t.size(0) == 1 ? t[0] : t.sum(0)).to(dt);
  };
  return {need_dq ? dq.to(q.scalar_type()) : at::empty({0}, q.options()), finish(dk, k.scalar_type()),
          finish(dv, v.scalar_type()), need_dbias ? finish(dbias, bias->scalar_type()) : at::empty({0}, q.options())};
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
  m.doc() = "Fused SA-Softmax attention for the CPU (sasoftmax.attention.cpp_backend)";
  m.def("forward", &sa_cpu::forward, "SA attention forward");
  m.def("backward", &sa_cpu::backward, "SA attention backward");
  m.def("select_gemm", &sa_cpu::select_gemm, "choose the matrix-product implementation ('blas' or 'aten')");
  m.def("capability", &sa_cpu::capability, "the vector instruction set the kernel was compiled for");
}

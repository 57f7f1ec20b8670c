"""The fused CPU kernel (``backend="cpp"``): what the shared runner matrix of ``helpers.py`` does not cover.

The matrix (tests/core/test_attention.py, test_edge_cases.py, test_properties.py, ...) already runs every case on
``cpp`` with its default block and with 1 and 3 query rows per block. Here: gradcheck, the accuracy rule in half
precision and at |s| up to 1e4, multi-block problems with every feature at once, dropout against the reference,
thread safety, the BLAS/ATen matrix-product paths, backend selection and the fallbacks, saved-tensor memory.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from support.accuracy import check_backends_against_oracle
from support.helpers import VARIANTS, grads_of, qkv
from support.reference64 import oracle_attention

from sasoftmax import sa_attention
from sasoftmax.attention import backends, prepare
from sasoftmax.attention.backends import cpp as cpp_backend
from sasoftmax.attention.backends.cpp import build as cpp_build
from sasoftmax.attention.op import FwdArgs

_DISABLED = os.environ.get("SASOFTMAX_CPP", "").strip() in ("0", "false", "no", "off")
pytestmark = pytest.mark.skipif(_DISABLED, reason="kernel disabled (SASOFTMAX_CPP=0)")


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def test_kernel_is_built_and_auto_picks_it(monkeypatch):
    """On a machine with a compiler (CI's) the kernel must be available, and ``auto`` must really run it on CPU
    tensors (not fall back silently)."""
    assert cpp_backend.load_error() is None, cpp_backend.load_error()
    assert cpp_backend.gemm_in_use() is not None
    calls = []
    real = cpp_backend.run
    monkeypatch.setattr(cpp_backend, "run", lambda inp: calls.append(inp.q.dtype) or real(inp))
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        q, k, v = qkv(1, 2, 1, 5, 7, 4, 3, dtype=dt, grad=False)
        sa_attention(q, k, v, is_causal=True, alibi_slopes=torch.tensor([0.5, 0.25]), dropout_p=0.1)
    assert calls == [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("normalize,detach_range", [(False, False), (True, False)], ids=["plain", "normalized"])
def test_gradcheck_float64(normalize, detach_range):
    """Every gradient (q, k, v, bias) by finite differences, with a bool mask, causal, ALiBi, GQA, dropout and a
    bias broadcast over the batch, over three query blocks. (The detached form's gradient is by definition not the
    derivative of its output; the oracle comparisons of the runner matrix cover it.)"""
    q, k, v = qkv(2, 4, 2, 7, 9, 3, 4, seed=1)
    bias = _randn(1, 4, 7, 9, seed=2, grad=True)
    keep = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(3)) > 0.25
    slopes = torch.tensor([0.3, 0.1, 0.05, 0.02])

    def fn(q, k, v, bias):
        inp = prepare(q, k, v, keep, is_causal=True, bias=bias, alibi_slopes=slopes, normalize=normalize,
                      detach_range=detach_range, dropout_p=0.2, generator=torch.Generator().manual_seed(4))
        return cpp_backend.run(inp, block_size=3)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-6, rtol=1e-5)


def _case(case: str, dtype: torch.dtype):
    """(leaves, positional args, keyword args) of a multi-block problem in ``dtype``."""
    B, Hq, Hkv, Nq, Nk, D, Dv = 2, 4, 2, 80, 80, 16, 8
    if case == "masked_bias":
        Hkv, Nq = Hq, 70
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype, seed=5)
    leaves, args, kw = [q, k, v], (), {}
    if case == "causal_gqa_alibi":
        kw = {"is_causal": True, "alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}
    else:
        keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(6)) > 0.2
        keep[0, 0, 3] = False  # a fully masked row
        bias = (_randn(1, Hq, Nq, Nk, seed=7) * 2).to(dtype).requires_grad_()
        args, kw = (keep,), {"bias": bias}
        leaves.append(bias)
    return leaves, args, kw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", ["causal_gqa_alibi", "masked_bias"])
def test_half_precision_accuracy_rule(dtype, case, normalize, detach_range):
    """Half inputs (float32 row math inside): against the float64 oracle of the same rounded inputs, the kernel's
    error is at most 2x the reference backend's in that dtype plus a rounding floor, for output and gradients."""
    leaves, args, kw = _case(case, dtype)
    kw = dict(kw, normalize=normalize, detach_range=detach_range)
    g = _randn(*leaves[0].shape[:3], leaves[2].shape[-1], seed=8)
    check_backends_against_oracle(leaves, args, kw, g, ["cpp"], 1e-3 * (8 if dtype == torch.bfloat16 else 1),
                                  min_scale=0.0)


@pytest.mark.parametrize("magnitude", [8.0, 30.0, 1e4])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("b,nq,nk", [(2, 40, 40), (1, 70, 600)], ids=["one_key_block", "many_key_blocks"])
def test_large_scores_float32_accuracy_rule(normalize, magnitude, b, nq, nk):
    """float32 with scores up to ~1e4 (through the bias): finite, and the kernel's error against the float64
    oracle is at most 2x the reference backend's plus a few float32 ulps of the problem's scale. Over one and
    several of the backward's key blocks; in the plain form, scores ~8 take Delta = g.o and larger ones take Delta
    from the rows (at 1e4 g.o would fail this rule)."""
    q, k, v = qkv(b, 2, 2, nq, nk, 8, 4, dtype=torch.float32, seed=9)
    bias = (_randn(b, nq, nk, seed=10) * magnitude).float().requires_grad_()
    kw = dict(bias=bias, normalize=normalize, is_causal=True)
    g = _randn(b, 2, nq, 4, seed=11)
    check_backends_against_oracle([q, k, v, bias], (), kw, g, ["cpp"], 1e-6)


def _many_key_blocks(dropout_p: float):
    """(leaves, args, kwargs) of a problem over several of the backward's key blocks (600 keys: 256 + 256 + 88) with
    every feature: causal aligned bottom-right (Nq < Nk), GQA, a bool mask broadcast over heads with a fully masked
    row and a masked stretch across a block boundary, a bias with gradient, ALiBi, and dropout if dropout_p > 0."""
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 190, 600
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, 8, 6, seed=30)
    keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(31)) > 0.1
    keep[0, 0, 5] = False
    keep[1, 0, :, 240:300] = False
    bias = _randn(1, Hq, Nq, Nk, seed=32, grad=True)
    kw = dict(is_causal=True, bias=bias, alibi_slopes=torch.tensor([0.02, 0.01, 0.005, 0.0025]), dropout_p=dropout_p)
    return [q, k, v, bias], (keep,), kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_many_key_blocks_match_the_oracle(normalize, detach_range, dtype):
    """Several key blocks per query block in the backward (Delta = g.o, Delta0 and the range terms gathered over
    the blocks, arg-min / arg-max keys in any block) with every feature: values and every gradient against the
    float64 oracle, with the default query blocks and with 7 rows per block. In float32 (190 query rows per key/value
    head) the score products come from K/V panels."""
    leaves, args, kw = _many_key_blocks(0.0)
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    q, k, v, bias = leaves
    kw = dict(kw, bias=bias, normalize=normalize, detach_range=detach_range)
    ref, _ = oracle_attention(q, k, v, *args, **kw)
    g = _randn(*ref.shape, seed=33)
    ref_grads = grads_of(ref, leaves, g)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    gtol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else tol
    for block in (None, 7):
        out = cpp_backend.run(prepare(q, k, v, *args, **kw), block_size=block)
        torch.testing.assert_close(out.double(), ref.double(), **tol)
        for name, a, b in zip("q k v bias".split(), grads_of(out, leaves, g), ref_grads, strict=True):
            torch.testing.assert_close(a.double(), b.double(), **gtol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_many_key_blocks_dropout_matches_reference(normalize, detach_range):
    """The same problem with dropout: the kernel regenerates the reference's mask block by block."""
    leaves, args, kw = _many_key_blocks(0.2)
    q, k, v, bias = leaves
    kw = dict(kw, normalize=normalize, detach_range=detach_range)
    g = _randn(2, 4, 190, 6, seed=34)
    ref = sa_attention(q, k, v, *args, generator=torch.Generator().manual_seed(6), backend="reference", **kw)
    out = cpp_backend.run(prepare(q, k, v, *args, generator=torch.Generator().manual_seed(6), **kw))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads_of(out, leaves, g), grads_of(ref, leaves, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_huge_scores_half(dtype):
    """Fully masked rows next to scores of ~1e4: zero output and zero gradient, nothing NaN."""
    q, k, v = qkv(1, 2, 2, 9, 6, 4, 4, dtype=dtype, seed=12)
    bias = (_randn(2, 9, 6, seed=13) * 1e4).to(dtype).requires_grad_()
    keep = torch.ones(9, 6, dtype=torch.bool)
    keep[2] = False
    out = sa_attention(q, k, v, keep, bias=bias, backend="cpp")
    gq, gk, gv, gb = grads_of(out, [q, k, v, bias], torch.ones_like(out, dtype=torch.float64))
    assert torch.isfinite(out).all() and (out[:, :, 2] == 0).all()
    assert all(torch.isfinite(t).all() for t in (gq, gk, gv, gb))
    assert (gq[:, :, 2] == 0).all() and (gb[:, 2] == 0).all()


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_dropout_matches_reference_multi_block(normalize, detach_range):
    """The counter-based dropout mask: with one generator seed the kernel drops exactly what the reference drops
    (GQA, causal with Nq < Nk, a per-batch bias, several query blocks), in the forward and in every gradient."""
    q, k, v = qkv(2, 4, 2, 50, 70, 8, 6, seed=14)
    bias = _randn(2, 1, 50, 70, seed=15, grad=True)
    leaves = [q, k, v, bias]
    kw = dict(is_causal=True, bias=bias, normalize=normalize, detach_range=detach_range, dropout_p=0.3)
    g = _randn(2, 4, 50, 6, seed=16)
    ref = sa_attention(q, k, v, generator=torch.Generator().manual_seed(5), backend="reference", **kw)
    ref_grads = grads_of(ref, leaves, g)
    for block in (None, 7):
        inp = prepare(q, k, v, generator=torch.Generator().manual_seed(5), **kw)
        out = cpp_backend.run(inp, block_size=block)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        for a, b in zip(grads_of(out, leaves, g), ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 33), (33, 1), (5, 200)])
def test_decode_shapes_and_single_keys(nq, nk):
    """N = 1 and Nq != Nk (decoding against a cache, bottom-right causal), with ALiBi and GQA."""
    q, k, v = qkv(2, 4, 1, nq, nk, 8, 8, seed=17)
    kw = dict(is_causal=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    g = _randn(2, 4, nq, 8, seed=18)
    out = sa_attention(q, k, v, backend="cpp", **kw)
    ref = sa_attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads_of(out, [q, k, v], g), grads_of(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_broadcast_operands_of_another_dtype_stay_broadcast():
    """A bfloat16 bias and a float16 float mask on float32 inputs, both expanded (stride 0) to N x N: converted to
    float32 without materializing the broadcast dims, and giving the reference's result and bias gradient."""
    q, k, v = qkv(2, 2, 2, 30, 30, 8, 8, dtype=torch.float32, seed=19)
    bias_row = _randn(2, 1, 30, seed=20).to(torch.bfloat16).requires_grad_()
    bias = bias_row.expand(2, 30, 30)
    mask_row = torch.zeros(1, 1, 1, 30, dtype=torch.float16)
    mask_row[..., 3] = float("-inf")
    mask_row[..., 4] = 0.5
    mask = mask_row.expand(2, 1, 30, 30)
    inp = prepare(q, k, v, mask, bias=bias)
    madd, b32, _ = cpp_backend.compute_operands(q, inp.mask_add, inp.bias, None)
    assert b32.dtype == torch.float32 and b32.stride(-2) == 0 and madd.dtype == torch.float32
    g = _randn(2, 2, 30, 8, seed=21)
    got = sa_attention(q, k, v, mask, bias=bias, backend="cpp")
    gb = grads_of(got, [bias_row], g)[0]
    want = sa_attention(q, k, v, mask, bias=bias, backend="reference")
    wb = grads_of(want, [bias_row], g)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(gb.float(), wb.float(), atol=2e-2, rtol=2e-2)


def _fwd_bwd(q, k, v, bias, mask):
    out = sa_attention(q, k, v, mask, bias=bias, is_causal=True, dropout_p=0.1,
                       generator=torch.Generator().manual_seed(int(q.detach()[0, 0, 0, 0].abs() * 1000)),
                       backend="cpp")
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out.detach(), *torch.autograd.grad((out * w).sum(), (q, k, v, bias))]


def test_python_threads_calling_at_once_match_one_thread():
    """Four Python threads running forward+backward at the same time (the kernel releases the GIL; each call has
    its own buffers) give what the same calls give one after another."""
    problems = []
    for s in range(4):
        q, k, v = qkv(2, 4, 2, 64, 64, 16, 16, dtype=torch.float32, seed=30 + s)
        bias = _randn(1, 4, 64, 64, seed=40 + s, dtype=torch.float32, grad=True)  # shared over the batch
        mask = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(50 + s)) > 0.1
        problems.append((q, k, v, bias, mask))
    want = [_fwd_bwd(*p) for p in problems]
    got: list = [None] * 4
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            got[i] = _fwd_bwd(*problems[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a_list, b_list in zip(got, want, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_aten_and_blas_matrix_products_agree():
    """The kernel's two matrix-product paths (BLAS symbols, at::mm on views) give the same result."""
    ext = cpp_backend.extension()
    q, k, v = qkv(2, 4, 2, 40, 50, 8, 8, seed=22)
    bias = _randn(2, 4, 40, 50, seed=23, grad=True)
    g = _randn(2, 4, 40, 8, seed=24)
    results = {}
    try:
        for impl in ("aten", "blas"):
            assert ext.select_gemm(impl).startswith(impl) or impl == "blas"
            out = sa_attention(q, k, v, bias=bias, is_causal=True, backend="cpp")
            results[impl] = [out, *grads_of(out, [q, k, v, bias], g)]
    finally:
        ext.select_gemm(os.environ.get("SASOFTMAX_CPU_GEMM", "blas") or "blas")
    for a, b in zip(results["aten"], results["blas"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_unsupported_calls_go_to_chunked_with_a_logged_reason(monkeypatch, caplog):
    """What the kernel cannot run goes to the chunked backend under ``auto`` (reason in the debug log) and raises
    under ``backend="cpp"``."""
    monkeypatch.setattr(cpp_backend, "MAX_DIM", 8)  # pretend 5 keys exceed the kernel's limits
    q, k, v = qkv(1, 2, 2, 5, 5, 3, 3, seed=25, grad=False)
    with caplog.at_level(logging.DEBUG, logger="sasoftmax.attention"):
        out = sa_attention(q, k, v, is_causal=True)
    assert any("cpp cannot run this call" in r.getMessage() and "too large" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, sa_attention(q, k, v, is_causal=True, backend="chunked"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="backend='cpp' cannot run this call"):
        sa_attention(q, k, v, backend="cpp")


def test_unavailable_kernel_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(cpp_build, "_STATE", {"done": True, "ext": None, "error": "no C++ compiler (test)"})
    monkeypatch.setattr(backends, "_WARNED", set())
    q, k, v = qkv(1, 2, 2, 4, 4, 3, 3, seed=26, grad=False)
    with caplog.at_level(logging.WARNING, logger="sasoftmax.attention"):
        a = sa_attention(q, k, v)
        sa_attention(q, k, v)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler (test)" in warnings[0].getMessage()
    torch.testing.assert_close(a, sa_attention(q, k, v, backend="chunked"), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="backend='cpp' is unavailable: no C.. compiler"):
        sa_attention(q, k, v, backend="cpp")


def test_machine_without_compiler_gets_one_warning_line(tmp_path):
    """A fresh process with no build and no compiler: one warning line on stderr, results from the chunked
    backend, exit status 0."""
    code = ("import torch; from sasoftmax import sa_attention\n"
            "q = torch.randn(1, 2, 4, 3)\n"
            "print(sa_attention(q, q, q).shape)\n")
    env = dict(os.environ, SASOFTMAX_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch.Size([1, 2, 4, 3])"
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "chunked" in lines[0], res.stderr


def test_backward_saves_no_score_sized_tensor():
    """Activation memory is O(N * D): no tensor the size of the score matrix is kept for the backward."""
    n = 96
    q, k, v = qkv(1, 2, 2, n, n, 8, 8, seed=27)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sa_attention(q, k, v, is_causal=True, dropout_p=0.1, backend="cpp")
    assert sizes and max(sizes) < n * n
    out.sum().backward()


@pytest.mark.parametrize("backend", ["cpp", "chunked"])
def test_custom_ops_pass_opcheck(backend):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration and AOT dispatch of both ops."""
    q, k, v = qkv(1, 4, 2, 6, 7, 4, 3, dtype=torch.float32, seed=28)
    bias = _randn(1, 4, 6, 7, seed=29, dtype=torch.float32, grad=True)
    keep = torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(30)) > 0.2
    seed = torch.tensor([123456789], dtype=torch.int64)
    args = FwdArgs(q=q, k=k, v=v, keep=keep, mask_add=None, bias=bias, slopes=torch.tensor([[0.5, 0.2, 0.1, 0.05]]),
                   seed=seed, is_causal=True, scale=0.5, normalize=True, detach_range=False, eps=1e-10, dropout_p=0.2,
                   window_left=-1, window_right=-1, softcap=0.0, block_rows=0, panel_rows=0, need_stats=True)
    if backend == "chunked":  # (the fused kernel does not take windows and soft-capping yet)
        args = args._replace(window_left=3, window_right=1, softcap=1.5)
    torch.library.opcheck(getattr(torch.ops.sasoftmax, f"{backend}_fwd").default, tuple(args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_few_heads_on_several_threads(dtype):
    """Fewer (batch, key/value head) pairs than threads: the backward splits the query blocks into chunks with their
    own dk/dv sums and per-thread copies of a bias shared by them; it must give the one-thread result."""
    q, k, v = qkv(1, 2, 1, 40, 40, 8, 8, dtype=dtype, seed=31)
    bias = _randn(1, 1, 1, 40, seed=32, dtype=dtype, grad=True)  # one row shared by every query and head
    g = _randn(1, 2, 40, 8, seed=33)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            inp = prepare(q, k, v, bias=bias, is_causal=True)
            out = cpp_backend.run(inp, block_size=8)
            results.append([out, *grads_of(out, [q, k, v, bias], g)])
    finally:
        torch.set_num_threads(before)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-2, rtol=1e-2)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_overlapping_and_broadcast_qkv_views():
    """q, k, v views with stride 0 (one key row expanded along the sequence, heads expanded), a single query row
    with an odd stride, and a transposed layout: the kernel copies what BLAS cannot read in place and gives what
    contiguous copies give."""
    g = torch.Generator().manual_seed(34)
    q = torch.randn(2, 4, 8, 1, generator=g, dtype=torch.float64).transpose(-1, -2)  # (2, 4, 1, 8), row stride 1
    k_one = torch.randn(2, 2, 1, 8, generator=g, dtype=torch.float64).expand(2, 2, 9, 8)  # stride 0 along N
    v_heads = torch.randn(2, 1, 9, 8, generator=g, dtype=torch.float64).expand(2, 2, 9, 8)  # stride 0 along heads
    assert q.stride(2) == 1 and k_one.stride(2) == 0 and v_heads.stride(1) == 0
    for qq, kk, vv in ((q, k_one, v_heads), (q.expand(2, 4, 3, 8), v_heads, k_one)):
        got = sa_attention(qq, kk, vv, backend="cpp")
        want = sa_attention(qq.contiguous(), kk.contiguous(), vv.contiguous(), backend="reference")
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# (B, Hq, Hkv, Nq, Nk, D, Dv): single keys and rows, partial last panels (kPanel is 16 with AVX2, 32 with AVX512),
# GQA, head dims that fill no vector, and several of the backward's 256-key blocks
_PANEL_SHAPES = [(1, 2, 1, 5, 1, 3, 2), (1, 1, 1, 1, 50, 80, 48), (2, 4, 2, 33, 17, 7, 5), (1, 2, 1, 31, 33, 16, 8),
                 (1, 2, 2, 40, 600, 64, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", _PANEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("features", ["none", "all"])
def test_panel_and_blas_score_products_agree(shape, features, dtype):
    """The two ways the kernel forms S = Q K^T and dP = dO V^T (K/V packed into panels once per call, or BLAS on
    each block) give the same output and gradients, on shapes with partial panels and several key blocks, with and
    without causal/mask/bias/ALiBi, in a transposed (B, N, H, D) layout."""
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    g = torch.Generator().manual_seed(40)
    q = torch.randn(B, Nq, Hq, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Nk, Hkv, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(B, Hkv, Nk, Dv, generator=g).to(dtype).requires_grad_()
    leaves, args, kw = [q, k, v], (), {}
    if features == "all":
        bias = torch.randn(1, Hq, Nq, Nk, generator=g).to(dtype).requires_grad_()
        keep = torch.rand(B, 1, Nq, Nk, generator=g) > 0.2
        leaves, args = [q, k, v, bias], (keep,)
        kw = dict(bias=bias, is_causal=True, alibi_slopes=torch.linspace(0.5, 0.01, Hq))
    go = torch.randn(B, Hq, Nq, Dv, generator=g)
    results = {}
    for name, rows in (("panels", 1), ("blas", 2**62)):
        for normalize in (True, False):
            out = cpp_backend.run(prepare(q, k, v, *args, normalize=normalize, **kw), panel_rows=rows)
            results[name, normalize] = [out, *grads_of(out, leaves, go)]
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for normalize in (True, False):
        for a, b in zip(results["panels", normalize], results["blas", normalize], strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_panels_are_the_default_path_on_vector_builds():
    """On an AVX2/AVX512 build (CI's) the panel score products are compiled in and on by default; the environment
    switch turns them off in a fresh process."""
    ext = cpp_backend.extension()
    if ext.capability() == "DEFAULT":
        pytest.skip("a build without AVX2/AVX512 has no panel code")
    assert ext.panels_available()
    assert cpp_backend.score_products_in_use().startswith("panels"), cpp_backend.score_products_in_use()
    code = "from sasoftmax.attention.backends import cpp; print(cpp.score_products_in_use())"
    env = dict(os.environ, SASOFTMAX_CPU_PANELS="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "blas (SASOFTMAX_CPU_PANELS=0)", res.stdout


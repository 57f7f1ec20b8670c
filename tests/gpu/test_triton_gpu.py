"""The fused Triton kernels on a CUDA GPU: realistic shapes, both backward paths, determinism, torch.compile with
Inductor, a batch beyond CUDA's 65535 limit on grid axes 1 and 2, head dim 256, float32. Skipped without CUDA
(``scripts/gpu_check.sh`` runs this file; the small cases of ``tests/core/test_triton.py`` run there too, on the
compiled kernels)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sasoftmax.attention.api import sa_attention
from sasoftmax.attention.backends import triton as tb

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def _helpers():
    """The helpers of ``tests/core/test_triton.py`` (the accuracy rule against float64, input builders)."""
    spec = importlib.util.spec_from_file_location("_sa_triton_test_helpers",
                                                  Path(__file__).resolve().parents[1] / "core" / "test_triton.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_H = _helpers()
DEVICE, check, qkv, rand, _sink_inputs = _H.DEVICE, _H.check, _H.qkv, _H.rand, _H._sink_inputs


@pytest.fixture(params=[False, True], ids=["fast", "deterministic"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(tb, "DETERMINISTIC", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_realistic(dtype: torch.dtype, D: int, is_causal: bool, normalize: bool, path: bool) -> None:
    q, k, v = qkv(B=2, H=4, Nq=1000, D=D, dtype=dtype, std=1.0, seed=71)
    check(q, k, v, is_causal=is_causal, normalize=normalize)


def test_auto_picks_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = tb.run
    monkeypatch.setattr(tb, "run", lambda inp: calls.append(1) or real(inp))
    q, k, v = qkv(B=1, H=2, Nq=256, D=64, dtype=torch.bfloat16)
    sa_attention(q, k, v, backend="auto", is_causal=True)
    assert calls == [1]


def test_gqa_bias_alibi_long(path: bool) -> None:
    B, H, N = 2, 8, 700
    q, k, v = qkv(B=B, H=H, Hkv=2, Nq=N, D=64, dtype=torch.bfloat16, std=1.0, seed=73)
    bias = rand(1, H, N, N, dtype=torch.bfloat16, std=0.3, seed=79)
    check(q, k, v, bias=bias, is_causal=True)
    slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32)).to(DEVICE)
    check(q, k, v, alibi_slopes=slopes, normalize=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,is_causal", [((256, -1), True), ((100, 100), False)], ids=["causal-left", "both"])
def test_window_softcap_realistic(dtype: torch.dtype, window: tuple[int, int], is_causal: bool, path: bool) -> None:
    """Mistral/Gemma-2-style attention at N = 1000: a sliding window (rows skip whole key blocks on the GPU tiles)
    with soft-capping at 30 (Gemma 2's attention cap), against float64; and the window's cost is that of its keys."""
    q, k, v = qkv(B=2, H=4, Hkv=2, Nq=1000, D=128, dtype=dtype, std=1.0, seed=83)
    check(q, k, v, window=window, softcap=30.0, is_causal=is_causal)
    check(q, k, v, window=window, is_causal=is_causal, normalize=False)


@pytest.mark.parametrize("normalize", [True, False])
def test_dropout_realistic(normalize: bool, path: bool) -> None:
    q, k, v = qkv(B=2, H=4, Hkv=2, Nq=600, D=64, dtype=torch.bfloat16, std=1.0, seed=77)
    check(q, k, v, is_causal=True, normalize=normalize, dropout_p=0.1, dropout_seed=5)


@pytest.mark.parametrize("D", [96, 256])
def test_head_dim_96_and_256(D: int) -> None:
    q, k, v = qkv(B=1, H=2, Nq=300, D=D, dtype=torch.bfloat16, std=1.0, seed=83)
    check(q, k, v, is_causal=True)


def test_float32_exact_products() -> None:
    q, k, v = qkv(B=1, H=2, Nq=300, D=64, dtype=torch.float32, std=1.0, seed=85)
    check(q, k, v, is_causal=True)


def test_sink_token_long(path: bool) -> None:
    """Key 0 is every row's arg-max (an attention sink) at N = 2048: on the fast path 2048 rows add their range
    correction to the same dk row by atomics."""
    q, k, v = _sink_inputs(4, 2, 2048, 64, seed=87)
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    check(q, k, v, is_causal=True)


def test_deterministic_backward_is_bitwise_repeatable(monkeypatch: pytest.MonkeyPatch) -> None:
    """With atomics (fast path) the gradients may differ in the last bits between runs; the deterministic path's
    never do (checked on shapes where many programs add to the same rows: long rows, GQA, a sink token, dropout)."""
    monkeypatch.setattr(tb, "DETERMINISTIC", True)
    q, k, v = (t.detach().bfloat16() for t in _sink_inputs(8, 2, 4096, 128, seed=89))
    bias = rand(1, 8, 1, 4096, dtype=torch.bfloat16, std=0.3, seed=91)
    g = torch.randn(q.shape[:3] + (128,), device=DEVICE, dtype=torch.bfloat16)

    def run() -> list[torch.Tensor]:
        ts = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = sa_attention(ts[0], ts[1], ts[2], bias=ts[3], is_causal=True, dropout_p=0.1, backend="triton",
                           generator=torch.Generator().manual_seed(3))
        out.backward(g)
        return [out.detach(), *(t.grad for t in ts)]

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run(), strict=True))
    monkeypatch.setattr(tb, "DETERMINISTIC", False)
    fast = run()
    for a, b in zip(first, fast, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_batch_beyond_grid_axis_limit() -> None:
    """B * H = 70000 > 65535: the one-dimensional grids launch, and the result matches the chunked backend."""
    q, k, v = (torch.randn(70000, 1, 16, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = sa_attention(q, k, v, is_causal=True, backend="triton")
    out.float().sum().backward()
    want = sa_attention(q.detach(), k.detach(), v.detach(), is_causal=True, backend="chunked")
    torch.testing.assert_close(out.detach().float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_torch_compile_inductor_fullgraph() -> None:
    """``torch.compile(fullgraph=True)`` with Inductor around a block that calls the kernel (the operators are
    opaque to it); forward and gradients match eager."""
    q, k, v = qkv(B=2, H=4, Nq=512, D=64, dtype=torch.bfloat16, std=1.0, seed=93)
    w = torch.randn(64, 64, device=DEVICE, dtype=torch.bfloat16) * 0.1

    def block(q, k, v):
        return sa_attention(q @ w, k, v, is_causal=True, backend="triton") * 2.0

    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (compiled, block):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ts)
        out.float().sum().backward()
        results.append([out.detach(), *(t.grad for t in ts)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_no_quadratic_memory() -> None:
    B, H, N, D = 1, 4, 16384, 64
    q, k, v = qkv(B=B, H=H, Nq=N, D=D, dtype=torch.bfloat16, std=1.0, seed=89)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = sa_attention(q, k, v, backend="triton", is_causal=True)
    out.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N D): the output, float32 dq/dk accumulators, the gradients; N^2 would be 256x more
    assert extra < 64 * B * H * N * D, f"peak extra memory {extra} bytes looks quadratic"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_on_cuda_equals_separate_calls(dtype):
    """Packed documents on CUDA: each document through the Triton kernel equals its separate call (values and
    gradients), without and with a causal sliding window and soft-capping."""
    from sasoftmax import sa_attention_varlen

    lengths = [300, 1, 700, 64]
    cu = torch.tensor([0, 300, 301, 1001, 1065], dtype=torch.int32, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1065, 4, 64, device=DEVICE, generator=g, dtype=dtype).requires_grad_(True)
               for _ in range(3))
    for kw in (dict(is_causal=True), dict(is_causal=True, window=(128, 0), softcap=20.0)):
        out = sa_attention_varlen(q, k, v, cu, cu, 700, 700, **kw)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        parts = []
        off = 0
        for n in lengths:
            one = [t[off:off + n].transpose(0, 1)[None] for t in (q, k, v)]
            parts.append(sa_attention(*one, **kw)[0].transpose(0, 1))
            off += n
        ref = torch.cat(parts)
        ref_grads = torch.autograd.grad(ref.float().sum(), (q, k, v))
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # (the fast backward's atomics add in any order)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)

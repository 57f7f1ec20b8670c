"""The fused Triton backend against the float64 reference (``docs/contract.md``).

Without a GPU the kernels run under the Triton interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so
the shapes here are small and the dtypes float32/float16. On a CUDA machine the same tests run the compiled kernels
on the GPU (plus bfloat16), and the ``gpu``-marked class adds realistic shapes.

Accuracy rule (FlashAttention's): the error against float64 is at most 2x the error of the reference backend run in
the same dtype on the same inputs, plus a floor at rounding level (4e-6 relative for float32, 1e-4 for half).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from sasoftmax.attention import api  # noqa: E402
from sasoftmax.attention.api import sa_attention, sa_attention_with_weights  # noqa: E402
from sasoftmax.attention.inputs import prepare  # noqa: E402
from sasoftmax.attention.triton_backend import triton_attention, unsupported_reason  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HALF_DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def _floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    scale = max(1.0, float(ref.abs().max()))
    return (4e-6 if dtype == torch.float32 else 1e-4) * scale


def check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    grad_scale: float = 1.0,
    dropout_seed: int | None = None,
    **kw,
) -> dict[str, tuple[float, float]]:
    """Run triton, the reference in the same dtype, and the reference in float64; assert the accuracy rule on the
    output and on every gradient. Returns ``{name: (triton error, reference error)}``. With ``dropout_seed`` each run
    gets a generator seeded with it (all backends drop the same entries for the same seed)."""
    dtype = q.dtype
    gen = torch.Generator(device="cpu").manual_seed(1234)
    g = (torch.randn(q.shape[:3] + v.shape[-1:], generator=gen) * grad_scale).to(q.device)
    leaves = {"q": q, "k": k, "v": v}
    if bias is not None:
        leaves["bias"] = bias
    results = {}
    for backend, cast in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
        ts = {n: t.detach().to(cast if n != "bias" else (cast if cast == torch.float64 else t.dtype))
              .requires_grad_(t.requires_grad) for n, t in leaves.items()}
        if dropout_seed is not None:
            kw["generator"] = torch.Generator().manual_seed(dropout_seed)
        out = sa_attention(ts["q"], ts["k"], ts["v"], bias=ts.get("bias"), backend=backend, **kw)
        assert out.dtype == cast
        out.backward(g.to(cast))
        got = {"out": out.detach().double()}
        for n, t in ts.items():
            if t.requires_grad:
                assert t.grad is not None, f"{backend}: no gradient for {n}"
                got[n] = t.grad.double()
        results[(backend, cast)] = got
    fast, ref, exact = results[("triton", dtype)], results[("reference", dtype)], results[("reference", torch.float64)]
    errs = {}
    for name, want in exact.items():
        assert torch.isfinite(fast[name]).all(), f"{name}: non-finite values from triton"
        e_fast = float((fast[name] - want).abs().max())
        e_ref = float((ref[name] - want).abs().max())
        errs[name] = (e_fast, e_ref)
        assert e_fast <= 2 * e_ref + _floor(dtype, want), f"{name}: triton error {e_fast:.3g} vs reference {e_ref:.3g}"
    return errs


def rand(*shape: int, dtype: torch.dtype = torch.float32, std: float = 1.0, seed: int = 0,
         grad: bool = True) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t = (torch.randn(*shape, generator=gen) * std).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(grad)


def qkv(B=1, H=2, Hkv=None, Nq=24, Nk=None, D=16, Dv=None, dtype=torch.float32, std=1.5, seed=0):
    Hkv = H if Hkv is None else Hkv
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv
    return (rand(B, H, Nq, D, dtype=dtype, std=std, seed=seed),
            rand(B, Hkv, Nk, D, dtype=dtype, std=std, seed=seed + 1),
            rand(B, Hkv, Nk, Dv, dtype=dtype, seed=seed + 2))


# ---------------------------------------------------------------------------------------------------------------------
# variants, range modes, causal, lengths


@pytest.mark.parametrize("normalize,detach_range", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_variants(normalize: bool, detach_range: bool, is_causal: bool) -> None:
    q, k, v = qkv(B=2, Nq=33)  # 33: not a multiple of the block size
    check(q, k, v, normalize=normalize, detach_range=detach_range, is_causal=is_causal)


@pytest.mark.parametrize("nq,nk", [(13, 37), (37, 13), (1, 20), (20, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_causal_rectangular(nq: int, nk: int, normalize: bool) -> None:
    """Bottom-right causal with Nq != Nk; Nq > Nk leaves the first rows with no key (output 0, gradient 0)."""
    q, k, v = qkv(Nq=nq, Nk=nk, seed=3)
    check(q, k, v, is_causal=True, normalize=normalize)


def test_noncausal_rectangular() -> None:
    q, k, v = qkv(Nq=9, Nk=40, seed=5)
    check(q, k, v)


def test_single_key_rows_are_well_conditioned() -> None:
    """A row with one visible key and a tiny score has c = 1/|s| huge; its gradient must still be accurate (the
    kernels avoid cancelling O(c) terms)."""
    q, k, v = qkv(Nq=17, seed=7)
    with torch.no_grad():
        # make the first row's only visible score (causal) tiny and negative for head 0, tiny positive for head 1
        kk = k[0, :, 0]
        q[0, 0, 0] = -1e-3 * kk[0] / kk[0].pow(2).sum() * math.sqrt(16)
        q[0, 1, 0] = 1e-3 * kk[1] / kk[1].pow(2).sum() * math.sqrt(16)
    check(q, k, v, is_causal=True)


# ---------------------------------------------------------------------------------------------------------------------
# masks, bias, ALiBi, GQA


def test_bool_padding_mask() -> None:
    B, Nq = 2, 21
    q, k, v = qkv(B=B, Nq=Nq, seed=11)
    lengths = torch.tensor([21, 14])
    keep = (torch.arange(Nq)[None, :] < lengths[:, None])[:, None, None, :].to(DEVICE)  # (B, 1, 1, Nk)
    check(q, k, v, attn_mask=keep)
    check(q, k, v, attn_mask=keep, is_causal=True, normalize=False)


def test_fully_masked_rows_give_zero_and_no_nan() -> None:
    Nq = 18
    q, k, v = qkv(Nq=Nq, seed=13)
    keep = torch.rand(1, 2, Nq, Nq, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[0, 0, 3] = False  # one row of head 0 sees nothing
    keep[0, :, 10] = False  # row 10 of both heads sees nothing
    keep = keep.to(DEVICE)
    check(q, k, v, attn_mask=keep)
    out = sa_attention(q, k, v, attn_mask=keep, backend="triton")
    out.sum().backward()
    assert torch.all(out[0, 0, 3] == 0) and torch.all(out[0, :, 10] == 0)
    assert torch.all(q.grad[0, :, 10] == 0) and torch.all(q.grad[0, 0, 3] == 0)
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_float_mask() -> None:
    Nq = 20
    q, k, v = qkv(Nq=Nq, seed=17)
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(1, 1, Nq, Nq, generator=gen)
    m[torch.rand(1, 1, Nq, Nq, generator=gen) < 0.25] = float("-inf")
    m[..., 5, :] = torch.finfo(torch.float32).min  # HF-style fully masked row
    m = m.to(DEVICE)
    check(q, k, v, attn_mask=m)
    check(q, k, v, attn_mask=m, normalize=False, is_causal=True)


@pytest.mark.parametrize("shape", ["full", "heads", "keys", "rows", "scalar"])
@pytest.mark.parametrize("detach_range", [False, True])
def test_bias_with_grad(shape: str, detach_range: bool) -> None:
    B, H, Nq, Nk = 2, 2, 19, 23
    q, k, v = qkv(B=B, H=H, Nq=Nq, Nk=Nk, seed=19)
    bshape = {"full": (B, H, Nq, Nk), "heads": (1, H, Nq, Nk), "keys": (1, 1, 1, Nk), "rows": (B, 1, Nq, 1),
              "scalar": (1, 1, 1, 1)}[shape]
    bias = rand(*bshape, seed=23, std=0.7)
    check(q, k, v, bias=bias, detach_range=detach_range, is_causal=shape == "heads")


def test_bias_3d_broadcast() -> None:
    """A 3-d bias (H, Nq, Nk) broadcasts over the batch; its gradient is summed over it."""
    q, k, v = qkv(B=2, Nq=17, seed=29)
    bias = rand(2, 17, 17, seed=31, std=0.5)
    check(q, k, v, bias=bias, is_causal=True)


@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(per_batch: bool) -> None:
    B, H = 2, 2
    q, k, v = qkv(B=B, H=H, Nq=15, Nk=26, seed=37)
    slopes = torch.tensor([0.5, 0.125]) if not per_batch else torch.tensor([[0.5, 0.125], [0.25, 0.0625]])
    check(q, k, v, alibi_slopes=slopes.to(DEVICE), is_causal=True)
    check(q, k, v, alibi_slopes=slopes.to(DEVICE), normalize=False)


@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa(hkv: int) -> None:
    q, k, v = qkv(H=4, Hkv=hkv, Nq=20, seed=41)
    check(q, k, v, is_causal=True)
    check(q, k, v, normalize=False)


def test_head_dims_padded_and_dv_differs() -> None:
    q, k, v = qkv(Nq=18, D=40, Dv=24, seed=43)  # pads 40 -> 64 and 24 -> 32
    check(q, k, v, is_causal=True)


def test_noncontiguous_inputs() -> None:
    """(B, N, H, D) tensors viewed as (B, H, N, D), as attention layers usually produce them: read by strides."""
    q, k, v = (rand(1, 19, 2, 16, seed=s, std=1.2, grad=False).transpose(1, 2).requires_grad_() for s in (91, 92, 93))
    assert not q.is_contiguous()
    check(q, k, v, is_causal=True)


# ---------------------------------------------------------------------------------------------------------------------
# half precision


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_half(dtype: torch.dtype, normalize: bool) -> None:
    q, k, v = qkv(B=2, Nq=27, D=32, dtype=dtype, seed=47)
    check(q, k, v, normalize=normalize, is_causal=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_bias_mask_gqa(dtype: torch.dtype) -> None:
    q, k, v = qkv(H=4, Hkv=2, Nq=22, Nk=30, dtype=dtype, seed=53)
    bias = rand(1, 4, 22, 30, dtype=dtype, seed=59, std=0.5)
    keep = (torch.rand(1, 1, 22, 30, generator=torch.Generator().manual_seed(2)) > 0.2).to(DEVICE)
    check(q, k, v, bias=bias, attn_mask=keep)


# ---------------------------------------------------------------------------------------------------------------------
# behaviour around the kernel


def test_partial_requires_grad_and_no_grad() -> None:
    q, k, v = qkv(Nq=20, seed=61)
    k.requires_grad_(False)
    out = sa_attention(q, k, v, backend="triton", is_causal=True)
    out.sum().backward()
    assert q.grad is not None and v.grad is not None and k.grad is None
    with torch.no_grad():
        out2 = sa_attention(q, k, v, backend="triton", is_causal=True)
    assert torch.equal(out.detach(), out2)
    want = sa_attention(q.double(), k.double(), v.double(), backend="reference", is_causal=True)
    assert torch.allclose(out2.double(), want, atol=1e-5)


def test_empty_sequences() -> None:
    q, k, v = qkv(Nq=0, Nk=5)
    out = sa_attention(q, k, v, backend="triton")
    assert out.shape == (1, 2, 0, 16)
    q, k, v = qkv(Nq=4, Nk=0)
    out = sa_attention(q, k, v, backend="triton")
    assert out.shape == (1, 2, 4, 16) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_unsupported_reasons() -> None:
    q, k, v = qkv(Nq=8)
    assert unsupported_reason(prepare(q, k, v)) is None
    assert unsupported_reason(prepare(q, k, v, dropout_p=0.1)) is None
    big = rand(1, 1, 4, 320, grad=False)
    with pytest.raises(ValueError, match="head_dim"):
        triton_attention(prepare(big, big, big))
    reason = unsupported_reason(prepare(q.double(), k.double(), v.double()))
    assert reason is not None and "float64" in reason
    big = rand(1, 1, 4, 320, grad=False)
    reason = unsupported_reason(prepare(big, big, big))
    assert reason is not None and "head_dim" in reason


# ---------------------------------------------------------------------------------------------------------------------
# dropout (in-kernel, the same counter-based mask as the PyTorch backends)


@pytest.mark.parametrize("normalize,detach_range", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_matches_reference_with_same_seed(normalize: bool, detach_range: bool, is_causal: bool) -> None:
    """Same seed, same dropped entries: output and every gradient (bias too) agree with the float64 reference."""
    q, k, v = qkv(B=2, H=4, Hkv=2, Nq=21, Nk=35 if not is_causal else 21, seed=41)
    bias = rand(1, 4, q.shape[2], k.shape[2], std=0.5, seed=43)
    check(q, k, v, bias=bias, is_causal=is_causal, normalize=normalize, detach_range=detach_range, dropout_p=0.3,
          dropout_seed=11)


def test_dropout_really_drops_and_depends_on_seed() -> None:
    q, k, v = qkv(B=1, H=2, Nq=40, seed=45)
    kw = dict(dropout_p=0.5, backend="triton")
    base = sa_attention(q, k, v, backend="triton")
    a = sa_attention(q, k, v, generator=torch.Generator().manual_seed(1), **kw)
    b = sa_attention(q, k, v, generator=torch.Generator().manual_seed(1), **kw)
    c = sa_attention(q, k, v, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, base)
    want = sa_attention(q, k, v, generator=torch.Generator().manual_seed(2), dropout_p=0.5, backend="chunked")
    torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-5)


def test_dropout_half() -> None:
    q, k, v = qkv(B=1, H=2, Nq=19, dtype=torch.float16, seed=47)
    check(q, k, v, is_causal=True, dropout_p=0.2, dropout_seed=3)


def test_dropout_seed_halves_with_top_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds whose 32-bit halves have the top bit set: the kernels must read them as unsigned, like the PyTorch
    hash. The expected output applies the mask of :func:`keep_mask` to the float64 weights."""
    import sasoftmax.attention.triton_backend as tb
    from sasoftmax.attention.dropout import keep_mask

    seed = (0x70000001 << 32) | 0x80000003
    monkeypatch.setattr(tb, "draw_seed", lambda generator: seed)
    q, k, v = (t.detach() for t in qkv(B=1, H=2, Nq=19, seed=49))
    out = sa_attention(q, k, v, dropout_p=0.4, backend="triton")
    keep = keep_mask(seed, 0.4, 1, 2, 19, 19, 0, 19, torch.device("cpu"))
    w = sa_attention_with_weights(q.double(), k.double(), v.double())[1]
    want = (w * keep.double() / 0.6) @ v.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="checks the CPU dispatch")
def test_auto_on_cpu_does_not_pick_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(inp):  # pragma: no cover - must not be called
        raise AssertionError("auto picked triton on CPU")

    monkeypatch.setitem(api.BACKENDS, "triton", boom)
    q, k, v = qkv(Nq=8)
    out = sa_attention(q, k, v, backend="auto")
    want = sa_attention(q, k, v, backend="chunked")
    assert torch.equal(out, want)


@pytest.mark.skipif(CUDA, reason="checks the interpreter-only restriction")
def test_bf16_rejected_under_interpreter() -> None:
    q, k, v = qkv(Nq=8, dtype=torch.bfloat16)
    reason = unsupported_reason(prepare(q, k, v))
    assert reason is not None and "bfloat16" in reason


# ---------------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90 (H100/H200), possible without a GPU

_AOT_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sasoftmax.attention import triton_kernels as tk
from sasoftmax.attention.triton_backend import _GPU_CONFIGS
assert not tk.INTERPRET
INTS = {"H", "G", "HKV", "Nq", "Nk", "D", "DV", "N_BUCKET"}
PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "Bias": "*bf16", "MaskAdd": "*fp32",
       "Keep": "*u8", "IdxMin": "*i32", "IdxMax": "*i32"}
flags = dict(IS_CAUSAL=True, HAS_KEEP=True, HAS_MADD=True, HAS_BIAS=True, HAS_ALIBI=True, NORMALIZE=True,
             RANGE_GRAD=True, HAS_DROPOUT=True, DOT_PREC="tf32", BLOCK_D=int(sys.argv[1]), BLOCK_DV=int(sys.argv[1]))
extra = {"sa_bwd_dkdv": dict(BIAS_GRAD=True, DB_BCAST_M=False, DB_BCAST_N=True, DB_ATOMIC=True)}
out = {}
for kind, fn in (("fwd", tk.sa_fwd), ("dq", tk.sa_bwd_dq), ("dkdv", tk.sa_bwd_dkdv)):
    table = _GPU_CONFIGS[kind]
    bm, bn, warps, stages = table[min(d for d in table if d >= flags["BLOCK_D"])]
    cx = dict(flags, **extra.get(fn.__name__, {}), BLOCK_M=bm, BLOCK_N=bn)
    sig = {}
    for name in fn.arg_names:
        if name in cx:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in ("scale", "eps", "drop_scale"):
            sig[name] = "fp32"
        elif name[0].isupper():
            sig[name] = "*fp32" if fn is tk.sa_fwd and name == "Out" else PTR.get(name, "*fp32")
        else:
            sig[name] = "i64"  # strides
    k = triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    out[kind] = k.metadata.shared
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("block_d", [64, 128])
def test_kernels_compile_for_sm90(block_d: int) -> None:
    """The kernels (every feature on) compile for an H100/H200 with the launch configuration the backend uses, and
    fit its shared memory (227 KiB). Runs in a subprocess without TRITON_INTERPRET; no GPU is needed."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(block_d)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(shared) == {"fwd", "dq", "dkdv"}
    for kind, nbytes in shared.items():
        assert 0 < nbytes <= 227 * 1024, f"{kind}: {nbytes} bytes of shared memory"


# ---------------------------------------------------------------------------------------------------------------------
# GPU: realistic shapes (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("D", [64, 128])
    @pytest.mark.parametrize("is_causal", [False, True])
    @pytest.mark.parametrize("normalize", [True, False])
    def test_realistic(self, dtype: torch.dtype, D: int, is_causal: bool, normalize: bool) -> None:
        q, k, v = qkv(B=2, H=4, Nq=1000, D=D, dtype=dtype, std=1.0, seed=71)
        check(q, k, v, is_causal=is_causal, normalize=normalize)

    def test_auto_picks_triton(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls = []
        real = api.BACKENDS["triton"]
        monkeypatch.setitem(api.BACKENDS, "triton", lambda inp: calls.append(1) or real(inp))
        q, k, v = qkv(B=1, H=2, Nq=256, D=64, dtype=torch.bfloat16)
        sa_attention(q, k, v, backend="auto", is_causal=True)
        assert calls == [1]

    def test_gqa_bias_alibi_long(self) -> None:
        B, H, N = 2, 8, 700
        q, k, v = qkv(B=B, H=H, Hkv=2, Nq=N, D=64, dtype=torch.bfloat16, std=1.0, seed=73)
        bias = rand(1, H, N, N, dtype=torch.bfloat16, std=0.3, seed=79)
        check(q, k, v, bias=bias, is_causal=True)
        slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32)).to(DEVICE)
        check(q, k, v, alibi_slopes=slopes, normalize=True)

    @pytest.mark.parametrize("normalize", [True, False])
    def test_dropout_realistic(self, normalize: bool) -> None:
        q, k, v = qkv(B=2, H=4, Hkv=2, Nq=600, D=64, dtype=torch.bfloat16, std=1.0, seed=77)
        check(q, k, v, is_causal=True, normalize=normalize, dropout_p=0.1, dropout_seed=5)

    def test_head_dim_96_and_256(self) -> None:
        for D in (96, 256):
            q, k, v = qkv(B=1, H=2, Nq=300, D=D, dtype=torch.bfloat16, std=1.0, seed=83)
            check(q, k, v, is_causal=True)

    def test_no_quadratic_memory(self) -> None:
        B, H, N, D = 1, 4, 16384, 64
        q, k, v = qkv(B=B, H=H, Nq=N, D=D, dtype=torch.bfloat16, std=1.0, seed=89)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = sa_attention(q, k, v, backend="triton", is_causal=True)
        out.sum().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        # O(N D): ~40 bytes per element of q (saved float32 output, float32 dq/dk/dv, casts); N^2 is 256x more
        assert extra < 128 * B * H * N * D, f"peak extra memory {extra} bytes looks quadratic"

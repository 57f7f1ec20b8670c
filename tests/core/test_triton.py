"""The fused Triton backend against the float64 reference (``docs/contract.md``).

Without a GPU the kernels run under the Triton interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so
the shapes here are small and the dtypes float32/float16. On a CUDA machine the same tests run the compiled kernels
on the GPU (plus bfloat16); ``tests/gpu/test_triton_gpu.py`` adds realistic shapes there. Tests marked with the
``path`` fixture run through both backward paths (the fast one with atomics and the deterministic one).

Accuracy rule (FlashAttention's, ``tests/accuracy.py``): the error against float64 is at most 2x the error of the
reference backend run in the same dtype on the same inputs, plus a floor at rounding level (4e-6 relative for float32,
1e-4 for half) that, for gradients summed over broadcast dimensions, grows with the terms summed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from support.accuracy import accuracy_violation, assert_accuracy_rule, reduction_terms64

from sasoftmax.attention.api import sa_attention, sa_attention_with_weights
from sasoftmax.attention.backends import triton as tb
from sasoftmax.attention.backends.triton import kernels as tk
from sasoftmax.attention.backends.triton import triton_attention, unsupported_reason
from sasoftmax.attention.inputs import prepare

ROOT = Path(__file__).resolve().parents[2]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HALF_DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def _rel(dtype: torch.dtype) -> float:
    return 4e-6 if dtype == torch.float32 else 1e-4


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
    """Run triton, the reference in the same dtype, and the reference in float64; assert the accuracy rule
    (``tests/accuracy.py``: reduced gradients, of a broadcast bias or of shared GQA key/value heads, get a floor
    that grows with the terms they sum) on the output and on every gradient. Returns ``{name: (triton error,
    reference error)}``. With ``dropout_seed`` each run gets a generator seeded with it (all backends drop the same
    entries for the same seed)."""
    dtype = q.dtype
    gen = torch.Generator(device="cpu").manual_seed(1234)
    g = (torch.randn(q.shape[:3] + v.shape[-1:], generator=gen) * grad_scale).to(q.device)
    leaves = {"q": q, "k": k, "v": v}
    if bias is not None:
        leaves["bias"] = bias
    results = {}

    def attend(backend: str, qq, kk, vv, bb):
        if dropout_seed is not None:
            kw["generator"] = torch.Generator().manual_seed(dropout_seed)
        return sa_attention(qq, kk, vv, bias=bb, backend=backend, **kw)

    for backend, cast in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
        ts = {n: t.detach().to(cast if n != "bias" else (cast if cast == torch.float64 else t.dtype))
              .requires_grad_(t.requires_grad) for n, t in leaves.items()}
        out = attend(backend, ts["q"], ts["k"], ts["v"], ts.get("bias"))
        assert out.dtype == cast
        out.backward(g.to(cast))
        got = {"out": out.detach().double()}
        for n, t in ts.items():
            if t.requires_grad:
                assert t.grad is not None, f"{backend}: no gradient for {n}"
                got[n] = t.grad.double()
        results[(backend, cast)] = got
    fast, ref, exact = results[("triton", dtype)], results[("reference", dtype)], results[("reference", torch.float64)]
    terms = reduction_terms64(lambda *a: attend("reference", *a), q, k, v,
                              bias if bias is not None and bias.requires_grad else None, g)
    errs = {}
    for name, want in exact.items():
        errs[name] = (float((fast[name] - want).abs().max()), float((ref[name] - want).abs().max()))
        assert_accuracy_rule(name, fast[name], ref[name], want, _rel(dtype), terms=terms.get(name))
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


@pytest.fixture(params=[False, True], ids=["fast", "deterministic"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run the test through the fast backward (atomics) and through the deterministic one."""
    monkeypatch.setattr(tb, "DETERMINISTIC", request.param)
    return request.param


@pytest.fixture
def blocks32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter tiles of 32 instead of 16 (half the interpreter time) for tests whose point is not the tiling;
    their shapes still span two or more blocks."""
    monkeypatch.setattr(tb, "_INTERPRET_BLOCK", 32)


# ---------------------------------------------------------------------------------------------------------------------
# variants, range modes, causal, lengths


_VARIANTS = [(True, False), (True, True), (False, False)]


@pytest.mark.parametrize("normalize,detach_range,is_causal,deterministic",
                         [(*var, causal, False) for var in _VARIANTS for causal in (False, True)]
                         + [(True, False, True, True), (True, False, False, True), (False, False, True, True)])
def test_variants(normalize: bool, detach_range: bool, is_causal: bool, deterministic: bool,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variant on the fast backward; on the deterministic one the variants whose backward differs most
    (range terms added to ds in the key/value kernel; plain)."""
    monkeypatch.setattr(tb, "DETERMINISTIC", deterministic)
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


def test_single_key_rows_are_well_conditioned(path: bool) -> None:
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
@pytest.mark.parametrize("detach_range,deterministic", [(False, False), (False, True), (True, False)],
                         ids=["range-fast", "range-deterministic", "detach-fast"])
def test_bias_with_grad(shape: str, detach_range: bool, deterministic: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bias layout of the gradient (full, broadcast over the batch, over rows, over keys, scalar), on both
    backward paths (atomics / per-program partials)."""
    monkeypatch.setattr(tb, "DETERMINISTIC", deterministic)
    B, H, Nq, Nk = 2, 2, 19, 23
    q, k, v = qkv(B=B, H=H, Nq=Nq, Nk=Nk, seed=19)
    bshape = {"full": (B, H, Nq, Nk), "heads": (1, H, Nq, Nk), "keys": (1, 1, 1, Nk), "rows": (B, 1, Nq, 1),
              "scalar": (1, 1, 1, 1)}[shape]
    bias = rand(*bshape, seed=23, std=0.7)
    check(q, k, v, bias=bias, detach_range=detach_range, is_causal=shape == "heads")


@pytest.mark.parametrize("shape", ["scalar", "keys", "rows"])
@pytest.mark.parametrize("factor", [0.0, 2.0], ids=["block-dropped", "block-doubled"])
def test_reduced_bias_bound_still_catches_a_wrong_block(shape: str, factor: float) -> None:
    """The bound for a bias gradient summed over broadcast dims (it grows with the terms summed) must not be so loose
    that a kernel dropping or doubling one 16 x 16 tile's contribution would pass."""
    B, H, Nq, Nk = 2, 2, 19, 23
    q, k, v = qkv(B=B, H=H, Nq=Nq, Nk=Nk, seed=19)
    bshape = {"keys": (1, 1, 1, Nk), "rows": (B, 1, Nq, 1), "scalar": (1, 1, 1, 1)}[shape]
    bias = rand(*bshape, seed=23, std=0.7)
    g = torch.randn(B, H, Nq, q.shape[-1], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    db = {}
    for backend, dt in (("triton", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, bias)]
        out = sa_attention(*leaves[:3], bias=leaves[3], backend=backend)
        db[(backend, dt)] = torch.autograd.grad(out, leaves[3], g.to(dt))[0].double()
    full = bias.detach().double().expand(B, H, Nq, Nk).clone().requires_grad_()
    out = sa_attention(q.detach().double(), k.detach().double(), v.detach().double(), bias=full, backend="reference")
    ds = torch.autograd.grad(out, full, g.double())[0]
    terms = reduction_terms64(lambda qq, kk, vv, bb: sa_attention(qq, kk, vv, bias=bb, backend="reference"),
                              q, k, v, bias, g)["bias"]
    tile = torch.zeros_like(ds)
    tile[0, 0, :16, :16] = ds[0, 0, :16, :16]
    dims = [d for d in range(4) if bshape[d] == 1]
    wrong = db[("triton", torch.float32)] + (factor - 1.0) * tile.sum(dim=dims, keepdim=True)
    args = (db[("reference", torch.float32)], db[("reference", torch.float64)], _rel(torch.float32))
    assert accuracy_violation("bias", db[("triton", torch.float32)], *args, terms=terms) is None
    assert accuracy_violation("bias", wrong, *args, terms=terms) is not None


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
def test_gqa(hkv: int, path: bool) -> None:
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
# sliding windows and soft-capping (the interpreter's 16-wide tiles: windows that start and end inside blocks, rows
# whose key range skips whole blocks on either side, key blocks no row of a query block sees)


@pytest.mark.parametrize("nq,nk,window,is_causal", [
    (37, 37, (5, 3), False),
    (50, 50, (9, -1), True),  # Mistral-style: causal with a left window; later rows skip the first key blocks
    (20, 45, (-1, 0), False),  # right side only, bottom-right aligned (query i at key 25 + i)
    (45, 20, (2, 2), True),  # leading rows see no key
    (40, 40, (0, 0), False),  # each row sees only its own position
])
def test_window(nq: int, nk: int, window: tuple[int, int], is_causal: bool, path: bool) -> None:
    q, k, v = qkv(H=4, Hkv=2, Nq=nq, Nk=nk, seed=211)
    check(q, k, v, window=window, is_causal=is_causal)
    check(q, k, v, window=window, is_causal=is_causal, normalize=False)


@pytest.mark.parametrize("cap,std", [(2.0, 1.5), (0.5, 3.0)], ids=["moderate", "saturated"])
def test_softcap(cap: float, std: float, path: bool) -> None:
    """``cap * tanh(s / cap)``; "saturated": most products far beyond the cap, where ``1 - tanh^2`` is tiny and must
    keep its relative accuracy (the kernel takes it from ``exp(-2|x|)``, not from ``1 - t^2``)."""
    q, k, v = qkv(H=2, Nq=35, Nk=33, std=std, seed=223)
    bias = rand(1, 2, 35, 33, std=0.5, seed=227)
    check(q, k, v, bias=bias, softcap=cap, is_causal=True)
    check(q, k, v, softcap=cap, detach_range=True)
    check(q, k, v, softcap=cap, normalize=False)


def test_tanh_of_the_kernels_is_accurate() -> None:
    """The kernels' ``tanh`` and its derivative against float64 over the whole float32 range of interest,
    including both sides of the series/exponential switch at ``|x| = 0.55`` and deep saturation."""
    @triton.jit
    def tanh_kernel(X, T, G, N: tl.constexpr):
        offs = tl.arange(0, N)
        t, g = tk._tanh_grad(tl.load(X + offs))
        tl.store(T + offs, t)
        tl.store(G + offs, g)

    x = torch.cat([torch.linspace(-12, 12, 2001), torch.linspace(0.5, 0.6, 1001), torch.tensor([0.0, 1e-30, -1e-8]),
                   torch.logspace(-8, 0, 1000), -torch.logspace(-8, 1.2, 1000)])
    x = torch.nn.functional.pad(x, (0, 8192 - x.numel()))
    t, g = torch.empty_like(x), torch.empty_like(x)
    tanh_kernel[(1,)](x, t, g, N=8192)
    want_t = torch.tanh(x.double())
    want_g = torch.cosh(x.double()) ** -2  # (1 - want_t**2 cancels in float64 too, beyond |x| ~ 8)
    # t within a few float32 ulps of its value; g within what its condition number allows (a relative change of x
    # by one ulp moves g by 2|x| ulps), where it is representable (x beyond ~44 underflows to 0)
    ulp = 2.0**-23
    assert float(((t.double() - want_t).abs() / want_t.abs().clamp_min(1e-38)).max()) < 4 * ulp
    rel_g = (g.double() - want_g).abs() / want_g
    ok = want_g > 1e-30
    assert bool((rel_g[ok] <= (8 + 2 * x.double().abs()[ok]) * ulp).all())


@pytest.mark.parametrize("is_causal", [False, True])
def test_window_softcap_with_every_feature(is_causal: bool, path: bool, blocks32: None) -> None:
    """Window and soft-capping combined with a float mask, a bias with gradient broadcast over the batch, ALiBi,
    grouped-query heads and dropout (the same dropped entries as the reference for the same seed)."""
    B, H, Hkv, N = 2, 4, 2, 70
    q, k, v = qkv(B=B, H=H, Hkv=Hkv, Nq=N, seed=229)
    bias = rand(1, H, N, N, std=0.3, seed=231)
    m = torch.randn(1, 1, N, N, generator=torch.Generator().manual_seed(233))
    m[torch.rand(1, 1, N, N, generator=torch.Generator().manual_seed(235)) < 0.15] = float("-inf")
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    check(q, k, v, attn_mask=m.to(DEVICE), bias=bias, alibi_slopes=slopes, window=(21, 4), softcap=3.0,
          is_causal=is_causal, dropout_p=0.2, dropout_seed=17)


# ---------------------------------------------------------------------------------------------------------------------
# half precision


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("normalize,deterministic", [(True, False), (False, False), (True, True)])
def test_half(dtype: torch.dtype, normalize: bool, deterministic: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "DETERMINISTIC", deterministic)
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


@pytest.mark.parametrize("leaf", ["q", "k", "v", "bias"])
def test_one_input_requires_grad(leaf: str, path: bool) -> None:
    """Only one of q, k, v, bias needs a gradient: the kernels compute what is needed (the key/value kernel without
    dk/dv when q alone needs one) and the gradient matches float64."""
    q, k, v = qkv(Nq=21, seed=63)
    bias = rand(1, 2, 21, 21, std=0.3, seed=65, grad=False)
    for name, t in (("q", q), ("k", k), ("v", v)):
        t.requires_grad_(name == leaf)
    bias.requires_grad_(leaf == "bias")
    check(q, k, v, bias=bias, is_causal=True)


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
def test_dropout_matches_reference_with_same_seed(normalize: bool, detach_range: bool, is_causal: bool,
                                                  monkeypatch: pytest.MonkeyPatch, blocks32: None) -> None:
    """Same seed, same dropped entries: output and every gradient (bias too) agree with the float64 reference
    (the causal cases on the deterministic backward, the others on the fast one)."""
    monkeypatch.setattr(tb, "DETERMINISTIC", is_causal)
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
    from sasoftmax.attention.dropout import keep_mask

    seed = (0x70000001 << 32) | 0x80000003
    monkeypatch.setattr(tb, "_seed_tensor", lambda inp: torch.tensor([seed], device=inp.q.device))
    q, k, v = (t.detach() for t in qkv(B=1, H=2, Nq=19, seed=49))
    out = sa_attention(q, k, v, dropout_p=0.4, backend="triton")
    keep = keep_mask(seed, 0.4, 1, 2, 19, 19, 0, 19, torch.device("cpu"))
    w = sa_attention_with_weights(q.double(), k.double(), v.double())[1]
    want = (w * keep.double() / 0.6) @ v.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@triton.jit
def _keep_kernel(Out, row0, Nk, seed_lo, seed_hi, thr, BR: tl.constexpr, BC: tl.constexpr):
    rows = row0 + tl.arange(0, BR).to(tl.int64)
    cols = tl.arange(0, BC)
    keep = tk._dropout_keep(rows[:, None], cols[None, :], Nk, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), thr)
    tl.store(Out + tl.arange(0, BR)[:, None] * BC + cols[None, :], keep.to(tl.int8))


def test_dropout_hash_carries_across_2_32() -> None:
    """The kernels' 32-bit split of the flat score index (per-row base plus a carry) equals the 64-bit index of
    :func:`keep_mask` where the index crosses 2^32 in the middle of a row (Nk = 8191, row 524352 starts at
    2^32 - 64)."""
    from sasoftmax.attention.dropout import keep_mask

    seed, p, nq, nk, r0 = (0x12345678 << 32) | 0x9ABCDEF1, 0.5, 2**20, 8191, 524350
    out = torch.empty(4, 8192, dtype=torch.int8, device=DEVICE)
    _keep_kernel[(1,)](out, r0, nk, seed & 0xFFFFFFFF, seed >> 32, int(p * 2**32) | 1 << 32, BR=4, BC=8192)
    want = keep_mask(seed, p, 1, 1, nq, nk, r0, r0 + 4, torch.device(DEVICE))[0, 0]
    assert torch.equal(out[:, :nk].bool(), want)
    assert (r0 + 2) * nk < 2**32 < (r0 + 2) * nk + nk  # the third row wraps


@pytest.mark.skipif(CUDA, reason="checks the CPU dispatch")
def test_auto_on_cpu_does_not_pick_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(inp):  # pragma: no cover - must not be called
        raise AssertionError("auto picked triton on CPU")

    monkeypatch.setattr(tb, "run", boom)
    q, k, v = qkv(Nq=8)
    out = sa_attention(q, k, v, backend="auto")
    want = sa_attention(q, k, v, backend="chunked")
    torch.testing.assert_close(out, want)


@pytest.mark.skipif(CUDA, reason="checks the interpreter-only restriction")
def test_bf16_rejected_under_interpreter() -> None:
    q, k, v = qkv(Nq=8, dtype=torch.bfloat16)
    reason = unsupported_reason(prepare(q, k, v))
    assert reason is not None and "bfloat16" in reason


# ---------------------------------------------------------------------------------------------------------------------
# exactness of the two-pass forward, the sparse range correction, the deterministic path


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("grad", [False, True])
def test_single_key_row_is_exactly_zero(dtype: torch.dtype, grad: bool) -> None:
    """The first row of a causal mask sees key 0 only; with a negative score ``a = s``, so its weight ``(s - a) c p``
    is exactly 0 and so must be the output row (the one-pass form ``c (acc1 - a acc0) / l`` rounds ``s e`` and ``e``
    separately and leaves ~2^-9 |v| in half precision). Other rows are checked against float64."""
    q, k, v = qkv(B=1, H=2, Nq=17, D=32, dtype=dtype, seed=97)
    with torch.no_grad():
        q[0, :, 0] = -2.0 * k[0, :, 0]  # score of row 0 with key 0: -2 |k_0|^2 / sqrt(D) < 0
    with torch.set_grad_enabled(grad):
        out = sa_attention(q, k, v, is_causal=True, backend="triton")
    assert torch.all(out[0, :, 0] == 0)
    want = sa_attention(q.double(), k.double(), v.double(), is_causal=True, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def _sink_inputs(H: int, Hkv: int, N: int, D: int, seed: int):
    """Queries sharing a direction ``u``; key 0 along ``+u`` and key 1 along ``-u``: key 0 is the arg-max and key 1
    the arg-min of (nearly) every row, so the range correction of all rows lands on the same two keys."""
    q, k, v = qkv(B=1, H=H, Hkv=Hkv, Nq=N, D=D, std=0.5, seed=seed)
    u = torch.zeros(D, device=DEVICE)
    u[0] = 3.0
    with torch.no_grad():
        q += u
        k[:, :, 0] = 2.0 * u
        k[:, :, 1] = -2.0 * u
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
def test_range_correction_at_a_sink_token(is_causal: bool, path: bool, blocks32: None) -> None:
    """Every row's arg-max is key 0 and (almost every row's) arg-min key 1, with GQA (two query heads per key
    head) and a bias with gradient: the dk and dbias corrections of all rows meet at the same keys (on the fast path,
    atomics on the same addresses), and dq gathers the same two key rows everywhere."""
    H, Hkv, N, D = 4, 2, 37, 16
    q, k, v = _sink_inputs(H, Hkv, N, D, seed=101)
    s = torch.einsum("bhid,bhjd->bhij", q.detach(), k.detach().repeat_interleave(2, 1)) / math.sqrt(D)
    if is_causal:
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=DEVICE).triu(1), float("nan"))
    assert (s.nan_to_num(-1e9).argmax(-1) == 0).all()
    assert (s[:, :, 1:].nan_to_num(1e9).argmin(-1) == 1).all()
    bias = rand(1, H, N, N, std=0.2, seed=103)
    check(q, k, v, bias=bias, is_causal=is_causal)


@pytest.mark.parametrize("normalize", [True, False])
def test_range_correction_at_every_argmin_argmax(normalize: bool, path: bool, blocks32: None) -> None:
    """Random rows whose arg-min/arg-max keys lie in every key block and at the block edges (lengths not multiples
    of the block), compared one gradient at a time with float64; bias broadcast over rows."""
    q, k, v = qkv(B=2, H=2, Nq=35, Nk=49, D=16, std=2.0, seed=107)
    bias = rand(2, 1, 1, 49, std=1.0, seed=109)
    check(q, k, v, bias=bias, normalize=normalize)


def test_deterministic_path_is_bitwise_repeatable(monkeypatch: pytest.MonkeyPatch, blocks32: None) -> None:
    """``DETERMINISTIC = True``: two runs give bitwise equal outputs and gradients (q, k, v, a bias broadcast over
    the batch), and they agree with the fast path to rounding."""
    q, k, v = _sink_inputs(4, 2, 33, 16, seed=113)
    bias = rand(1, 4, 33, 33, std=0.3, seed=127)
    g = rand(1, 4, 33, 16, seed=131, grad=False)

    def run() -> list[torch.Tensor]:
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
        out = sa_attention(ts[0], ts[1], ts[2], bias=ts[3], is_causal=True, backend="triton", dropout_p=0.2,
                           generator=torch.Generator().manual_seed(7))
        out.backward(g)
        return [out.detach(), *(t.grad for t in ts)]

    monkeypatch.setattr(tb, "DETERMINISTIC", True)
    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    monkeypatch.setattr(tb, "DETERMINISTIC", False)
    for a, b in zip(first, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_deterministic_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DETERMINISTIC`` forces a path; left at None, ``torch.use_deterministic_algorithms(True)`` selects the
    deterministic one."""
    monkeypatch.setattr(tb, "DETERMINISTIC", None)
    monkeypatch.setattr(tb, "_ENV_DETERMINISTIC", False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert not tb.deterministic()
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert tb.deterministic()
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setattr(tb, "DETERMINISTIC", True)
    assert tb.deterministic()


# ---------------------------------------------------------------------------------------------------------------------
# launch plan, operator registration, torch.compile


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_launch_plan_for_a_batch_beyond_the_65535_limit(deterministic: bool, dtype: torch.dtype) -> None:
    """B * H = 131072 (> 65535, CUDA's limit on grid axes 1 and 2, where batch x heads used to go): every kernel's
    grid is one-dimensional and within axis 0's limit; nothing is launched."""
    B, H, Hkv = 1024, 128, 8
    plan = tb.launch_plan(B, H, Hkv, 1, 4096, 128, 128, dtype, deterministic)
    assert set(plan) == {"sa_fwd", "sa_bwd_pre", "sa_bwd_kv", "sa_bwd_dq" if deterministic else "sa_bwd_post"}
    for name, grid in plan.items():
        assert len(grid) == 3 and grid[1] == grid[2] == 1, name
        assert 0 < grid[0] <= tb.CUDA_GRID_LIMITS[0], name
    assert plan["sa_fwd"][0] == B * H  # one query block per (batch, head)
    kv_block = tb.gpu_config("kv_det" if deterministic else "kv", 128, dtype)[1]
    assert plan["sa_bwd_kv"][0] == B * Hkv * (4096 // kv_block)
    with pytest.raises(ValueError, match="grid limit"):
        tb.launch_grid(2**20, 1, 2**12)


def test_operator_registration() -> None:
    """The forward operator's schema, fake (meta) implementation and autograd registration pass
    ``torch.library.opcheck``."""
    q, k, v = qkv(B=1, H=2, Nq=16, D=16, seed=137)
    inp = prepare(q, k, v, is_causal=True)
    args = tb.fwd_op_args(inp)
    torch.library.opcheck(torch.ops.sasoftmax.triton_sa_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph() -> None:
    """``torch.compile(fullgraph=True)`` traces through the operators (no graph break, dropout included: the seed
    is a tensor); the compiled call gives the eager result."""
    q, k, v = qkv(B=1, H=2, Nq=20, D=16, seed=139)

    def f(q, k, v):
        return triton_attention(prepare(q, k, v, is_causal=True, dropout_p=0.1))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        out = fn(*ts)
        out.sum().backward()
        results.append([out.detach(), *(t.grad for t in ts)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90 (H100/H200), possible without a GPU


@pytest.mark.slow
def test_kernels_compile_for_sm90_within_targets() -> None:
    """The kernels the launcher picks at head dim 128 (the tightest for registers), bf16, compile for sm_90 and meet
    the static targets (``benchmarks/triton_static.py --check``: no spills in the common training case, at most 256
    spill bytes with every feature on, shared memory within 232448 bytes), with the matrix products per iteration of
    the design: forward 3 (normalized, two passes) / 2 (plain), fast backward 5, deterministic 4 + 3. No GPU is
    needed (Triton ships ptxas); the full table is ``python benchmarks/triton_static.py``."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_static.py"), "--dtypes", "bf16", "--dims", "128",
           "--features", "causal-normalized,causal-plain,all", "--kernels", "fwd,kv,kv_det,dq", "--jobs", "2",
           "--check"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = json.loads(res.stdout.strip().splitlines()[-1])
    got = {(r["kernel"], r["features"]): r for r in records}
    assert set(got) == {(k, f) for k in ("sa_fwd", "sa_bwd_kv", "sa_bwd_kv[det]", "sa_bwd_dq[det]")
                        for f in ("causal-normalized", "causal-plain", "all")}
    dots = {"sa_fwd": 3, "sa_bwd_kv": 5, "sa_bwd_kv[det]": 4, "sa_bwd_dq[det]": 3}
    for (kernel, features), r in got.items():
        want = 2 if (kernel, features) == ("sa_fwd", "causal-plain") else dots[kernel]
        assert r["dots_per_iter"] == want, (kernel, features, r)
        assert r["shared_bytes"] <= 232448 and r["spill_bytes"] <= (256 if features == "all" else 0), r


# ---------------------------------------------------------------------------------------------------------------------
# the self-test that guards a GPU the kernel has not met (here under the interpreter, kernels broken on purpose)


@pytest.fixture
def selftest(monkeypatch: pytest.MonkeyPatch):
    from sasoftmax.attention.backends.triton import selftest as st

    monkeypatch.setattr(st, "ON_INTERPRETER", True)
    st.clear()
    yield st
    st.clear()


def _broken(how: str, kind: str):
    """A launch hook that breaks the kernel ``kind``: a compile error, or a forward whose output is off by 25%."""
    def hook(k: str, fn, grid, args, kwargs) -> None:
        if how == "compile" and k == kind:
            raise RuntimeError("CompilationError: broken on purpose")
        fn[grid](*args, **kwargs)
        if how == "wrong" and k == kind:
            args[3].mul_(1.25)  # the forward's output
    return hook


def test_selftest_checks_each_kind_of_call_once(selftest, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    real = selftest._run
    monkeypatch.setattr(selftest, "_run", lambda inp: runs.append(1) or real(inp))
    q, k, v = qkv(Nq=20)
    for _ in range(3):
        sa_attention(q, k, v, is_causal=True, backend="triton").sum().backward()
    assert runs == [1]
    with torch.no_grad():  # inference only: another kind (no backward kernels)
        sa_attention(q, k, v, is_causal=True, backend="triton")
    assert runs == [1, 1]


@pytest.mark.parametrize("how,kind", [("wrong", "fwd"), ("compile", "kv")])
def test_selftest_catches_a_broken_kernel_and_auto_falls_back(selftest, how: str, kind: str,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    import logging

    from sasoftmax.attention import backends

    # auto offers CPU tensors to triton first, as it does CUDA tensors on a GPU
    monkeypatch.setattr(backends, "REGISTRY", [dataclasses.replace(b, devices=("cpu",)) if b.name == "triton" else b
                                               for b in backends.REGISTRY])
    monkeypatch.setattr(tb, "LAUNCH_HOOK", _broken(how, kind))
    q, k, v = qkv(Nq=20)
    with caplog.at_level(logging.WARNING, logger="sasoftmax.attention"):
        out = sa_attention(q, k, v, is_causal=True)
        sa_attention(q, k, v, is_causal=True).sum().backward()
    notes = [r.getMessage() for r in caplog.records if "self-test" in r.getMessage()]
    assert len(notes) == 1 and ("differs" if how == "wrong" else "broken on purpose") in notes[0], notes
    torch.testing.assert_close(out, sa_attention(q, k, v, is_causal=True, backend="cpp"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: .*(differs|broken on purpose)"):
        sa_attention(q, k, v, is_causal=True, backend="triton")
    monkeypatch.setenv("SASOFTMAX_TRITON_SELFTEST", "0")  # trusted again: the broken kernel's own (wrong) output
    if how == "wrong":
        with torch.no_grad():
            bad = sa_attention(q, k, v, is_causal=True, backend="triton")
        torch.testing.assert_close(bad, 1.25 * out, rtol=1e-5, atol=1e-6)

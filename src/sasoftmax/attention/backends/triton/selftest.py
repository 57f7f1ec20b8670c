"""A safety net for the Triton kernel on a GPU it has not met: check each kind of call once before trusting it.

The first Triton call of each *kind* (dtype, padded head dims, and the feature set: causal, normalized form and
range mode, bool mask, float mask, bias and its gradient, ALiBi, window, soft-capping, dropout, grouped-query heads,
backward path)
runs the kernel on a tiny problem with the same features and compares its output and gradients with the chunked
backend (the accuracy rule of ``docs/contract.md``: at most 2x the chunked backend's own error against float64, plus
a rounding floor). A compile error or a mismatch makes :func:`reason` return why, for that kind, for the rest of the
process: ``backend="auto"`` then logs one warning and uses the chunked backend, ``backend="triton"`` raises with the
reason. A kind that passed is not checked again.

It runs on CUDA (``SASOFTMAX_TRITON_SELFTEST=0`` turns it off); under ``TRITON_INTERPRET`` only when
:data:`ON_INTERPRETER` is set (the tests do, to check the net itself). Inside ``torch.compile`` tracing no kernel can
run, so a kind not yet checked is taken as good there (an eager call checks it first).
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import Tensor

from ....env import flag
from ...inputs import AttentionInputs

__all__ = ["reason", "kind_of", "enabled", "ON_INTERPRETER", "clear"]

log = logging.getLogger("sasoftmax.attention")

ON_INTERPRETER = False
"""Run the self-test under the Triton interpreter too (off: there the tests check the kernels directly)."""

_RESULTS: dict[tuple, str | None] = {}
_LOCK = threading.Lock()
_RUNNING = threading.local()  # set while this thread runs a self-test (its own triton calls are not checked)
_N_GPU = 150  # tiny problem: spans two of the GPU tiles (64 / 128 rows) with a partial one
_N_INTERPRET = 37  # ... and three of the interpreter's 16-row tiles


def enabled(inp: AttentionInputs) -> bool:
    from . import INTERPRET

    if not flag("SASOFTMAX_TRITON_SELFTEST"):
        return False
    return inp.q.is_cuda or (INTERPRET and ON_INTERPRETER)


def _needs(inp: AttentionInputs) -> tuple[bool, bool, bool, bool]:
    """Which of q, k, v, bias this call differentiates (none outside grad mode)."""
    grad = torch.is_grad_enabled()

    def need(t: Tensor | None) -> bool:
        return bool(grad and t is not None and t.requires_grad)

    return need(inp.q), need(inp.k), need(inp.v), need(inp.bias)


def kind_of(inp: AttentionInputs) -> tuple:
    """What distinguishes the kernels a call compiles and the paths it takes."""
    from . import block_dim, deterministic

    return (str(inp.q.device), inp.q.dtype, block_dim(inp.q.shape[-1]), block_dim(inp.v.shape[-1]),
            inp.is_causal, inp.normalize, inp.detach_range, inp.keep is not None and inp.mask_add is None,
            inp.mask_add is not None, inp.bias is not None, inp.alibi_slopes is not None, inp.window is not None,
            inp.softcap is not None, inp.dropout_p > 0, inp.groups > 1, _needs(inp), deterministic())


_NAMES = ("device", "dtype", "head dim", "value head dim", "causal", "normalize", "detach_range", "bool mask",
          "float mask", "bias", "alibi", "window",
          "softcap", "dropout", "gqa", "gradients of (q, k, v, bias)", "deterministic")


def clear() -> None:
    """Forget every result (the tests use it)."""
    with _LOCK:
        _RESULTS.clear()


def reason(inp: AttentionInputs) -> str | None:
    """None if the kernel passed (or needs no) self-test for this kind of call, else why it failed."""
    if getattr(_RUNNING, "active", False) or not enabled(inp):
        return None  # (the self-test's own calls)
    key = kind_of(inp)
    if key in _RESULTS:
        return _RESULTS[key]
    if torch.compiler.is_compiling():
        return None
    with _LOCK:
        if key not in _RESULTS:
            _RUNNING.active = True
            try:
                _RESULTS[key] = _run(inp)
            finally:
                _RUNNING.active = False
            if _RESULTS[key] is not None:
                what = ", ".join(f"{n}={v}" for n, v in zip(_NAMES, key, strict=True) if v is not False)
                log.warning("sasoftmax: the Triton SA kernel failed its self-test (%s): %s; backend='auto' uses the "
                            "chunked backend for such calls", what, _RESULTS[key])
        return _RESULTS[key]


def _problem(inp: AttentionInputs, n: int, dtype: torch.dtype) -> tuple[list[Tensor], dict]:
    """Tiny leaves ``[q, k, v, bias?]`` in ``dtype`` with the features of ``inp`` (fixed seeds), and the other
    arguments of the call."""
    dev = inp.q.device
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=dev, dtype=dtype)

    hq, hkv = (2, 1) if inp.groups > 1 else (1, 1)
    leaves = [randn(1, hq, n, inp.q.shape[-1], std=1.5), randn(1, hkv, n, inp.k.shape[-1], std=1.5),
              randn(1, hkv, n, inp.v.shape[-1])]
    kw: dict = dict(is_causal=inp.is_causal, normalize=inp.normalize, detach_range=inp.detach_range,
                    dropout_p=inp.dropout_p)
    if inp.mask_add is not None:  # a float mask: offsets and -inf entries
        m = torch.randn(1, 1, n, n, generator=g)
        m[torch.rand(1, 1, n, n, generator=g) < 0.2] = float("-inf")
        m[..., 3, :] = float("-inf")  # a fully masked row
        kw["attn_mask"] = m.to(dev)
    elif inp.keep is not None:
        keep = torch.rand(1, 1, n, n, generator=g) > 0.2
        keep[..., 3, :] = False
        kw["attn_mask"] = keep.to(dev)
    if inp.bias is not None:
        leaves.append(randn(1, hq, n, n, std=0.7))
    if inp.alibi_slopes is not None:
        kw["alibi_slopes"] = torch.tensor([0.5, 0.125][:hq], device=dev)
    if inp.window is not None:  # the same bounded sides, short enough that rows skip key blocks of the problem
        kw["window"] = tuple(-1 if side < 0 else min(side, n // 3) for side in inp.window)
    if inp.softcap is not None:
        kw["softcap"] = 2.0
    return leaves, kw


def _results(inp: AttentionInputs, backend: str, dtype: torch.dtype, n: int) -> list[Tensor]:
    """Output and the gradients the call needs, of the tiny problem through ``backend`` in ``dtype``."""
    from ...api import sa_attention

    leaves, kw = _problem(inp, n, dtype)
    needs = _needs(inp)
    for t, need in zip(leaves, needs, strict=False):
        t.requires_grad_(need)
    gen = torch.Generator().manual_seed(7) if inp.dropout_p > 0 else None
    with torch.set_grad_enabled(any(needs)):
        out = sa_attention(*leaves[:3], bias=leaves[3] if len(leaves) > 3 else None, generator=gen,
                           backend=backend, **kw)
        used = [t for t in leaves if t.requires_grad]
        if not used:
            return [out.detach()]
        g = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
        return [out.detach(), *torch.autograd.grad(out, used, g)]


def _run(inp: AttentionInputs) -> str | None:
    from . import INTERPRET

    dtype = inp.q.dtype
    n = _N_INTERPRET if INTERPRET else _N_GPU
    try:
        fast = _results(inp, "triton", dtype, n)
        if inp.q.is_cuda:
            torch.cuda.synchronize(inp.q.device)
    except Exception as err:  # noqa: BLE001 - a compile or launch failure of any kind means: do not use it here
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return f"the kernel failed: {type(err).__name__}: {first}"
    ref = _results(inp, "chunked", dtype, n)
    exact = _results(inp, "chunked", torch.float64, n)
    rel = 4e-6 if dtype == torch.float32 else (1e-4 if dtype == torch.float16 else 1e-3)
    names = ["output", *(n for n, need in zip(("dq", "dk", "dv", "dbias"), _needs(inp), strict=True) if need)]
    for name, f, r, e in zip(names, fast, ref, exact, strict=True):
        e = e.double()
        if not torch.isfinite(f).all():
            return f"non-finite {name} where the chunked backend's is finite"
        error, error_ref = float((f.double() - e).abs().max()), float((r.double() - e).abs().max())
        floor = rel * max(1.0, float(e.abs().max())) * max(1, inp.groups)  # (dk/dv of a shared head: G terms)
        if error > 2 * error_ref + floor:
            return (f"its {name} differs from the chunked backend's (error {error:.3g} against float64, the "
                    f"chunked backend's {error_ref:.3g})")
    return None

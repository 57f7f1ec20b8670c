"""The non-finite contract (docs/contract.md, "Non-finite inputs") on every backend.

A NaN or inf in a row of q, k or v must reach every output element and gradient that depends on it through a
visible (query, key) pair, never come out as a silent 0, and a non-finite query row must leave the other rows of the
output and of dq finite. The required sets are derived from the visibility pattern alone (below) and checked
against the float64 oracle as well as against every backend.
"""

from __future__ import annotations

import pytest
import torch
from support.reference64 import oracle_attention

from sasoftmax import sa_attention
from sasoftmax.attention import prepare
from sasoftmax.attention.backends import triton as triton_backend

BACKENDS = ["reference", "chunked", "cpp", "auto"]
if triton_backend.unsupported_reason(prepare(*[torch.zeros(1, 1, 2, 4)] * 3)) is None:  # (the interpreter counts)
    BACKENDS.append("triton")


def _visibility(nq: int, nk: int, causal: bool, keep: torch.Tensor | None) -> torch.Tensor:
    vis = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        vis &= torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
    if keep is not None:
        vis &= keep
    return vis


def _required(where: str, row: int, vis: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool per output row / gradient row: True where the contract requires a non-finite value."""
    bad_rows = torch.zeros(vis.shape[0], dtype=torch.bool)
    if where == "q":
        bad_rows[row] = True
    else:
        bad_rows = vis[:, row].clone()
    keys = vis[bad_rows].any(dim=0)  # keys seen by a row that went non-finite: their dk (and, for q/k, dv)
    dk = keys.clone()
    if where == "k":
        dk[row] |= bool(bad_rows.any())
    dv = keys.clone() if where in ("q", "k") else torch.zeros_like(keys)
    return {"out": bad_rows, "dq": bad_rows, "dk": dk, "dv": dv}


def _run(backend: str, q, k, v, dtype, **kw) -> dict[str, torch.Tensor]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if backend == "oracle":
        out, _ = oracle_attention(*leaves, **kw)
    else:
        out = sa_attention(*leaves, backend=backend, **kw)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad(out, leaves, g)
    return {n: ~torch.isfinite(t[0, 0]).all(dim=-1) for n, t in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                                                      strict=True)}


@pytest.mark.parametrize("backend", ["oracle", *BACKENDS])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain"])
@pytest.mark.parametrize("mask", ["none", "causal", "bool"])
def test_nonfinite_reaches_what_sees_it(backend, where, value, normalize, mask):
    nq = nk = 12
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen, dtype=torch.float64) for n in (nq, nk, nk))
    row = 5
    {"q": q, "k": k, "v": v}[where][0, 0, row] = value
    keep = None
    kw: dict = {"normalize": normalize, "is_causal": mask == "causal"}
    if mask == "bool":
        keep = torch.rand(nq, nk, generator=gen) > 0.3
        keep[:, 0] = True
        kw["attn_mask"] = keep
    got = _run(backend, q, k, v, torch.float64 if backend == "oracle" else torch.float32, **kw)
    need = _required(where, row, _visibility(nq, nk, mask == "causal", keep))
    for name, req in need.items():
        missing = (req & ~got[name]).nonzero().flatten().tolist()
        assert not missing, f"{backend}: {name} rows {missing} are finite but see the {where} row's {value}"
    if where == "q":  # one diverging query row leaves the others finite
        for name in ("out", "dq"):
            extra = (got[name] & ~need[name]).nonzero().flatten().tolist()
            assert not extra, f"{backend}: {name} rows {extra} went non-finite from another query row"

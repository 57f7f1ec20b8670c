"""The torch.compile'd tile math (used automatically for large CPU calls) must agree with the eager tile math."""

from __future__ import annotations

import pytest
import torch

from sasoftmax import sa_attention
from sasoftmax.attention import chunked

pytest.importorskip("torch._inductor")


@pytest.mark.parametrize(
    ("normalize", "detach_range", "masked"),
    [(True, False, True), (False, False, False)],
)
def test_compiled_tile_math_matches_eager(monkeypatch, normalize, detach_range, masked):
    torch.manual_seed(0)
    B, H, Hkv, N, D = 2, 4, 2, 24, 8
    q = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., -5:] = False  # padding in the first sequence
    kw = dict(is_causal=masked, normalize=normalize, detach_range=detach_range, backend="chunked")
    results = []
    for mode in ("never", "always"):
        monkeypatch.setenv("SASOFTMAX_COMPILE", mode)
        o = sa_attention(q, k, v, mask, **kw)
        grads = torch.autograd.grad((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum(), (q, k, v))
        results.append((o, *grads))
    if chunked._COMPILE_BROKEN:
        pytest.skip("torch.compile is not usable on this machine")
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def test_compile_mode_is_validated(monkeypatch):
    monkeypatch.setenv("SASOFTMAX_COMPILE", "sometimes")
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="SASOFTMAX_COMPILE"):
        sa_attention(q, q, q, backend="chunked")

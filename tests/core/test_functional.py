"""sa_softmax (the tensor function) against the independent float64 oracle and the paper's claims."""

from __future__ import annotations

import pytest
import torch
from support.reference64 import oracle_sa_softmax

from sasoftmax import sa_softmax

FORMS = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="normalized"),
    pytest.param(True, True, id="normalized-detach"),
]


def _x(*shape: int, seed: int = 0, scale: float = 2.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("normalize,detach_range", FORMS)
@pytest.mark.parametrize(
    "shape,dim", [((7,), -1), ((3, 5), -1), ((3, 5), 0), ((2, 4, 6), 1), ((2, 4, 6), -3), ((2, 3, 1), -1)]
)
def test_values_and_gradients_match_oracle(shape, dim, normalize, detach_range):
    x = _x(*shape, seed=len(shape) * 10 + dim).requires_grad_()
    y = sa_softmax(x, dim, normalize=normalize, detach_range=detach_range)
    ref = oracle_sa_softmax(x, dim, normalize=normalize, detach_range=detach_range)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, atol=1e-13, rtol=1e-11)
    g = _x(*shape, seed=99)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("normalize,detach_range", FORMS)
@pytest.mark.parametrize(
    "mask_shape,dim",
    [((4, 6), -1), ((1, 6), -1), ((4, 1), 0), ((6,), -1), ((1, 1), -1), ((4, 6), 0)],
)
def test_masks_broadcast(mask_shape, dim, normalize, detach_range):
    """A bool mask broadcastable to x: masked entries get exactly 0, take no part in softmax/min/max."""
    x = _x(4, 6, seed=3).requires_grad_()
    mask = torch.rand(*mask_shape, generator=torch.Generator().manual_seed(4)) > 0.35
    if mask.numel() > 1:
        mask.view(-1)[0] = False
        mask.view(-1)[-1] = True
    y = sa_softmax(x, dim, mask=mask, normalize=normalize, detach_range=detach_range)
    ref = oracle_sa_softmax(x, dim, mask=mask, normalize=normalize, detach_range=detach_range)
    torch.testing.assert_close(y, ref, atol=1e-13, rtol=1e-11)
    assert (y.detach()[~mask.expand(x.shape)] == 0).all()
    g = _x(4, 6, seed=5)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, atol=1e-12, rtol=1e-10)
    assert (gx[~mask.expand(x.shape)] == 0).all()


def test_masked_entries_do_not_change_visible_weights():
    """Changing the value of a masked entry (even to +-1e30) changes nothing: it is not in the softmax or min/max."""
    x = _x(3, 5, seed=6)
    mask = torch.tensor([True, True, False, True, False])
    base = sa_softmax(x, mask=mask)
    for fill in (1e30, -1e30, 0.0, float("inf"), float("-inf")):
        x2 = x.clone()
        x2[:, ~mask] = fill
        torch.testing.assert_close(sa_softmax(x2, mask=mask), base, atol=0, rtol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_fully_masked_row_is_zero_with_zero_gradient(normalize):
    x = _x(3, 4, seed=7).requires_grad_()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    y = sa_softmax(x, mask=mask, normalize=normalize)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all() and (gx[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_half_inputs_compute_in_float32(dtype, normalize):
    """Half inputs: the row math runs in float32 and the result is cast back to the input dtype."""
    x = _x(4, 33, seed=8, scale=4.0, dtype=dtype)
    mask = torch.rand(1, 33, generator=torch.Generator().manual_seed(9)) > 0.2
    y = sa_softmax(x, mask=mask, normalize=normalize)
    assert y.dtype == dtype
    want = sa_softmax(x.float(), mask=mask, normalize=normalize).to(dtype)
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    ref = oracle_sa_softmax(x, mask=mask, normalize=normalize)
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_finite_and_close(dtype):
    x = _x(3, 17, seed=10, scale=3.0, dtype=dtype).requires_grad_()
    y = sa_softmax(x)
    g = _x(3, 17, seed=11)
    (gx,) = torch.autograd.grad(y, x, g.to(dtype))
    assert gx.dtype == dtype and torch.isfinite(gx).all()
    (gr,) = torch.autograd.grad(oracle_sa_softmax(x), x, g)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(gx.double(), gr.double(), atol=tol * gr.abs().max().item(), rtol=tol)


def test_float32_close_to_oracle():
    x = _x(5, 40, seed=12, scale=5.0, dtype=torch.float32).requires_grad_()
    for normalize in (True, False):
        y = sa_softmax(x, normalize=normalize)
        ref = oracle_sa_softmax(x, normalize=normalize)
        torch.testing.assert_close(y.double(), ref, atol=1e-6, rtol=1e-5)


def test_normalized_range_and_plain_sign():
    """Normalized weights lie in [0, 1] with row sums <= 1; plain weights go negative for negative scores."""
    x = _x(50, 12, seed=13, scale=6.0)
    w = sa_softmax(x)
    assert (w >= 0).all() and (w <= 1).all()
    assert (w.sum(-1) <= 1 + 1e-12).all()
    assert (w.sum(-1) < 1 - 1e-3).any()  # not renormalized
    plain = sa_softmax(x, normalize=False)
    assert (plain < 0).any()
    neg = x < 0
    assert (plain[neg] <= 0).all() and (plain[~neg] >= 0).all()


def test_normalized_formula_on_a_hand_example():
    """Hand-checked row: s = [2, -1, 0.5]; a = -1, b = 2, c = 1/3; w = (s + 1)/3 * softmax(s)."""
    s = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    p = torch.exp(s) / torch.exp(s).sum()
    want = torch.stack([3.0 / 3 * p[0], 0.0 * p[1], 1.5 / 3 * p[2]])
    torch.testing.assert_close(sa_softmax(s, eps=1e-300), want, atol=1e-15, rtol=0)
    # all-positive row: a = 0, so the smallest entry keeps a positive weight
    s = torch.tensor([1.0, 3.0], dtype=torch.float64)
    p = torch.softmax(s, 0)
    torch.testing.assert_close(sa_softmax(s, eps=1e-300), s / 3.0 * p, atol=1e-15, rtol=0)
    torch.testing.assert_close(sa_softmax(s, normalize=False), s * p, atol=1e-15, rtol=0)


def test_eps_enters_the_denominator():
    s = torch.tensor([1.0, -2.0, 0.25], dtype=torch.float64)
    p = torch.softmax(s, 0)
    torch.testing.assert_close(sa_softmax(s, eps=1.0), (s + 2.0) / 4.0 * p, atol=1e-15, rtol=0)


def _jacobian_diag_at_argmax(fn, row: torch.Tensor) -> float:
    x = row.clone().requires_grad_()
    y = fn(x)
    i = int(torch.argmax(row))
    (g,) = torch.autograd.grad(y[i], x)
    return g[i].abs().item()


def test_saturated_row_gradient_does_not_vanish():
    """The paper's motivation: on a saturated row softmax's gradient is ~0; SA-Softmax's (plain, and normalized
    with the range held fixed, where it tends to c = 1/(b - a)) is not."""
    row = torch.tensor([30.0, 0.5, -0.3, 0.1, 0.0, -1.0], dtype=torch.float64)
    soft = _jacobian_diag_at_argmax(lambda x: torch.softmax(x, -1), row)
    plain = _jacobian_diag_at_argmax(lambda x: sa_softmax(x, normalize=False), row)
    detached = _jacobian_diag_at_argmax(lambda x: sa_softmax(x, detach_range=True), row)
    assert soft < 1e-11
    assert plain / soft > 1e10 and plain == pytest.approx(1.0, rel=1e-6)
    assert detached / soft > 1e9 and detached == pytest.approx(1.0 / 31.0, rel=1e-6)
    # a whole-row loss: softmax's gradient norm is ~0, SA-Softmax's is not
    g = torch.tensor([1.0, -0.5, 0.25, 0.3, -0.2, 0.7], dtype=torch.float64)
    norms = {}
    for name, fn in (
        ("soft", lambda x: torch.softmax(x, -1)),
        ("plain", lambda x: sa_softmax(x, normalize=False)),
        ("detached", lambda x: sa_softmax(x, detach_range=True)),
    ):
        x = row.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x), x, g)
        norms[name] = gx.norm().item()
    assert norms["plain"] / norms["soft"] > 1e6
    assert norms["detached"] / norms["soft"] > 1e6


def test_range_differentiated_argmax_self_gradient_equals_softmax():
    """contract.md: with the range differentiated, the arg-max key's factor is identically 1, so its own gradient is
    vanilla softmax's p (1 - p)."""
    row = torch.tensor([3.0, 0.5, -1.3, 0.1], dtype=torch.float64)
    soft = _jacobian_diag_at_argmax(lambda x: torch.softmax(x, -1), row)
    sa = _jacobian_diag_at_argmax(lambda x: sa_softmax(x), row)
    assert sa == pytest.approx(soft, rel=1e-8)
    detached = _jacobian_diag_at_argmax(lambda x: sa_softmax(x, detach_range=True), row)
    assert abs(detached - soft) > 1e-2

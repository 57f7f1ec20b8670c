"""Positional encodings checked against their formulas, computed here independently with plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from sasoftmax.positional import (
    FIRE,
    ALiBi,
    KerpleLog,
    KerplePower,
    NoPE,
    PositionalEncoding,
    RoPE,
    alibi_slopes,
    build_positional,
    get_positional,
    list_positionals,
    register_positional,
    unregister_positional,
)

BUILTINS = ["alibi", "fire", "kerple_log", "kerple_power", "nope", "rope"]


# ---------------------------------------------------------------------------------------------------------- RoPE


def _rotate_direct(x: list[float], pos: int, base: float = 10000.0) -> list[float]:
    """Rotate each pair (x[t], x[t + D/2]) by the angle pos * base^(-2t/D) with an explicit 2-D rotation matrix."""
    d = len(x)
    out = list(x)
    for t in range(d // 2):
        theta = pos * base ** (-2.0 * t / d)
        a, b = x[t], x[t + d // 2]
        out[t] = math.cos(theta) * a - math.sin(theta) * b
        out[t + d // 2] = math.sin(theta) * a + math.cos(theta) * b
    return out


@pytest.mark.parametrize("offset", [0, 5])
def test_rope_matches_per_pair_rotation(offset):
    torch.manual_seed(0)
    d, nq, nk = 8, 3, 6
    rope = RoPE(n_head=2, head_dim=d, block_size=16)
    q = torch.randn(1, 2, nq, d, dtype=torch.float64)
    k = torch.randn(1, 1, nk, d, dtype=torch.float64)
    rq, rk = rope.rotate(q, k, offset=offset)
    assert rq.dtype == q.dtype and rk.shape == k.shape
    for h in range(2):
        for i in range(nq):
            want = _rotate_direct(q[0, h, i].tolist(), offset + nk - nq + i)  # queries bottom-right aligned
            torch.testing.assert_close(rq[0, h, i], torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    for j in range(nk):
        want = _rotate_direct(k[0, 0, j].tolist(), offset + j)
        torch.testing.assert_close(rk[0, 0, j], torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    d = 16
    rope = RoPE(1, d, 8)
    qv, kv = torch.randn(d), torch.randn(d)
    # the same vectors at positions (m, n) and (m + s, n + s) give the same dot product
    dots = []
    for shift in (0, 7, 100):
        rq = rope.rotate_at(qv[None, None, :], torch.tensor([10.0 + shift]))
        rk = rope.rotate_at(kv[None, None, :], torch.tensor([3.0 + shift]))
        dots.append(float((rq * rk).sum()))
    assert dots[0] == pytest.approx(dots[1], abs=1e-4) and dots[0] == pytest.approx(dots[2], abs=1e-4)
    rq = rope.rotate_at(qv[None, None, :], torch.tensor([11.0]))
    rk = rope.rotate_at(kv[None, None, :], torch.tensor([3.0]))
    assert float((rq * rk).sum()) != pytest.approx(dots[0], abs=1e-4)


def test_rope_keeps_half_dtype_and_needs_even_dim():
    rope = RoPE(2, 8, 16)
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    rq, rk = rope.rotate(q, q)
    assert rq.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="head_dim"):
        RoPE(2, 7, 16)
    with pytest.raises(ValueError, match="head_dim"):
        rope.rotate_at(torch.randn(2, 6), torch.arange(2.0))


# ---------------------------------------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_power_of_two():
    want = [2.0**-1, 2.0**-2, 2.0**-3, 2.0**-4, 2.0**-5, 2.0**-6, 2.0**-7, 2.0**-8]
    assert alibi_slopes(8).tolist() == pytest.approx(want, rel=1e-6)
    assert alibi_slopes(4).tolist() == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], rel=1e-6)


def test_alibi_slopes_non_power_of_two():
    # H = 12: the 8 slopes of H = 8, then slopes 1, 3, 5, 7 of H = 16 (2^(-8h/16) = 2^(-h/2)).
    want = [2.0**-h for h in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    got = alibi_slopes(12)
    assert got.shape == (12,)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # H = 6: the 4 slopes of H = 4, then slopes 1, 3 of H = 8
    assert alibi_slopes(6).tolist() == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3], rel=1e-6)
    with pytest.raises(ValueError, match="n_head"):
        alibi_slopes(0)


def test_alibi_module_gives_slopes_not_bias():
    al = ALiBi(n_head=3, head_dim=4, block_size=8)
    assert al.bias(5, 5) is None
    slopes = al.alibi_slopes()
    assert slopes.dtype == torch.float32 and not slopes.requires_grad
    dense = al.dense_bias(3, 5)
    for h in range(3):
        for i in range(3):
            for j in range(5):
                assert float(dense[0, h, i, j]) == pytest.approx(-float(slopes[h]) * abs(5 - 3 + i - j), rel=1e-6)
    q = torch.randn(1, 3, 5, 4)
    assert al.rotate(q, q)[0] is q


# ---------------------------------------------------------------------------------------------------------- Kerple


@pytest.mark.parametrize("nq,nk", [(6, 6), (3, 7)])
def test_kerple_log_bias_formula(nq, nk):
    torch.manual_seed(2)
    ker = KerpleLog(n_head=3, head_dim=4, block_size=8)
    with torch.no_grad():
        ker.r1.copy_(torch.tensor([0.5, 1.7, -3.0]))  # -3 is clamped to eps
        ker.r2.copy_(torch.tensor([0.2, 0.9, 0.05]))
    b = ker.bias(nq, nk).detach()
    assert b.shape == (1, 3, nq, nk)
    r1 = [0.5, 1.7, 1e-2]
    r2 = [0.2, 0.9, 0.05]
    for h in range(3):
        for i in range(nq):
            for j in range(nk):
                dist = abs(nk - nq + i - j)
                want = -r1[h] * math.log(1 + r2[h] * dist)
                assert float(b[0, h, i, j]) == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("nq,nk", [(5, 5), (2, 6)])
def test_kerple_power_bias_formula(nq, nk):
    ker = KerplePower(n_head=3, head_dim=4, block_size=8)
    with torch.no_grad():
        ker.r1.copy_(torch.tensor([0.3, 1.2, 0.0]))  # 0 is clamped to eps
        ker.r2.copy_(torch.tensor([0.5, 1.5, 3.0]))  # 3 is clamped to 2
    b = ker.bias(nq, nk).detach()
    r1 = [0.3, 1.2, 1e-2]
    r2 = [0.5, 1.5, 2.0]
    for h in range(3):
        for i in range(nq):
            for j in range(nk):
                dist = abs(nk - nq + i - j)
                assert float(b[0, h, i, j]) == pytest.approx(-r1[h] * dist ** r2[h], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("cls", [KerpleLog, KerplePower])
def test_kerple_gradients_reach_parameters(cls):
    torch.manual_seed(3)
    ker = cls(n_head=4, head_dim=8, block_size=8)
    assert bool((ker.r1 >= ker.eps).all()) and bool((ker.r2 >= ker.eps).all())  # init inside the clamp range
    b = ker.bias(6, 6)
    (b * torch.randn_like(b)).sum().backward()
    for p in (ker.r1, ker.r2):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert bool((p.grad != 0).all())


# ---------------------------------------------------------------------------------------------------------- FIRE


def _fire_direct(fire: FIRE, nq: int, nk: int) -> list:
    """FIRE's bias by hand: psi(max(i-j,0)) / psi(max(L, i)) through the MLP written out with Python floats."""
    w1 = fire.mlp[0].weight[:, 0].tolist()
    b1 = fire.mlp[0].bias.tolist()
    w2 = fire.mlp[2].weight.tolist()
    b2 = fire.mlp[2].bias.tolist()
    c = max(fire.c.item(), 1e-4)
    L = max(fire.L_scale.item() * fire.block_size, 1.0)
    out = [[[0.0] * nk for _ in range(nq)] for _ in range(fire.n_head)]
    for i in range(nq):
        qpos = nk - nq + i
        for j in range(nk):
            rel = max(qpos - j, 0)
            x = math.log(c * rel + 1) / math.log(c * max(L, qpos) + 1)
            hidden = [max(0.0, w1[u] * x + b1[u]) for u in range(len(w1))]
            for h in range(fire.n_head):
                out[h][i][j] = sum(w2[h][u] * hidden[u] for u in range(len(hidden))) + b2[h]
    return out


@pytest.mark.parametrize("nq,nk", [(7, 7), (3, 9)])
def test_fire_bias_formula(nq, nk):
    torch.manual_seed(4)
    fire = FIRE(n_head=2, head_dim=4, block_size=4)  # L = 4 < some query positions: both branches of max(L, i)
    with torch.no_grad():
        fire.c.fill_(0.3)
        fire.L_scale.fill_(1.25)  # L = 5
    b = fire.bias(nq, nk).detach()
    assert b.shape == (1, 2, nq, nk) and b.dtype == torch.float32
    want = torch.tensor(_fire_direct(fire, nq, nk))
    torch.testing.assert_close(b[0], want, atol=1e-5, rtol=1e-5)
    # the blocked evaluation used without grad gives the same numbers
    fire._block_values = 2 * nk * fire.hidden  # two rows per block
    with torch.no_grad():
        torch.testing.assert_close(fire.bias(nq, nk)[0], want, atol=1e-5, rtol=1e-5)


def test_fire_init_and_gradients():
    torch.manual_seed(5)
    fire = FIRE(n_head=3, head_dim=4, block_size=6)
    assert fire.c.item() == pytest.approx(0.1)
    assert fire.threshold.item() == pytest.approx(6.0)
    b = fire.bias(10, 10)  # positions 0..9 straddle L = 6
    (b * torch.randn_like(b)).sum().backward()
    for name, p in fire.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name
    # reset_parameters restores c and L
    with torch.no_grad():
        fire.c.fill_(2.0)
        fire.L_scale.fill_(3.0)
    fire.reset_parameters()
    assert fire.c.item() == pytest.approx(0.1) and fire.threshold.item() == pytest.approx(6.0)


# ---------------------------------------------------------------------------------------------------------- all


@pytest.mark.parametrize("name", BUILTINS)
def test_every_encoding_extrapolates_and_is_finite(name):
    pe = build_positional(name, n_head=4, head_dim=8, block_size=8)
    assert isinstance(pe, PositionalEncoding)
    n = 40  # 5x the training length
    q = torch.randn(1, 4, n, 8)
    rq, rk = pe.rotate(q, q)
    assert rq.shape == q.shape and bool(torch.isfinite(rq).all())
    b = pe.bias(n, n)
    if b is not None:
        assert b.shape == (1, 4, n, n) and bool(torch.isfinite(b).all())
    s = pe.alibi_slopes()
    if s is not None:
        assert s.shape == (4,)
    provided = (rq is not q) + (b is not None) + (s is not None)
    assert provided == (0 if name == "nope" else 1)


def test_nope_is_identity():
    pe = NoPE(2, 4, 8)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    assert pe.rotate(q, k) == (q, k) and pe.bias(3, 3) is None and pe.alibi_slopes() is None


def test_registry():
    assert set(BUILTINS) <= set(list_positionals())
    with pytest.raises(ValueError, match="rope"):
        get_positional("no_such_pe")
    with pytest.raises(ValueError, match="already registered"):
        register_positional("rope", RoPE)
    with pytest.raises(TypeError, match="factory"):
        register_positional("bad_pe", 3)  # type: ignore[arg-type]

    class Half(PositionalEncoding):
        def bias(self, nq, nk, *, device=None):
            return torch.full((1, self.n_head, nq, nk), 0.5)

    entry = register_positional("test_half", Half, "constant bias")
    try:
        assert "test_half" in list_positionals() and get_positional("test_half") is entry
        pe = build_positional("test_half", 2, 4, 8)
        assert pe.bias(2, 2).sum().item() == pytest.approx(4.0)
    finally:
        unregister_positional("test_half")
    assert "test_half" not in list_positionals()
    with pytest.raises(ValueError, match="test_half"):
        unregister_positional("test_half")
    register_positional("test_bad", lambda h, d, b: torch.nn.Linear(1, 1))
    try:
        with pytest.raises(TypeError, match="PositionalEncoding"):
            build_positional("test_bad", 2, 4, 8)
    finally:
        unregister_positional("test_bad")


def test_constructor_validates_sizes():
    with pytest.raises(ValueError, match="n_head"):
        KerpleLog(0, 4, 8)
    with pytest.raises(ValueError, match="block_size"):
        FIRE(2, 4, -1)


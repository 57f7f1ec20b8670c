"""The chunked backend's multi-threaded tile schedule (used for large CPU calls) must give what the sequential one
gives: outputs and every gradient, including a bias shared between tiles of different threads."""

from __future__ import annotations

import pytest
import torch

from sasoftmax import sa_attention
from sasoftmax.attention.backends import chunked


@pytest.fixture
def two_threads(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _run(q, k, v, bias, mask, **kw):
    o = sa_attention(q, k, v, mask, bias=bias, backend="chunked", **kw)
    weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    return (o, *torch.autograd.grad((o * weights).sum(), (q, k, v, bias)))


@pytest.mark.parametrize("normalize", [True, False])
def test_threaded_tiles_match_sequential(monkeypatch, two_threads, normalize):
    torch.manual_seed(0)
    B, H, Hkv, N, D = 3, 4, 2, 40, 8
    q = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, H, N, N, dtype=torch.float64, requires_grad=True)  # shared by every batch entry
    mask = torch.rand(B, 1, 1, N) > 0.2
    kw = dict(is_causal=True, normalize=normalize, dropout_p=0.1, generator=torch.Generator().manual_seed(3))
    # small tiles so that every (batch, kv-head) group is its own tile group
    monkeypatch.setattr(chunked, "DEFAULT_TILE_ELEMENTS", 8 * N)
    monkeypatch.setattr(chunked, "MIN_TILE_ROWS", 8)
    monkeypatch.setattr(chunked, "PARALLEL_MIN_SCORES", 1 << 62)
    seq = _run(q, k, v, bias, mask, **{**kw, "generator": torch.Generator().manual_seed(3)})
    monkeypatch.setattr(chunked, "PARALLEL_MIN_SCORES", 0)
    calls = []
    real = chunked._for_each_tile

    def spy(fn, tiles, inp, workers=None):
        calls.append(chunked._workers(tiles, inp))
        return real(fn, tiles, inp, workers)

    monkeypatch.setattr(chunked, "_for_each_tile", spy)
    par = _run(q, k, v, bias, mask, **{**kw, "generator": torch.Generator().manual_seed(3)})
    assert calls and max(calls) == 2, "the threaded schedule was not used"
    assert torch.get_num_threads() == 2, "torch's thread count was not restored"
    for a, b in zip(seq, par, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_tile_threads_env_caps_and_is_validated(monkeypatch, two_threads):
    monkeypatch.setattr(chunked, "PARALLEL_MIN_SCORES", 0)
    monkeypatch.setattr(chunked, "DEFAULT_TILE_ELEMENTS", 64)
    monkeypatch.setattr(chunked, "MIN_TILE_ROWS", 4)
    q = torch.randn(2, 2, 16, 4)
    from sasoftmax.attention import prepare

    inp = prepare(q, q, q)
    tiles = chunked.plan_tiles(inp)
    assert chunked._workers(tiles, inp) == 2
    monkeypatch.setenv("SASOFTMAX_TILE_THREADS", "1")
    assert chunked._workers(tiles, inp) == 1
    monkeypatch.setenv("SASOFTMAX_TILE_THREADS", "many")
    with pytest.raises(ValueError, match="SASOFTMAX_TILE_THREADS"):
        sa_attention(q, q, q, backend="chunked")

"""Bad input raises TypeError/ValueError whose message names the offending argument, on every backend."""

from __future__ import annotations

import pytest
import torch
from support.helpers import BACKENDS, qkv

from sasoftmax import sa_attention, sa_attention_with_weights, sa_softmax

ENTRY_POINTS = BACKENDS + ["auto", "with_weights"]


def _call(entry: str, *args, **kwargs):
    if entry == "with_weights":
        return sa_attention_with_weights(*args, **kwargs)
    return sa_attention(*args, backend=entry, **kwargs)


BAD_CALLS = {
    # name: (exception, match, builder -> (args, kwargs))
    "q_3d": (ValueError, r"`q` must be 4-d", lambda q, k, v: ((q[0], k, v), {})),
    "k_5d": (ValueError, r"`k` must be 4-d", lambda q, k, v: ((q, k[None], v), {})),
    "v_2d": (ValueError, r"`v` must be 4-d", lambda q, k, v: ((q, k, v[0, 0]), {})),
    "q_not_tensor": (TypeError, r"`q` must be a torch.Tensor", lambda q, k, v: ((q.tolist(), k, v), {})),
    "q_int": (TypeError, r"`q` must be float16", lambda q, k, v: ((q.long(), k, v), {})),
    "dtypes_differ": (TypeError, r"`q`, `k`, `v` must share one dtype", lambda q, k, v: ((q, k.double(), v), {})),
    "devices_differ": (ValueError, r"`q`, `k`, `v` must be on one device", lambda q, k, v: ((q, k.to("meta"), v), {})),
    "heads_do_not_divide": (
        ValueError,
        r"query heads \(3\) must be a multiple of key/value heads \(2\)",
        lambda q, k, v: ((torch.randn(2, 3, 3, 5), k, v), {}),
    ),
    "kv_heads_differ": (
        ValueError,
        r"`k` and `v` must have the same number of heads",
        lambda q, k, v: ((q, k, v[:, :1]), {}),
    ),
    "kv_len_differ": (
        ValueError,
        r"`k` and `v` must have the same sequence length",
        lambda q, k, v: ((q, k, v[:, :, :3]), {}),
    ),
    "head_dim_differ": (
        ValueError,
        r"`q` and `k` must have the same head_dim",
        lambda q, k, v: ((q, k[..., :4], v), {}),
    ),
    "batch_differ": (ValueError, r"batch sizes differ", lambda q, k, v: ((q, k[:1], v[:1]), {})),
    "mask_shape": (
        ValueError,
        r"`attn_mask` of shape",
        lambda q, k, v: ((q, k, v, torch.ones(3, 5, dtype=torch.bool)), {}),
    ),
    "mask_batch": (
        ValueError,
        r"`attn_mask` of shape",
        lambda q, k, v: ((q, k, v, torch.ones(3, 1, 1, 4, dtype=torch.bool)), {}),
    ),
    "mask_5d": (
        ValueError,
        r"`attn_mask` must have at most 4 dims",
        lambda q, k, v: ((q, k, v, torch.ones(1, 2, 2, 3, 4, dtype=torch.bool)), {}),
    ),
    "mask_int": (
        TypeError,
        r"`attn_mask` must be bool",
        lambda q, k, v: ((q, k, v, torch.ones(3, 4, dtype=torch.int64)), {}),
    ),
    "mask_list": (TypeError, r"`attn_mask` must be a tensor", lambda q, k, v: ((q, k, v, [[True] * 4] * 3), {})),
    "mask_nan": (
        ValueError,
        r"`attn_mask` contains NaN",
        lambda q, k, v: ((q, k, v, torch.tensor([0.0, float("nan"), 0.0, 0.0])), {}),
    ),
    "mask_requires_grad": (
        ValueError,
        r"`attn_mask` must not require grad",
        lambda q, k, v: ((q, k, v, torch.zeros(3, 4, requires_grad=True)), {}),
    ),
    "mask_device": (
        ValueError,
        r"`attn_mask` is on meta",
        lambda q, k, v: ((q, k, v, torch.ones(3, 4, dtype=torch.bool, device="meta")), {}),
    ),
    "dropout_negative": (
        ValueError,
        r"`dropout_p` must be in \[0, 1\)",
        lambda q, k, v: ((q, k, v), {"dropout_p": -0.1}),
    ),
    "dropout_one": (ValueError, r"`dropout_p` must be in \[0, 1\)", lambda q, k, v: ((q, k, v), {"dropout_p": 1.0})),
    "dropout_nan": (ValueError, r"`dropout_p`", lambda q, k, v: ((q, k, v), {"dropout_p": float("nan")})),
    "bias_shape": (ValueError, r"`bias` of shape", lambda q, k, v: ((q, k, v), {"bias": torch.randn(2, 2, 3, 5)})),
    "bias_heads": (ValueError, r"`bias` of shape", lambda q, k, v: ((q, k, v), {"bias": torch.randn(3, 1, 4)})),
    "bias_5d": (
        ValueError,
        r"`bias` must have at most 4 dims",
        lambda q, k, v: ((q, k, v), {"bias": torch.randn(1, 2, 2, 3, 4)}),
    ),
    "bias_int": (
        TypeError,
        r"`bias` must be a floating-point tensor",
        lambda q, k, v: ((q, k, v), {"bias": torch.ones(3, 4, dtype=torch.int64)}),
    ),
    "bias_device": (
        ValueError,
        r"`bias` is on meta",
        lambda q, k, v: ((q, k, v), {"bias": torch.ones(3, 4, device="meta")}),
    ),
    "alibi_shape": (
        ValueError,
        r"`alibi_slopes` must have shape",
        lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(3)}),
    ),
    "alibi_batch": (
        ValueError,
        r"`alibi_slopes` must have shape",
        lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(3, 2)}),
    ),
    "alibi_3d": (
        ValueError,
        r"`alibi_slopes` must have shape",
        lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(1, 2, 1)}),
    ),
    "alibi_requires_grad": (
        ValueError,
        r"`alibi_slopes` receive no gradient",
        lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(2, requires_grad=True)}),
    ),
    "alibi_int": (
        TypeError,
        r"`alibi_slopes` must be a floating-point tensor",
        lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(2, dtype=torch.int64)}),
    ),
    "scale_inf": (ValueError, r"`scale` must be a finite number", lambda q, k, v: ((q, k, v), {"scale": float("inf")})),
    "eps_negative": (ValueError, r"`eps` must be a finite number > 0", lambda q, k, v: ((q, k, v), {"eps": -1e-3})),
    "is_causal_int": (TypeError, r"`is_causal` must be a bool", lambda q, k, v: ((q, k, v), {"is_causal": 1})),
    "generator_type": (
        TypeError,
        r"`generator` must be a torch.Generator",
        lambda q, k, v: ((q, k, v), {"generator": 3}),
    ),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_attention_input_raises(name, entry):
    exc, match, build = BAD_CALLS[name]
    args, kwargs = build(*qkv(2, 2, 2, 3, 4, 5, 5, dtype=torch.float32, grad=False))
    with pytest.raises(exc, match=match):
        _call(entry, *args, **kwargs)


@pytest.mark.parametrize("backend", ["nope", "", "Reference", 3, None])
def test_unknown_backend(backend):
    q, k, v = qkv(2, 2, 2, 3, 4, 5, 5, dtype=torch.float32, grad=False)
    with pytest.raises(ValueError, match=r"unknown `backend`"):
        sa_attention(q, k, v, backend=backend)


@pytest.mark.parametrize("entry", BACKENDS)
def test_positive_infinity_in_float_mask_is_rejected(entry):
    """A +inf mask entry cannot be "added to the score" without making the row NaN: it must be rejected (like NaN)
    instead of silently producing NaN."""
    q, k, v = qkv(2, 2, 2, 3, 4, 5, 5, dtype=torch.float32, grad=False)
    m = torch.zeros(3, 4)
    m[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"`attn_mask`"):
        out = _call(entry, q, k, v, m)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all(), "silently produced NaN"


@pytest.mark.parametrize("entry", BACKENDS)
@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), float("nan")])
def test_non_finite_bias_is_not_silently_nan(entry, fill):
    """A non-finite ``bias`` entry must either be rejected with an error naming ``bias`` or (for -inf) act as a
    mask; it must never silently turn the output into NaN."""
    q, k, v = qkv(2, 2, 2, 3, 4, 5, 5, dtype=torch.float32, grad=False)
    bias = torch.zeros(3, 4)
    bias[1, 2] = fill
    try:
        out = _call(entry, q, k, v, bias=bias)
    except ValueError as err:
        assert "`bias`" in str(err)
        return
    out = out[0] if isinstance(out, tuple) else out
    assert fill == float("-inf"), f"bias entry {fill} was accepted"
    assert torch.isfinite(out).all(), "a -inf bias entry silently produced NaN"
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 2] = False
    want = _call(entry, q, k, v, keep)
    torch.testing.assert_close(out, want[0] if isinstance(want, tuple) else want)


SOFTMAX_BAD = {
    "x_list": (TypeError, r"`x` must be a torch.Tensor", lambda: sa_softmax([1.0, 2.0])),
    "x_int": (TypeError, r"`x` must be a floating-point tensor", lambda: sa_softmax(torch.ones(3, dtype=torch.int64))),
    "x_0d": (ValueError, r"`x` must have at least one dimension", lambda: sa_softmax(torch.tensor(1.0))),
    "dim_range": (ValueError, r"`dim`=2 is out of range", lambda: sa_softmax(torch.ones(2, 3), dim=2)),
    "dim_negative": (ValueError, r"`dim`=-3 is out of range", lambda: sa_softmax(torch.ones(2, 3), dim=-3)),
    "mask_float": (
        TypeError,
        r"`mask` must be a bool tensor",
        lambda: sa_softmax(torch.ones(2, 3), mask=torch.ones(2, 3)),
    ),
    "mask_list": (TypeError, r"`mask` must be a bool tensor", lambda: sa_softmax(torch.ones(2, 3), mask=[True] * 3)),
    "mask_shape": (
        ValueError,
        r"`mask` of shape \(4,\) does not broadcast",
        lambda: sa_softmax(torch.ones(2, 3), mask=torch.ones(4, dtype=torch.bool)),
    ),
    "mask_enlarges": (
        ValueError,
        r"`mask` of shape \(5, 2, 3\) would enlarge",
        lambda: sa_softmax(torch.ones(2, 3), mask=torch.ones(5, 2, 3, dtype=torch.bool)),
    ),
    "mask_device": (
        ValueError,
        r"`mask` is on meta",
        lambda: sa_softmax(torch.ones(2, 3), mask=torch.ones(3, dtype=torch.bool, device="meta")),
    ),
    "eps_negative": (ValueError, r"`eps` must be > 0", lambda: sa_softmax(torch.ones(2, 3), eps=-1.0)),
}


@pytest.mark.parametrize("name", list(SOFTMAX_BAD))
def test_bad_sa_softmax_input_raises(name):
    exc, match, call = SOFTMAX_BAD[name]
    with pytest.raises(exc, match=match):
        call()


def test_sa_softmax_negative_infinity_is_not_silently_nan():
    """``torch.softmax`` gives -inf logits weight 0; SA-Softmax used as a drop-in must not turn the whole row into
    NaN: either exclude the entry (as a mask would) or raise an error naming ``x``."""
    x = torch.tensor([[1.0, float("-inf"), 2.0, -0.5]])
    try:
        y = sa_softmax(x)
    except ValueError as err:
        assert "`x`" in str(err)
        return
    assert torch.isfinite(y).all(), "-inf input silently produced NaN"
    want = sa_softmax(x.nan_to_num(neginf=0.0), mask=torch.tensor([True, False, True, True]))
    torch.testing.assert_close(y, want)

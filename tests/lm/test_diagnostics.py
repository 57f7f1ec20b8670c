"""Gradient diagnostics: the probe changes no value, the metrics mean what they say, training is untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sasoftmax.lm.config import load_config
from sasoftmax.lm.diagnostics import METRICS, _row_stats, attention_diagnostics, probe_attention
from sasoftmax.lm.model import GPT, GPTConfig
from sasoftmax.lm.trainer import train
from sasoftmax.normalizers import register_normalizer, softmax_attention, unregister_normalizer

NORMS = ["softmax", "sa_softmax", "sa_softmax_plain", "sa_softmax_detached"]


def _model(norm: str, positional: str = "alibi", layers: int = 2) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=layers, n_head=2, n_embd=32, normalizer=norm,
                         positional=positional))


def _batch(seed: int = 1, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, t), generator=g), torch.randint(0, 64, (2, t), generator=g)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("positional", ["alibi", "rope", "kerple_log"])
def test_probe_changes_no_value(norm: str, positional: str) -> None:
    """Under the probe the loss and every parameter gradient equal those of the model's own attention path."""
    m = _model(norm, positional).double()
    x, y = _batch()
    loss = m(x, y)[1]
    loss.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with probe_attention(m) as probes:
        loss2 = m(x, y)[1]
        loss2.backward()
        assert all(p.scores is not None and p.scores.grad is not None for p in probes)
        assert probes[0].scores.shape == (2, 2, 16, 16)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-12, msg=n)
    assert all(a.probe is None for a in (b.attn for b in m.blocks))


def test_row_stats_definitions() -> None:
    """Hand-made scores: uniform row (entropy log n), saturated row, single-key row (not counted as saturated)."""
    s = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    s[0, 0, 1] = torch.tensor([20.0, 0.0, 0.0, -1.0])  # softmax max ~ 1 - 3e-9: saturated
    vis = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    vis[0, 0, 2, 1:] = False  # row 2 sees one key
    w = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
    g = torch.zeros_like(s)
    g[0, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # row 0: norm 5
    g[0, 0, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # row 1 (saturated): norm 1
    g[0, 0, 2, 1] = 100.0  # masked entry: ignored
    st = _row_stats(s, g, vis, w, 0.99)
    assert st["saturated_frac"] == pytest.approx(0.5)  # 1 of the 2 rows with >= 2 keys
    assert st["score_grad_norm"] == pytest.approx((5.0 + 1.0 + 0.0) / 3)
    assert st["score_grad_norm_saturated"] == pytest.approx(1.0)
    h1 = -sum(p * math.log(p) for p in torch.softmax(s[0, 0, 1], -1).tolist())
    assert st["score_entropy"] == pytest.approx((math.log(4) + h1 + 0.0) / 3)
    assert st["score_range"] == pytest.approx((0.0 + 21.0 + 0.0) / 3)
    assert st["weight_sum"] == pytest.approx(1.0)
    s[0, 0, 2, 3] = 50.0  # a masked entry does not count
    assert _row_stats(s, g, vis, w, 0.99)["max_logit"] == pytest.approx(20.0)


def test_sa_keeps_gradient_where_softmax_saturates() -> None:
    """The paper's claim on one layer: with the scores pushed into saturation (large query/key projections), the
    score gradient of softmax attention collapses in the saturated rows, while x*softmax(x) and the detached
    normalized form keep an order of magnitude more of it (61x and 17x for this seed)."""
    out = {}
    for norm in ("softmax", "sa_softmax_plain", "sa_softmax_detached"):
        m = _model(norm, "nope", layers=1).double()
        with torch.no_grad():  # sharpen the scores: scale the query and key projections up
            hd = m.blocks[0].attn.head_dim * m.blocks[0].attn.n_head
            m.blocks[0].attn.c_attn.weight[: 2 * hd] *= 60.0
        x, y = _batch(3)
        out[norm] = attention_diagnostics(m, x, y)
    assert out["softmax"]["diag/saturated_frac"] > 0.5
    sm = out["softmax"]["diag/score_grad_norm_saturated"]
    for norm in ("sa_softmax_plain", "sa_softmax_detached"):
        assert out[norm]["diag/score_grad_norm_saturated"] > 10 * sm, (norm, out[norm], sm)


def test_diagnostics_restore_state_and_draw_no_random_numbers() -> None:
    m = _model("sa_softmax")
    m.train()
    x, y = _batch()
    m(x, y)[1].backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters()}
    rng = torch.get_rng_state()
    d = attention_diagnostics(m, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert m.training
    for n, p in m.named_parameters():
        assert torch.equal(p.grad, before[n]), n
    assert set(k for k in d if k.count("/") == 1) <= {f"diag/{k}" for k in METRICS}
    assert {"diag/score_grad_norm/layer0", "diag/score_grad_norm/layer1", "diag/qkv_grad_norm"} <= set(d)
    assert all(math.isfinite(v) for v in d.values())


def test_errors() -> None:
    register_normalizer("test_no_weights", softmax_attention, "no materialized weights")
    try:
        m = _model("test_no_weights")
        with pytest.raises(ValueError, match="test_no_weights.*weights"):
            attention_diagnostics(m, *_batch())
    finally:
        unregister_normalizer("test_no_weights")
    m = _model("softmax")
    with pytest.raises(ValueError, match="saturation"):
        attention_diagnostics(m, *_batch(), saturation=1.0)
    with pytest.raises(ValueError, match="no sasoftmax CausalSelfAttention"):
        attention_diagnostics(torch.nn.Linear(2, 2), *_batch())


def test_trainer_writes_diagnostics_and_training_is_unchanged(tmp_path: Path) -> None:
    text = "".join(f"Line {i}: the quick brown fox {i * 7 % 13} jumps.\n" for i in range(2000))
    (tmp_path / "c.txt").write_text(text)
    base = [f"data.source={tmp_path / 'c.txt'}", "data.tokenizer=bytes", "data.doc_chars=2000",
            f"data.cache_dir={tmp_path / 'cache'}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.block_size=16", "model.normalizer=sa_softmax", "model.positional=alibi", "batch_size=4",
            "max_steps=5", "warmup=1", "eval_interval=0", "ckpt_interval=0", "log_every=5", "threads=1"]
    runs = {}
    for name, extra in (("plain", []), ("diag", ["diag_interval=2", "diag_batch_size=2"])):
        cfg = load_config(None, [*base, f"out_dir={tmp_path / name}", *extra])
        train(cfg, quiet=True)
        runs[name] = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    loss = {n: [r["loss"] for r in rows if "loss" in r] for n, rows in runs.items()}
    assert loss["plain"] == loss["diag"]  # bit for bit: the diagnostics change nothing
    diag_rows = [r for r in runs["diag"] if "diag/score_grad_norm" in r]
    assert [r["step"] for r in diag_rows] == [1, 2, 4]
    assert all("diag/saturated_frac/layer0" in r for r in diag_rows)
    assert not any(k.startswith("diag/") for r in runs["plain"] for k in r)

"""Evaluation: perplexity at several lengths from a checkpoint, length errors, gradient demo, comparison job."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from sasoftmax.lm.compare import run_comparison
from sasoftmax.lm.config import load_config
from sasoftmax.lm.data import load_token_data
from sasoftmax.lm.evaluate import evaluate_checkpoint, evaluate_model, gradient_demo, parse_lengths
from sasoftmax.lm.model import GPT, GPTConfig
from sasoftmax.lm.trainer import train

TEXT = "".join(f"Paragraph {i}: the cat sat on mat {i % 17} and looked at the dog {i % 5}.\n" for i in range(3000))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    corpus = root / "book.txt"
    corpus.write_text(TEXT)
    sets = [f"data.source={corpus}", "data.tokenizer=bytes", "data.doc_chars=4000", f"data.cache_dir={root / 'c'}",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
            "model.normalizer=sa_softmax", "model.positional=alibi", "batch_size=4", "max_steps=40", "warmup=4",
            "lr=3e-3", "eval_interval=0", "ckpt_interval=0", "eval_batches=2", f"out_dir={root / 'run'}"]
    cfg = load_config(None, sets)
    summary = train(cfg, quiet=True)
    return cfg, summary, root


def test_eval_checkpoint_default_lengths(trained):
    cfg, summary, root = trained
    res = evaluate_checkpoint(summary["checkpoint"], tokens_per_length=2048)
    assert [r["length"] for r in res["results"]] == [32, 64, 128, 256, 512]
    for r in res["results"]:
        assert r["tokens"] == r["windows"] * r["length"] == 2048
        assert math.isfinite(r["ppl"]) and r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["ppl"] < 256, "a trained byte model must beat the uniform distribution"
    saved = json.loads(Path(res["saved_to"]).read_text())
    assert saved["results"] == res["results"] and saved["normalizer"] == "sa_softmax"


def test_eval_matches_direct_loss_and_accepts_run_dir(trained):
    cfg, summary, root = trained
    res = evaluate_checkpoint(root / "run", "32", tokens_per_length=64, out=root / "e.json")
    data = load_token_data(cfg.data)
    state = torch.load(summary["checkpoint"], weights_only=True)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    val = torch.from_numpy(data.val.astype("int64"))
    stride = (len(val) - 1) // 2
    with torch.no_grad():
        first = model(val[None, :32], val[None, 1:33])[1]
        second = model(val[None, stride : stride + 32], val[None, stride + 1 : stride + 33])[1]
    assert res["results"][0]["windows"] == 2
    assert res["results"][0]["loss"] == pytest.approx(float(first + second) / 2, rel=1e-5)


def test_eval_length_the_data_cannot_hold_is_a_clear_error(trained):
    cfg, summary, root = trained
    with pytest.raises(ValueError, match="length 10000000"):
        evaluate_checkpoint(summary["checkpoint"], [32, 10_000_000])
    with pytest.raises(ValueError, match="lengths"):
        evaluate_checkpoint(summary["checkpoint"], "32,abc")
    with pytest.raises(ValueError, match="lengths"):
        parse_lengths("0")


def test_evaluate_model_rejects_bad_lengths():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=16, n_layer=1, n_embd=16, n_head=2, block_size=8))
    val = torch.randint(0, 16, (100,)).numpy()
    with pytest.raises(ValueError, match="length 100"):
        evaluate_model(model, val, [8, 100])
    rows = evaluate_model(model, val, [8, 16], tokens_per_length=32)
    assert [r["windows"] for r in rows] == [4, 2]


def test_gradient_demo_shows_softmax_saturation():
    demo = gradient_demo(dominant=(1.0, 20.0))
    rows = demo["rows"]
    assert rows["softmax"][1] < 1e-6 * rows["softmax"][0], "softmax's Jacobian must vanish on a saturated row"
    assert rows["sa_plain"][1] > 0.5, "x*softmax(x) keeps an O(1) Jacobian"
    assert rows["sa_normalized_detached"][1] > 1e3 * rows["softmax"][1]


def _compare_setup(tmp_path, max_steps: int):
    """A small corpus and the --set overrides of a tiny, fast comparison job."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    sets = ["data.tokenizer=bytes", "data.doc_chars=4000", f"data.cache_dir={tmp_path / 'cache'}",
            f"max_steps={max_steps}", "model.n_layer=1", "model.n_embd=32", "model.block_size=16", "batch_size=2",
            "eval_batches=1"]
    return corpus, sets


def test_comparison_job_end_to_end(tmp_path):
    corpus, sets = _compare_setup(tmp_path, max_steps=8)
    buf = io.StringIO()
    out = run_comparison(tmp_path / "out", data_source=str(corpus), overrides=sets, tokens_per_length=256,
                         budget_s=0, chunks=2, stream=buf)
    text = buf.getvalue()
    assert "Part 1" in text and "Part 3" in text and "sa_softmax/softmax" in text and "step 4/8" in text
    assert "Part 4: gradient diagnostics at step 1" in text and "score_grad_norm" in text
    assert set(out["runs"]) == {"softmax", "sa_softmax"}
    lengths = [r["length"] for r in out["runs"]["sa_softmax"]["eval"]["results"]]
    assert lengths == [16, 32, 64, 128]
    assert (tmp_path / "out" / "comparison.md").read_text().startswith("# softmax vs SA-Softmax")
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["runs"]["softmax"]["train"]["steps"] == saved["runs"]["sa_softmax"]["train"]["steps"] == 8
    assert saved["diagnostics"]["sa_softmax"]["step"] == 1 and "diag/saturated_frac" in saved["diagnostics"]["softmax"]
    # training in slices equals one uninterrupted run of the same config
    direct = load_config(None, [f"data.source={corpus}", *sets, "model.preset=tiny", "model.n_head=4",
                                "model.positional=alibi", "model.normalizer=sa_softmax", "warmup=30", "lr=2e-3",
                                "min_lr=2e-4", "dtype=auto", "seed=1337", "eval_interval=0", "ckpt_interval=0",
                                f"out_dir={tmp_path / 'direct'}"])
    assert train(direct, quiet=True)["final_loss"] == saved["runs"]["sa_softmax"]["train"]["final_loss"]


def test_comparison_job_budget_stops_all_models_at_the_same_step(tmp_path):
    corpus, sets = _compare_setup(tmp_path, max_steps=9)
    buf = io.StringIO()
    out = run_comparison(tmp_path / "out", data_source=str(corpus), overrides=sets, tokens_per_length=64,
                         budget_s=1e-3, chunks=3, multipliers=(1, 2), stream=buf)
    assert out["steps"] == 3 and "stop at step 3 of 9" in out["stopped_early"]
    assert {r["train"]["steps"] for r in out["runs"].values()} == {3}
    assert "note: time budget" in buf.getvalue()


def test_comparison_of_three_normalizers_and_bad_names(tmp_path):
    corpus, sets = _compare_setup(tmp_path, max_steps=2)
    buf = io.StringIO()
    out = run_comparison(tmp_path / "out", data_source=str(corpus), overrides=sets, tokens_per_length=64,
                         budget_s=0, chunks=1, multipliers=(1, 2), normalizers=["softmax", "sa_softmax", "stablemax"],
                         stream=buf)
    text = buf.getvalue()
    assert "sa_softmax/softmax" in text and "stablemax/softmax" in text
    assert set(out["runs"]) == {"softmax", "sa_softmax", "stablemax"}
    ppl = {n: out["runs"][n]["eval"]["results"][1]["ppl"] for n in out["runs"]}
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert md.startswith("# softmax vs sa_softmax vs stablemax")
    assert f"{ppl['stablemax'] / ppl['softmax']:.3f}" in md
    with pytest.raises(ValueError, match="unknown normalizer"):
        run_comparison(tmp_path / "bad", data_source=str(corpus), overrides=sets, normalizers=["softmax", "nope_x"])
    with pytest.raises(ValueError, match="distinct"):
        run_comparison(tmp_path / "bad", data_source=str(corpus), overrides=sets, normalizers=["softmax", "softmax"])

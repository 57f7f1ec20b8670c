"""Grid report: tables from synthetic results (mean over seeds, ratio to softmax), plots, diagnostics, CLI."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from sasoftmax.lm.cli import main
from sasoftmax.lm.grid import SCHEMA_VERSION, write_json_atomic
from sasoftmax.lm.report import write_report

# (normalizer, positional, seed) -> perplexity at lengths 16, 32, 64
PPL = {
    ("softmax", "alibi", 1): [10.0, 14.0, 30.0],
    ("softmax", "alibi", 2): [12.0, 16.0, 34.0],
    ("sa_softmax", "alibi", 1): [9.0, 12.0, 20.0],
    ("sa_softmax", "alibi", 2): [10.0, 13.0, 22.0],
    ("sa_softmax", "rope", 1): [11.0, 40.0, 300.0],
}


def _run_id(norm: str, pos: str, seed: int) -> str:
    return f"normalizer={norm}__positional={pos}__seed={seed}"


def _write_run(grid: Path, norm: str, pos: str, seed: int, ppls: list[float], diag: bool) -> str:
    run_id = _run_id(norm, pos, seed)
    run_dir = grid / "runs" / run_id
    rows = [{"length": 16 * m, "windows": 4, "tokens": 64, "loss": 0.0, "ppl": p}
            for m, p in zip((1, 2, 4), ppls, strict=True)]
    config = {"model": {"preset": "tiny", "block_size": 16, "normalizer": norm, "positional": pos}, "seed": seed,
              "max_steps": 20}
    write_json_atomic(run_dir / "result.json", {
        "schema": SCHEMA_VERSION, "run_id": run_id,
        "axes": {"model.normalizer": norm, "model.positional": pos, "seed": seed},
        "train_config": config, "train_length": 16, "eval_spec": {"multipliers": [1, 2, 4]}, "complete": True,
        "summary": {"final_loss": 2.5, "val_loss": 2.75, "steps": 20, "elapsed_s": 1.5},
        "eval": {"train_length": 16, "normalizer": norm, "positional": pos, "results": rows},
        "platform": "test-machine", "finished": "2026-01-01T00:00:00+00:00",
    })
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "loss": 5.0 - 0.1 * step + 0.01 * seed, "lr": 1e-3, "grad_norm": 1.0})
        if diag and step % 5 == 0:
            lines.append({"step": step, "diag/score_grad_norm": step * 0.5 + seed, "diag/max_weight": 0.1 * step / 20,
                          "diag/score_grad_norm/layer0": step * 0.25, "diag/score_grad_norm/layer1": step * 0.75})
    lines.append({"step": 20, "val_loss": 2.75, "val_ppl": 15.6})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_id


def _grid(tmp_path: Path, diag: bool = True) -> Path:
    grid = tmp_path / "grid"
    ids = [_write_run(grid, n, p, s, v, diag) for (n, p, s), v in PPL.items()]
    pending = _run_id("softmax", "rope", 1)
    inprogress = grid / "runs" / _run_id("softmax", "rope", 2)
    inprogress.mkdir(parents=True)
    (inprogress / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.9}\n{"step": 3, "lo')
    write_json_atomic(grid / "grid.json", {"schema": SCHEMA_VERSION, "grid": {
        "source": "configs/grid_test.toml", "axes": {"model.normalizer": ["softmax", "sa_softmax"],
                                                     "model.positional": ["alibi", "rope"], "seed": [1, 2]},
        "eval": {"multipliers": [1, 2, 4]}, "base": {"lr": 0.001}, "run_ids": [*ids, pending, inprogress.name]}})
    return grid


def test_report_tables_plots_and_diagnostics(tmp_path):
    grid = _grid(tmp_path)
    res = write_report(grid)
    report = Path(res["report"])
    assert report == grid / "report" / "report.md"
    text = report.read_text()

    # mean ± std over the two seeds of a cell, single values for one-run cells
    std, std_long = statistics.stdev([10.0, 12.0]), statistics.stdev([30.0, 34.0])
    assert f"| alibi | softmax | 2 | 11.000 ± {std:.3f} | 15.000 ± {std:.3f} | 32.000 ± {std_long:.3f} |" in text
    assert "| rope | sa_softmax | 1 | 11.000 | 40.000 | 300.000 |" in text
    # ratio of sa_softmax's mean to softmax's mean in the same cell; no ratio row for the cell without softmax
    ratios = [9.5 / 11.0, 12.5 / 15.0, 21.0 / 32.0]
    assert "| alibi | sa_softmax | " + " | ".join(f"{r:.3f}" for r in ratios) + " |" in text
    assert "| rope | sa_softmax | 0." not in text
    # paired by seed: mean difference with a Student-t 95 % interval (t = 12.706 for one degree of freedom)
    cells = []
    for diffs in ([-1.0, -2.0], [-2.0, -3.0], [-10.0, -12.0]):
        m, half = statistics.fmean(diffs), 12.706 * statistics.stdev(diffs) / math.sqrt(2)
        cells.append(f"{m:.3f} [{m - half:.3f}, {m + half:.3f}] (2/2 lower)")
    assert "| alibi | sa_softmax | " + " | ".join(cells) + " |" in text

    # environment, config, missing runs
    assert "Generated " in text and "test-machine" in text and "configs/grid_test.toml" in text
    assert "axis `model.positional`: alibi, rope" in text
    assert f"`{_run_id('softmax', 'rope', 1)}`: not started" in text
    assert f"`{_run_id('softmax', 'rope', 2)}`: in progress or interrupted (last logged step 2)" in text

    # figures exist, are non-empty PNGs and are linked from the report
    figures = [Path(p) for p in res["figures"]]
    names = {p.name for p in figures}
    assert {"train_loss_L16.png", "ppl_alibi_L16.png", "ppl_rope_L16.png", "diag_score_grad_norm.png",
            "diag_max_weight.png", "diag_score_grad_norm_layers.png"} <= names
    for p in figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
        assert f"]({p.name})" in text

    # diagnostics: discovered keys, first/last table, per-layer last values
    assert "### `diag/score_grad_norm`" in text and "### `diag/max_weight`" in text
    first, last = 5 * 0.5 + 1, 20 * 0.5 + 1
    assert f"| {_run_id('softmax', 'alibi', 1)} | 5 | {first:.3f} | 20 | {last:.3f} |" in text
    assert "### `diag/score_grad_norm` per layer" in text
    assert f"| {_run_id('sa_softmax', 'rope', 1)} | 20 | 5.000 | 15.000 |" in text
    assert "No `diag/` metrics" not in text


def test_report_without_diagnostics_says_so(tmp_path):
    grid = _grid(tmp_path, diag=False)
    res = write_report(grid, tmp_path / "rep")
    text = Path(res["report"]).read_text()
    assert "No `diag/` metrics were found" in text
    assert not any("diag_" in Path(p).name for p in res["figures"])


def test_report_cli(tmp_path, capsys):
    grid = _grid(tmp_path)
    assert main(["report", str(grid), "--out", str(tmp_path / "r")]) == 0
    assert "report.md" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a grid directory" in capsys.readouterr().err


def test_report_summary_plots(tmp_path, capsys):
    """--plots summary: perplexity, loss and the main score-gradient figures only; every table is still there."""
    grid = _grid(tmp_path)
    assert main(["report", str(grid), "--out", str(tmp_path / "s"), "--plots", "summary"]) == 0
    text = (tmp_path / "s" / "report.md").read_text()
    n_runs = len(list(grid.glob("runs/*/result.json")))
    assert f"Runs were trained on: test-machine ({n_runs} runs)." in text  # machines with their run counts
    pngs = {p.name for p in (tmp_path / "s").glob("*.png")}
    assert {"train_loss_L16.png", "ppl_alibi_L16.png", "diag_score_grad_norm.png"} <= pngs
    assert "diag_max_weight.png" not in pngs and not any(n.endswith("_layers.png") for n in pngs)
    assert "### `diag/max_weight`" in text and "### `diag/score_grad_norm` per layer" in text
    assert all(f"]({n})" in text for n in pngs) and "diag_max_weight.png" not in text
    with pytest.raises(ValueError, match="plots"):
        write_report(grid, plots="some")


def test_plot_style_colors_by_normalizer_and_short_labels(tmp_path):
    from sasoftmax.lm.report import _Style, load_grid_dir

    runs = load_grid_dir(_grid(tmp_path)).runs
    style = _Style(runs)
    lines = {r.run_id: style.line(r) for r in runs}
    for a in runs:
        for b in runs:
            same = lines[a.run_id]["color"] == lines[b.run_id]["color"]
            assert same == (a.normalizer == b.normalizer)
    # labels hold only what differs between runs (here normalizer, positional and seed) and are unique
    labels = [v["label"] for v in lines.values()]
    assert len(set(labels)) == len(labels) and all("__" not in lab for lab in labels)
    one = [r for r in runs if r.positional == "alibi" and r.seed == 1]
    assert sorted(_Style(one).line(r)["label"] for r in one) == sorted(r.normalizer for r in one)


def test_report_includes_lm_eval_results_when_a_run_has_them(tmp_path):
    grid = _grid(tmp_path, diag=False)
    run_id = _run_id("sa_softmax", "alibi", 1)
    write_json_atomic(grid / "runs" / run_id / "lm_eval.json", {
        "step": 20, "tasks": ["piqa"],
        "results": {"piqa": {"alias": "piqa", "acc,none": 0.625, "acc_stderr,none": 0.0125, "acc_norm,none": 0.6}}})
    text = Path(write_report(grid, tmp_path / "rep")["report"]).read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in text
    assert f"| {run_id} | 20 | piqa | acc | 0.625 | 0.013 |" in text
    assert f"| {run_id} | 20 | piqa | acc_norm | 0.600 | - |" in text
    no_eval = Path(write_report(_grid(tmp_path / "other", diag=False), tmp_path / "rep2")["report"]).read_text()
    assert "Downstream tasks" not in no_eval


def _write_lr_run(grid: Path, norm: str, lr: float, seed: int, val_loss: float | None, init: float = 8.0) -> None:
    """A run of a learning-rate sweep: finished with ``val_loss``, or diverged (``None``: error.json as the grid
    writes it for a FloatingPointError)."""
    axes = {"seed": seed, "lr": lr, "model.qk_norm": False, "model.normalizer": norm}
    run_id = f"seed={seed}__lr={lr}__qk_norm=false__normalizer={norm}"
    run_dir = grid / "runs" / run_id
    rows = [{"step": 1, "loss": init + 0.01 * seed}, {"step": 1, "diag/max_logit": 1.0},
            {"step": 10, "loss": 5.0}, {"step": 10, "diag/max_logit": 10.0 * lr * 1000}]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if val_loss is None:
        write_json_atomic(run_dir / "error.json", {"schema": SCHEMA_VERSION, "run_id": run_id, "axes": axes,
                                                   "error": "training loss became nan at step 7"})
        return
    config = {"model": {"preset": "tiny", "block_size": 16, "normalizer": norm, "positional": "rope"}, "seed": seed}
    write_json_atomic(run_dir / "result.json", {
        "schema": SCHEMA_VERSION, "run_id": run_id, "axes": axes, "train_config": config, "train_length": 16,
        "eval_spec": {"multipliers": [1]}, "complete": True,
        "summary": {"final_loss": val_loss, "val_loss": val_loss, "steps": 10},
        "eval": {"train_length": 16, "normalizer": norm, "positional": "rope",
                 "results": [{"length": 16, "windows": 1, "tokens": 16, "loss": val_loss,
                              "ppl": math.exp(val_loss)}]}})


def test_report_learning_rate_sensitivity(tmp_path):
    """Wortsman et al.'s LR sensitivity per seed from the final losses, a diverged run counted as the loss at
    init, losses above it capped; the table, the best learning rate and both figures."""
    from sasoftmax.lm.lr_sweep import collect, lr_sensitivity

    grid = tmp_path / "grid"
    losses = {  # (normalizer, seed) -> final loss at lr 1e-3, 1e-2, 1e-1 (None = diverged)
        ("softmax", 1): [4.0, 3.5, None],
        ("softmax", 2): [4.2, 3.3, 9.0],  # above the loss at init (8.02): capped to it
        ("sa_softmax", 1): [4.1, 3.6, 3.9],
        ("sa_softmax", 2): [4.3, 3.4, 4.1],
    }
    for (norm, seed), row in losses.items():
        for lr, loss in zip((1e-3, 1e-2, 1e-1), row, strict=True):
            _write_lr_run(grid, norm, lr, seed, loss)
    points = collect(grid)
    assert len(points) == 12 and sum(p.diverged for p in points) == 1
    by = {(p.setting, p.seed): [] for p in points}
    for p in points:
        by[(p.setting, p.seed)].append(p)
    assert lr_sensitivity(by[("softmax, qk_norm=false", 1)]) == pytest.approx((4.0 + 3.5 + 8.01) / 3 - 3.5)
    assert lr_sensitivity(by[("softmax, qk_norm=false", 2)]) == pytest.approx((4.2 + 3.3 + 8.02) / 3 - 3.3)
    assert lr_sensitivity(by[("sa_softmax, qk_norm=false", 1)]) == pytest.approx((4.1 + 3.6 + 3.9) / 3 - 3.6)

    write_report(grid, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Learning-rate sensitivity" in text
    soft = [(4.0 + 3.5 + 8.01) / 3 - 3.5, (4.2 + 3.3 + 8.02) / 3 - 3.3]
    row = next(line for line in text.splitlines() if line.startswith("| softmax, qk_norm=false | 2 |"))
    assert f"{statistics.fmean(soft):.3f} ± {statistics.stdev(soft):.3f}" in row
    sweep = next(line for line in text.splitlines() if line.startswith("| softmax, qk_norm=false | 4.100"))
    assert "[1 div.]" in sweep  # lr 0.1: one diverged seed
    assert (tmp_path / "out" / "lr_sweep.png").stat().st_size > 0
    assert (tmp_path / "out" / "lr_max_logit.png").stat().st_size > 0

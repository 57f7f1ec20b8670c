"""Experiment grid: validation errors, run ids, selection, dry run, an end-to-end tiny grid and its resumption."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from sasoftmax.lm.cli import main
from sasoftmax.lm.grid import (
    SCHEMA_VERSION,
    GridError,
    load_grid,
    parse_grid,
    parse_shard,
    run_grid,
    run_id_for,
    select_runs,
)

TEXT = "".join(f"line {i} of a small corpus, words {i % 13} and {i * 7 % 29}\n" for i in range(2500))

BASE = {
    "max_steps": 4, "warmup": 1, "batch_size": 2, "eval_interval": 0, "ckpt_interval": 0, "eval_batches": 1,
    "threads": 1, "lr": 3e-3, "min_lr": 3e-4, "log_every": 2,
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16, "positional": "alibi"},
    "data": {"source": "stdlib", "tokenizer": "bytes", "doc_chars": 4000},
}


def _spec(**changes) -> dict:
    spec = {"base": copy.deepcopy(BASE), "grid": {"model.normalizer": ["softmax", "sa_softmax"]},
            "eval": {"multipliers": [1, 2], "tokens_per_length": 64}}
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"bogus": 1}, "bogus"),
        ({"grid": {"model.bogus": [1, 2]}}, "model.bogus"),
        ({"grid": {"nonsense": [1]}}, "nonsense"),
        ({"grid": {"model.normalizer": ["softmax", "not_a_normalizer"]}}, "not_a_normalizer"),
        ({"grid": {"model.positional": ["rope", "nowhere"]}}, "nowhere"),
        ({"grid": {"model.normalizer": []}}, "'model.normalizer' is empty"),
        ({"grid": {"seed": [1, 1]}}, "seed"),
        ({"grid": {"seed": 1}}, "seed"),
        ({"grid": {"model.n_layer": ["two"]}}, "model.n_layer"),
        ({"grid": {"out_dir": ["a", "b"]}}, "out_dir"),
        ({"grid": {}}, r"\[grid\]"),
        ({"eval": {"multipliers": [1, 0]}}, "eval.multipliers"),
        ({"eval": {"lengths": [1]}}, "eval.lengths"),
        ({"eval": {"dtype": "int8"}}, "eval.dtype"),
        ({"grid": {"model.n_head": [2, 5]}}, "n_head"),
    ],
)
def test_invalid_grids_name_the_key(change, pattern):
    with pytest.raises(GridError, match=pattern):
        parse_grid(_spec(**change))


def test_missing_base_and_bad_set_are_errors():
    spec = _spec()
    del spec["base"]
    with pytest.raises(GridError, match="base"):
        parse_grid(spec)
    with pytest.raises(GridError, match="nonsense"):
        parse_grid(_spec(), overrides=["nonsense=3"])


@pytest.mark.parametrize("text", ["3/2", "a", "1/0", "-1/2", "1-2"])
def test_bad_shard(text):
    with pytest.raises(GridError, match="shard"):
        parse_shard(text)


def test_product_ids_selection_and_shards(tmp_path):
    spec = _spec(grid={"model.normalizer": ["softmax", "sa_softmax"], "model.positional": ["alibi", "rope", "nope"],
                       "seed": [1, 2]})
    grid = parse_grid(spec, out=tmp_path / "g")
    again = parse_grid(spec, out=tmp_path / "g")
    ids = [r.run_id for r in grid.runs]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert ids == [r.run_id for r in again.runs], "run ids must be deterministic"
    assert ids[0] == "normalizer=softmax__positional=alibi__seed=1"
    assert all(re.fullmatch(r"[A-Za-z0-9._+=~-]+", i) for i in ids)
    run = grid.runs[5]
    assert run.config.model["positional"] == run.axes["model.positional"] and run.config.seed == run.axes["seed"]
    assert Path(run.config.out_dir) == tmp_path / "g" / "runs" / run.run_id

    only = select_runs(grid, ["model.normalizer=sa_softmax"])
    assert len(only) == 6 and all(r.axes["model.normalizer"] == "sa_softmax" for r in only)
    both = select_runs(grid, ["model.positional=rope", "model.positional=nope", "seed=2"])
    assert {(r.axes["model.positional"], r.axes["seed"]) for r in both} == {("rope", 2), ("nope", 2)}
    shards = [select_runs(grid, shard=(i, 3)) for i in range(3)]
    assert sorted(r.run_id for s in shards for r in s) == sorted(ids)
    assert [r.run_id for r in shards[1]] == ids[1::3]
    assert [r.run_id for r in select_runs(grid, ["seed=1"], "1/2")] == [r.run_id for r in select_runs(
        grid, ["seed=1"])][1::2]
    with pytest.raises(GridError, match="lr"):
        select_runs(grid, ["lr=1"])
    with pytest.raises(GridError, match="softmaxx"):
        select_runs(grid, ["model.normalizer=softmaxx"])


def test_unsafe_values_get_a_hashed_readable_id():
    a = run_id_for({"data.source": "/data/books/a b.txt"})
    b = run_id_for({"data.source": "/data/books/a_b.txt"})
    assert a != b and a == run_id_for({"data.source": "/data/books/a b.txt"})
    assert re.fullmatch(r"source=[A-Za-z0-9._+-]+~[0-9a-f]{8}", a)
    assert run_id_for({"model.dropout": 0.1, "data.vocab_size": 512, "betas": [0.9, 0.95], "bias": True}) == (
        "dropout=0.1__vocab_size=512__betas=0.9-0.95__bias=true")
    assert run_id_for({"model.seed": 1, "seed": 2}) == "model.seed=1__seed=2"


def test_grid_variables_fill_values_and_keep_ids_machine_independent(tmp_path):
    spec = _spec(vars={"corpus": "a text file"}, grid={"data.source": ["stdlib", "${corpus}"]})
    a = parse_grid(copy.deepcopy(spec), out=tmp_path / "a", variables={"corpus": "/one/machine/books.txt"})
    b = parse_grid(copy.deepcopy(spec), out=tmp_path / "b", variables={"corpus": "../elsewhere/books.txt"})
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs] == ["source=stdlib", "source=corpus"]
    assert a.runs[1].config.data.source == "/one/machine/books.txt"
    assert b.runs[1].config.data.source == "../elsewhere/books.txt"
    assert [r.run_id for r in select_runs(a, ["data.source=corpus"])] == ["source=corpus"]
    with pytest.raises(GridError, match="--var corpus=VALUE .a text file."):
        parse_grid(copy.deepcopy(spec), out=tmp_path / "c")
    with pytest.raises(GridError, match="not declared"):
        parse_grid(_spec(grid={"data.source": ["${corpus}"]}), out=tmp_path / "d", variables={})
    with pytest.raises(GridError, match="--var other"):
        parse_grid(copy.deepcopy(spec), out=tmp_path / "e", variables={"corpus": "x", "other": "y"})
    with pytest.raises(GridError, match="NAME=VALUE"):
        load_grid(tmp_path / "missing.toml", variables=["no-equals-sign"])


def _write_grid_file(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    (tmp_path / "train.toml").write_text(
        "max_steps = 4\nwarmup = 1\nbatch_size = 2\neval_interval = 0\nckpt_interval = 0\neval_batches = 1\n"
        "threads = 1\nlr = 3e-3\nmin_lr = 3e-4\nlog_every = 2\n"
        "[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\nblock_size = 16\npositional = \"alibi\"\n"
        f"[data]\nsource = \"{corpus}\"\ntokenizer = \"bytes\"\ndoc_chars = 4000\n"
        f"cache_dir = \"{tmp_path / 'cache'}\"\n"
    )
    path = tmp_path / "grid.toml"
    path.write_text(
        "base = \"train.toml\"\n"
        f"out_dir = \"{tmp_path / 'out'}\"\n"
        "[grid]\n\"model.normalizer\" = [\"softmax\", \"sa_softmax\"]\n"
        "[eval]\nmultipliers = [1, 2]\ntokens_per_length = 64\n"
    )
    return path


def test_dry_run_lists_runs_and_trains_nothing(tmp_path, capsys):
    path = _write_grid_file(tmp_path)
    outcome = run_grid(load_grid(path), dry_run=True)
    out = capsys.readouterr().out
    assert "normalizer=softmax" in out and "normalizer=sa_softmax" in out and "pending 2" in out
    assert outcome["states"] == {"normalizer=softmax": "pending", "normalizer=sa_softmax": "pending"}
    assert not (tmp_path / "out").exists()


def test_tiny_grid_end_to_end_then_skip_and_resume(tmp_path, capsys):
    path = _write_grid_file(tmp_path)
    out = tmp_path / "out"

    # 1) stopped early: results are written but marked partial
    partial = run_grid(load_grid(path, overrides=["stop_at=2"]), quiet=True)
    assert partial["trained"] == ["normalizer=softmax", "normalizer=sa_softmax"]
    res = json.loads((out / "runs" / "normalizer=softmax" / "result.json").read_text())
    assert res["complete"] is False and res["summary"]["steps"] == 2

    # 2) the full grid resumes both runs from their checkpoints
    full = run_grid(load_grid(path), quiet=True)
    assert full["trained"] == partial["trained"] and full["skipped"] == []
    for run_id, norm in (("normalizer=softmax", "softmax"), ("normalizer=sa_softmax", "sa_softmax")):
        res = json.loads((out / "runs" / run_id / "result.json").read_text())
        assert res["schema"] == SCHEMA_VERSION and res["run_id"] == run_id
        assert res["axes"] == {"model.normalizer": norm} and res["complete"] is True
        assert res["train_config"]["model"]["normalizer"] == norm and res["train_length"] == 16
        assert res["summary"]["steps"] == 4 and res["eval"]["normalizer"] == norm
        assert [r["length"] for r in res["eval"]["results"]] == [16, 32]
        assert {"finished", "eval_spec", "platform", "processor"} <= set(res)
        rows = [json.loads(ln) for ln in (out / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4], "resume continued the same run"
    grid_json = json.loads((out / "grid.json").read_text())
    assert grid_json["schema"] == SCHEMA_VERSION and set(grid_json["runs"]) == set(full["trained"])
    assert grid_json["missing"] == [] and grid_json["grid"]["axes"] == {"model.normalizer": ["softmax", "sa_softmax"]}
    printed = capsys.readouterr().out
    assert "ppl x1" in printed and "ppl x2" in printed

    # 3) again: both runs are skipped, nothing is trained or rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*") if p.is_file()}
    again = run_grid(load_grid(path, overrides=["threads=2"]), quiet=True)
    assert again["skipped"] == full["trained"] and again["trained"] == [] and again["evaluated"] == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*") if p.is_file()} == mtimes
    # the same corpus named by a relative path (another session's --var) is the same run; another file is not
    relative = os.path.relpath(tmp_path / "corpus.txt")
    moved = run_grid(load_grid(path, overrides=[f"data.source={relative}"]), quiet=True)
    assert moved["skipped"] == full["trained"] and moved["trained"] == []
    (tmp_path / "other.txt").write_text(TEXT)
    with pytest.raises(GridError, match="different training config"):
        run_grid(load_grid(path, overrides=[f"data.source={tmp_path / 'other.txt'}"]), quiet=True)

    # 4) a different evaluation re-evaluates without training; a different training config is refused
    spec = path.read_text().replace("multipliers = [1, 2]", "multipliers = [1]")
    path.write_text(spec)
    reeval = run_grid(load_grid(path), quiet=True, only=["model.normalizer=softmax"])
    assert reeval["trained"] == [] and reeval["evaluated"] == ["normalizer=softmax"]
    with pytest.raises(GridError, match="different training config"):
        run_grid(load_grid(path, overrides=["lr=1e-3"]), quiet=True)


def test_cli_grid_dry_run_and_errors(tmp_path, capsys):
    path = _write_grid_file(tmp_path)
    assert main(["grid", str(path), "--dry-run", "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    assert "normalizer=sa_softmax" in out and "normalizer=softmax " not in out
    assert main(["grid", str(path), "--shard", "2/2"]) == 2
    assert "--shard" in capsys.readouterr().err
    assert main(["grid", str(path), "--set", "model.positional=bogus", "--dry-run"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["grid", str(tmp_path / "none.toml")]) == 2


def test_diverging_run_gets_error_json_and_the_grid_goes_on(tmp_path, monkeypatch):
    import sasoftmax.lm.trainer as train_mod

    real_train = train_mod.train

    def fake_train(cfg, **kwargs):
        if cfg.model["normalizer"] == "softmax":
            raise FloatingPointError("training loss became nan at step 3")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(train_mod, "train", fake_train)
    path = _write_grid_file(tmp_path)
    outcome = run_grid(load_grid(path), quiet=True)
    assert list(outcome["failed"]) == ["normalizer=softmax"] and outcome["trained"] == ["normalizer=sa_softmax"]
    error = json.loads((tmp_path / "out" / "runs" / "normalizer=softmax" / "error.json").read_text())
    assert "nan" in error["error"]
    grid_json = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert grid_json["missing"] == ["normalizer=softmax"] and "normalizer=softmax" in grid_json["failed"]
    assert run_grid(load_grid(path), dry_run=True)["states"]["normalizer=softmax"] == "failed"


@pytest.mark.parametrize(
    "name,runs", [("grid_tiny.toml", 12), ("grid_peers_tiny.toml", 9), ("grid_paper125m.toml", 20)]
)
def test_shipped_grid_files_load(name, runs, tmp_path):
    path = Path(__file__).resolve().parents[2] / "configs" / name
    grid = load_grid(path, out=tmp_path / "g", overrides=["data.source=stdlib"])
    assert len(select_runs(grid)) == runs


def test_shipped_study_grid_needs_its_corpus_and_meets_the_study_size(tmp_path):
    path = Path(__file__).resolve().parents[2] / "configs" / "grid_study_paper_cpu.toml"
    with pytest.raises(GridError, match="--var austen"):
        load_grid(path, out=tmp_path / "g")
    grid = load_grid(path, out=tmp_path / "g", variables=["austen=/some/austen.txt"])
    assert len(grid.runs) == 36
    for run in grid.runs:
        cfg = run.config
        assert cfg.max_steps * cfg.batch_size * cfg.grad_accum * run.train_length >= 1_000_000
        assert cfg.model["n_layer"] >= 4 and cfg.model["n_embd"] >= 256 and run.train_length == 256
    assert {r.config.data.source for r in grid.runs} == {"stdlib", "/some/austen.txt"}


def test_grid_under_torchrun(tmp_path):
    """Two ranks: every rank trains (DDP), rank 0 alone writes the results; a second launch skips both runs."""
    import os
    import subprocess
    import sys

    path = _write_grid_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "sasoftmax",
           "grid", str(path), "--quiet"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    for run_id in ("normalizer=softmax", "normalizer=sa_softmax"):
        res = json.loads((tmp_path / "out" / "runs" / run_id / "result.json").read_text())
        assert res["summary"]["world_size"] == 2 and res["complete"] is True
    assert json.loads((tmp_path / "out" / "grid.json").read_text())["missing"] == []
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skip" in (second.stdout + second.stderr).lower()

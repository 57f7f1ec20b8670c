"""Command line: train/eval round trip through ``python -m sasoftmax`` and clean errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasoftmax.lm.cli import main

TEXT = "".join(f"line {i} of a small corpus with some words {i % 11}\n" for i in range(2000))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    return path


def _sets(corpus: Path, tmp_path: Path) -> list[str]:
    items = [f"data.source={corpus}", "data.tokenizer=bytes", "data.doc_chars=4000", f"data.cache_dir={tmp_path}/c",
             "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "batch_size=2",
             "max_steps=6", "eval_interval=3", "ckpt_interval=3", "eval_batches=1", f"out_dir={tmp_path}/run"]
    return [a for it in items for a in ("--set", it)]


def test_train_then_eval_in_process(corpus, tmp_path, capsys):
    assert main(["train", "--quiet", *_sets(corpus, tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and Path(summary["checkpoint"]).exists()
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--lengths", "16,32", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "length" in out and "ppl" in out and "2x" in out
    assert (tmp_path / "run" / "eval_step6.json").exists()


def test_progress_lines(corpus, tmp_path, capsys):
    assert main(["train", *_sets(corpus, tmp_path), "--set", "log_every=2"]) == 0
    err = capsys.readouterr().err
    assert "step 2/6" in err and "tok/s" in err and "ETA" in err


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--set", "model.normalizer=bogus"], "normalizer"),
        (["--set", "model.n_head=5"], "n_head"),
        (["--set", "nonsense=1"], "nonsense"),
        (["--set", "lr"], "key=value"),
        (["--config", "/nonexistent/x.toml"], "x.toml"),
    ],
)
def test_bad_train_arguments_exit_2_with_message(corpus, tmp_path, capsys, args, pattern):
    assert main(["train", *_sets(corpus, tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "error" in err and pattern in err


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    res = subprocess.run([sys.executable, "-m", "sasoftmax", "grad-demo"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "softmax" in res.stdout and "sa_plain" in res.stdout


def test_main_job_script_runs_end_to_end(corpus, tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    cmd = [sys.executable, str(root / "scripts" / "main_job.py"), "--data", str(corpus), "--out", str(tmp_path / "o"),
           "--budget", "0", "--chunks", "1", "--tokens", "1024", "--set", "max_steps=2",
           "--set", "data.tokenizer=bytes", "--set", "data.doc_chars=4000", "--set", f"data.cache_dir={tmp_path / 'c'}",
           "--set", "eval_batches=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Part 1" in res.stdout and "1024 (8x)" in res.stdout
    saved = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert saved["steps"] == 2 and set(saved["runs"]) == {"softmax", "sa_softmax"}


def test_import_registers_a_user_normalizer(corpus, tmp_path, capsys, monkeypatch):
    """``--import MODULE`` runs the user's registration before the command: a normalizer defined outside the
    package trains through the CLI; a missing module is a clean error."""
    (tmp_path / "my_norms.py").write_text(
        "import torch\n"
        "from sasoftmax.normalizers import register_normalizer, unregister_normalizer, list_normalizers\n"
        "def half_softmax(s, visible, module=None):\n"
        "    return 0.5 * torch.softmax(s.masked_fill(~visible, float('-inf')), -1).nan_to_num(0.0)\n"
        "if 'test_half_softmax' in list_normalizers():\n"
        "    unregister_normalizer('test_half_softmax')\n"
        "register_normalizer('test_half_softmax', weights=half_softmax, description='test')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from sasoftmax.normalizers import unregister_normalizer

    try:
        args = ["--import", "my_norms", "train", "--quiet", *_sets(corpus, tmp_path), "--set",
                "model.normalizer=test_half_softmax"]
        assert main(args) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6
    finally:
        unregister_normalizer("test_half_softmax")
    assert main(["--import", "no_such_module_xyz", "grad-demo"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_diagnose_checkpoint(corpus, tmp_path, capsys):
    assert main(["train", "--quiet", *_sets(corpus, tmp_path)]) == 0
    capsys.readouterr()
    out_json = tmp_path / "diag.json"
    assert main(["diagnose", "--ckpt", str(tmp_path / "run"), "--lengths", "16,48", "--windows", "2",
                 "--out", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "L=16" in text and "L=48" in text and "score_grad_norm" in text
    saved = json.loads(out_json.read_text())
    assert [r["length"] for r in saved["results"]] == [16, 48] and saved["step"] == 6
    assert all(r["windows"] == 2 and r["diag/score_grad_norm"] > 0 for r in saved["results"])
    assert main(["diagnose", "--ckpt", str(tmp_path / "run"), "--windows", "0"]) == 2


def test_eval_dtype_choices_are_the_config_dtypes():
    """``sasoftmax eval --dtype`` takes what a config's ``dtype`` takes (cli.py keeps a literal list so that
    ``--help`` does not import torch)."""
    from sasoftmax.lm.cli import build_parser
    from sasoftmax.lm.config import DTYPE_NAMES

    args = build_parser().parse_args(["eval", "--ckpt", "run", "--dtype", "auto"])
    assert args.dtype == "auto"
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    choices = next(a.choices for a in eval_parser._actions if a.dest == "dtype")
    assert sorted(choices) == sorted(DTYPE_NAMES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--ckpt", "run", "--dtype", "half"])

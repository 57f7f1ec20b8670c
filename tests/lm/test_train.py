"""Trainer: exact resume after SIGKILL, corrupt-checkpoint fallback, accumulation, schedule, DDP/FSDP2."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sasoftmax.lm.config import ConfigError, TrainConfig, load_config
from sasoftmax.lm.trainer import lr_at, train

TEXT = "".join(
    f"Chapter {i}. It is a truth universally acknowledged that a model number {i * 31 % 97} needs data.\n"
    for i in range(3000)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "book.txt").write_text(TEXT)
    return d / "book.txt"


def _overrides(corpus: Path, out_dir: Path, cache: Path, **extra) -> list[str]:
    base = {
        "data.source": str(corpus), "data.tokenizer": "bytes", "data.doc_chars": 4000, "data.cache_dir": str(cache),
        "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 32,
        "model.normalizer": "sa_softmax", "model.positional": "alibi",
        "batch_size": 4, "max_steps": 30, "warmup": 3, "lr": 3e-3, "min_lr": 3e-4, "eval_interval": 10,
        "eval_batches": 2, "ckpt_interval": 10, "log_every": 10, "out_dir": str(out_dir), "seed": 7, "threads": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _losses(out_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, len(train_rows) + 1))
    return [r["loss"] for r in train_rows]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sasoftmax", "train", "--quiet", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _kill_after_checkpoint(cmd: list[str], run_dir: Path, ckpt: str, max_steps: int) -> None:
    proc = subprocess.Popen(cmd, env=_env())
    deadline = time.time() + 120
    while not (run_dir / f"{ckpt}.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "final.json").exists(), "the run finished before the kill; the test proves nothing"
    killed_at = max(json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert killed_at < max_steps


def test_sigkill_then_resume_matches_uninterrupted_run(corpus, tmp_path):
    """Fast version: reference and resume in this process, the killed run in a subprocess (one thread each)."""
    cache = tmp_path / "cache"
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    extra = {"max_steps": 100, "ckpt_interval": 10}
    ref = train(load_config(None, _overrides(corpus, ref_dir, cache, **extra)), quiet=True)
    _kill_after_checkpoint(_cmd(*_sets(_overrides(corpus, run_dir, cache, **extra))), run_dir, "ckpt_000020.pt", 100)
    got = train(load_config(None, _overrides(corpus, run_dir, cache, **extra)), resume=True, quiet=True)
    assert got["final_loss"] == ref["final_loss"], (got, ref)
    assert got["val_loss"] == ref["val_loss"]
    assert _losses(run_dir) == _losses(ref_dir), "every step's loss must match the uninterrupted run"


@pytest.mark.slow
def test_sigkill_then_resume_via_cli_matches_uninterrupted_run(corpus, tmp_path):
    """Every run through the CLI in its own process, as a user would do it."""
    cache = tmp_path / "cache"
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    extra = {"max_steps": 100, "ckpt_interval": 10, "model.dropout": 0.1}
    subprocess.run(_cmd(*_sets(_overrides(corpus, ref_dir, cache, **extra))), check=True, env=_env(), timeout=300)
    ref = json.loads((ref_dir / "final.json").read_text())
    _kill_after_checkpoint(_cmd(*_sets(_overrides(corpus, run_dir, cache, **extra))), run_dir, "ckpt_000030.pt", 100)
    res = subprocess.run(_cmd("--resume", *_sets(_overrides(corpus, run_dir, cache, **extra))), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads((run_dir / "final.json").read_text())
    assert got["final_loss"] == ref["final_loss"], (got, ref)
    assert _losses(run_dir) == _losses(ref_dir)


def test_corrupt_newest_checkpoint_resume_uses_previous(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    ref = train(load_config(None, _overrides(corpus, tmp_path / "ref", cache, **{"model.dropout": 0.1})), quiet=True)
    run_dir = tmp_path / "run"
    cfg = load_config(None, _overrides(corpus, run_dir, cache, **{"model.dropout": 0.1}))
    train(cfg, quiet=True)
    newest = run_dir / "ckpt_000030.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x55
    newest.write_bytes(bytes(data))
    out = train(cfg, resume=True)
    err = capsys.readouterr().err
    assert "resumed from" in err and "ckpt_000020.pt" in err
    assert out["final_loss"] == ref["final_loss"]
    assert (run_dir / "ckpt_000030.pt.bad").exists()
    assert (run_dir / "ckpt_000020.pt").exists(), "the previous good checkpoint must be kept"


def test_resume_with_another_model_config_fails(corpus, tmp_path):
    cache = tmp_path / "cache"
    train(load_config(None, _overrides(corpus, tmp_path / "r", cache, max_steps=10)), quiet=True)
    other = load_config(None, _overrides(corpus, tmp_path / "r", cache, max_steps=20, **{"model.n_embd": 64}))
    with pytest.raises(ConfigError, match="n_embd"):
        train(other, resume=True, quiet=True)


def test_grad_accumulation_matches_bigger_batch(corpus, tmp_path):
    cache = tmp_path / "cache"
    a = train(load_config(None, _overrides(corpus, tmp_path / "a", cache, batch_size=4, grad_accum=1)), quiet=True)
    b = train(load_config(None, _overrides(corpus, tmp_path / "b", cache, batch_size=2, grad_accum=2)), quiet=True)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-4
    assert abs(a["final_loss"] - b["final_loss"]) < 1e-4


def test_loss_goes_down_and_bfloat16_runs(corpus, tmp_path):
    cfg = load_config(None, _overrides(corpus, tmp_path / "bf", tmp_path / "cache", dtype="bfloat16", max_steps=40))
    out = train(cfg, quiet=True)
    losses = _losses(tmp_path / "bf")
    assert math.isfinite(out["final_loss"]) and out["val_loss"] is not None
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    rows = [json.loads(ln) for ln in (tmp_path / "bf" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ppl" in r for r in rows)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("model.normalizer=sparsemax", "normalizer"),
        ("model.positional=learned", "positional"),
        ("model.n_head=3", "n_head"),
        ("model.colour=blue", "model.colour"),
        ("learning_rate=0.1", "learning_rate"),
        ("data.sorce=x", "data.sorce"),
        ("batch_size=four", "batch_size"),
        ("batch_size=0", "batch_size"),
        ("dtype=float8", "dtype"),
        ("betas=0.9", "betas"),
        ("min_lr=1.0", "min_lr"),
        ("model.preset=huge", "preset"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(corpus, tmp_path, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cfg = load_config(None, _overrides(corpus, tmp_path / "x", tmp_path / "cache") + [override])
        train(cfg, quiet=True)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_empty_corpus_fails_naming_source(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = load_config(None, _overrides(empty, tmp_path / "x", tmp_path / "cache"))
    with pytest.raises(ValueError, match="empty.txt"):
        train(cfg, quiet=True)


def test_toml_config_file(tmp_path, corpus):
    path = tmp_path / "c.toml"
    path.write_text(
        'max_steps = 12\nbetas = [0.8, 0.9]\n[model]\npreset = "tiny"\nnormalizer = "softmax"\nn_layer = 1\n'
        f'[data]\nsource = "{corpus}"\ntokenizer = "bytes"\n'
    )
    cfg = load_config(path, ["max_steps=13", "model.n_kv_head=2"])
    assert cfg.max_steps == 13 and cfg.betas == (0.8, 0.9)
    assert cfg.model == {"preset": "tiny", "block_size": 128, "normalizer": "softmax", "n_layer": 1, "n_kv_head": 2}
    assert cfg.data.source == str(corpus) and cfg.data.tokenizer == "bytes"
    path.write_text("max_steps = 'ten'\n")
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(path)
    path.write_text("[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match="optim"):
        load_config(path)


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(f for f in root.glob("*.toml") if not f.name.startswith("grid_"))  # grid files: test_grid.py
    assert files, "no configs/*.toml"
    for f in files:
        cfg = load_config(f)
        assert cfg.max_steps >= 1


# ------------------------------------------------------------------------------------------------ torchrun


def _torchrun(nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "sasoftmax", "train", "--quiet", *args]
    env = _env()
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_ddp_matches_single_process(corpus, tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    extra = {"max_steps": 12, "ckpt_interval": 6, "eval_interval": 6}
    train(load_config(None, _overrides(corpus, single, cache, batch_size=2, grad_accum=2, **extra)), quiet=True)
    ddp = tmp_path / "ddp"  # with gradient diagnostics on: they must neither hang DDP nor change training
    res = _torchrun(2, _sets(_overrides(corpus, ddp, cache, batch_size=2, grad_accum=1, diag_interval=5, **extra)))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "diag/score_grad_norm" in r] == [1, 5, 10]
    a, b = _losses(single), _losses(ddp)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    fa = json.loads((single / "final.json").read_text())
    fb = json.loads((ddp / "final.json").read_text())
    assert fb["world_size"] == 2
    assert abs(fa["val_loss"] - fb["val_loss"]) < 1e-4
    state = torch.load(ddp / "ckpt_000012.pt", weights_only=True)
    assert len(state["rng"]) == 2, "checkpoints hold the RNG state of every rank"


def _fsdp_available() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return f"torch.distributed.fsdp.fully_shard unavailable: {err}"
    if not torch.distributed.is_gloo_available():
        return "gloo backend unavailable"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_fsdp_available() is not None, reason=str(_fsdp_available()))
def test_torchrun_fsdp2_constructs_and_trains_on_cpu(corpus, tmp_path):
    cache = tmp_path / "cache"
    extra = {"max_steps": 6, "ckpt_interval": 3, "eval_interval": 3, "model.n_layer": 2}
    train(load_config(None, _overrides(corpus, tmp_path / "single", cache, batch_size=2, grad_accum=2, **extra)),
          quiet=True)
    run = tmp_path / "fsdp"
    res = _torchrun(2, _sets(_overrides(corpus, run, cache, batch_size=2, fsdp="true", diag_interval=3, **extra)))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "diag/score_grad_norm" in r] == [1, 3, 6]
    a, b = _losses(tmp_path / "single"), _losses(run)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    state = torch.load(run / "ckpt_000006.pt", weights_only=True)
    assert state["model"]["wte.weight"].shape == (256, 32), "checkpoints hold full (unsharded) tensors"


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (read from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    order, todo = [], [pid]
    while todo:
        p = todo.pop()
        order.append(p)
        todo += children.get(p, [])
    for p in reversed(order):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(_fsdp_available() is not None, reason=str(_fsdp_available()))
def test_fsdp2_sharded_checkpoint_sigkill_resumes_on_one_process(corpus, tmp_path):
    """FSDP2 on 2 processes with sharded checkpoints, killed after step 8's checkpoint; step 8's checkpoint then
    loses half of a shard, so resuming on ONE process must detect it, fall back to step 4, reshard, keep the global
    batch, and continue like the uninterrupted 2-process run."""
    cache = tmp_path / "cache"
    extra = {"max_steps": 12, "ckpt_interval": 4, "eval_interval": 4, "model.n_layer": 2, "batch_size": 2,
             "fsdp": "true", "ckpt_format": "sharded"}
    ref = tmp_path / "ref"
    res = _torchrun(2, _sets(_overrides(corpus, ref, cache, **extra)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen([*_torchrun_cmd(2), *_sets(_overrides(corpus, run, cache, **extra))], env=_torchrun_env())
    deadline = time.time() + 240
    while not (run / "ckpt_000008" / "manifest.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    _kill_tree(proc.pid)  # torchrun starts each worker in a session of its own
    proc.wait()
    assert not (run / "final.json").exists(), "the run finished before the kill; the test proves nothing"
    shard = run / "ckpt_000008" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    got = train(load_config(None, _overrides(corpus, run, cache, **extra)), resume=True, quiet=True)
    assert got["steps"] == 12 and got["world_size"] == 1
    a, b = _losses(ref), _losses(run)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    assert (run / "ckpt_000008.bad").is_dir(), "the damaged checkpoint is set aside"
    assert json.loads((run / "ckpt_000012" / "manifest.json").read_text())["format"] == "sharded"


@pytest.mark.slow
@pytest.mark.skipif(_fsdp_available() is not None, reason=str(_fsdp_available()))
def test_one_process_sharded_checkpoint_resumes_on_two(corpus, tmp_path):
    """A sharded checkpoint of one process resumes under DDP on two (the FSDP2 direction is tested above)."""
    cache = tmp_path / "cache"
    extra = {"max_steps": 12, "ckpt_interval": 6, "eval_interval": 6, "model.n_layer": 2, "ckpt_format": "sharded"}
    ref = tmp_path / "ref"
    res = _torchrun(2, _sets(_overrides(corpus, ref, cache, batch_size=2, **extra)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    train(load_config(None, _overrides(corpus, run, cache, batch_size=2, grad_accum=2, stop_at=6, **extra)),
          quiet=True)
    res = subprocess.run([*_torchrun_cmd(2), "--resume", *_sets(_overrides(corpus, run, cache, batch_size=2,
                                                                           **extra))],
                         env=_torchrun_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(ref), _losses(run)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    assert json.loads((run / "final.json").read_text())["world_size"] == 2


def test_sharded_checkpoints_resume_exactly_and_evaluate(corpus, tmp_path):
    """Single process: a sharded run stopped and resumed equals an uninterrupted one bit for bit; evaluation and
    the old single-file checkpoints of the same directory still load."""
    from sasoftmax.lm.checkpoint import list_checkpoints, load_run
    from sasoftmax.lm.evaluate import evaluate_checkpoint

    cache = tmp_path / "cache"
    ref = train(load_config(None, _overrides(corpus, tmp_path / "ref", cache, max_steps=20)), quiet=True)
    run = tmp_path / "run"
    train(load_config(None, _overrides(corpus, run, cache, max_steps=20, stop_at=10)), quiet=True)  # single file
    got = train(load_config(None, _overrides(corpus, run, cache, max_steps=20, ckpt_format="sharded")), resume=True,
                quiet=True)
    assert got["final_loss"] == ref["final_loss"] and _losses(run) == _losses(tmp_path / "ref")
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_000020", "ckpt_000010.pt"]
    path, state = load_run(run)
    assert path.name == "ckpt_000020" and state["format"] == "sharded" and "optimizer" not in state
    single = torch.load(tmp_path / "ref" / "ckpt_000020.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], single["model"][k]) for k in single["model"])
    res = evaluate_checkpoint(run, [32], tokens_per_length=64)
    assert res["step"] == 20 and res["results"][0]["ppl"] > 1


def _torchrun_cmd(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", "-m",
            "sasoftmax", "train", "--quiet"]


def _torchrun_env() -> dict[str, str]:
    env = _env()
    env.pop("WORLD_SIZE", None)
    return env


def test_stop_at_and_time_limit_keep_the_schedule(corpus, tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    train(load_config(None, _overrides(corpus, full, cache)), quiet=True)
    part = tmp_path / "part"
    out = train(load_config(None, _overrides(corpus, part, cache, stop_at=12)), quiet=True)
    assert out["steps"] == 12 and out["stopped_early"] is None
    assert _losses(part) == _losses(full)[:12]
    assert (part / "ckpt_000012.pt").exists()
    quick = train(load_config(None, _overrides(corpus, tmp_path / "quick", cache, time_limit_s=1e-9)), quiet=True)
    assert quick["steps"] == 1 and "time_limit_s" in quick["stopped_early"]
    assert _losses(tmp_path / "quick") == _losses(full)[:1]


def test_resume_of_a_finished_run_reports_its_result(corpus, tmp_path):
    cfg = load_config(None, _overrides(corpus, tmp_path / "r", tmp_path / "cache", max_steps=10))
    first = train(cfg, quiet=True)
    again = train(cfg, resume=True, quiet=True)
    assert again["steps"] == 10
    assert again["final_loss"] == first["final_loss"] and again["val_loss"] == first["val_loss"]
    assert len(_losses(tmp_path / "r")) == 10


@pytest.mark.slow
def test_compile_option_trains_like_eager(corpus, tmp_path):
    cache = tmp_path / "cache"
    eager = train(load_config(None, _overrides(corpus, tmp_path / "e", cache, max_steps=6)), quiet=True)
    compiled = train(load_config(None, _overrides(corpus, tmp_path / "c", cache, max_steps=6, compile="true")),
                     quiet=True)
    assert compiled["steps"] == 6
    assert abs(compiled["final_loss"] - eager["final_loss"]) < 1e-3
    state = torch.load(compiled["checkpoint"], weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state["model"]), "checkpoints hold the uncompiled names"


def test_tensorboard_logging_writes_the_metrics(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb_run"
    train(load_config(None, _overrides(corpus, run, tmp_path / "cache", max_steps=10, tensorboard="true")),
          quiet=True)
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "val_loss", "val_ppl"} <= tags
    losses = [e.value for e in acc.Scalars("loss")]
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 11))
    assert losses == pytest.approx(_losses(run), rel=1e-6)


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_is_bfloat16_only_with_native_bf16(monkeypatch, native):
    """``dtype = "auto"``: bf16 autocast where the CPU computes bf16 in hardware, float32 where it would be emulated
    (~25x slower on an AVX2 CPU); explicit names stay as they are; a bad name is an error naming the key."""
    from sasoftmax.lm import config

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    cpu = torch.device("cpu")
    assert config.native_bf16(cpu) is native
    assert config.resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert config.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert config.resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ConfigError, match="dtype must be one of"):
        config.resolve_dtype("bf16", cpu)
    with pytest.raises(ConfigError, match="dtype"):
        load_config(None, ["dtype=half"])
    assert load_config(None, ["dtype=auto"]).dtype == "auto"


def test_pack_documents_trains_with_document_ids(corpus, tmp_path, monkeypatch):
    """data.pack_documents: every training forward gets the documents of its rows (from the BPE end-of-text token),
    the run trains; the byte tokenizer (no end-of-text token) is refused."""
    from sasoftmax.lm.model import GPT

    seen: list[torch.Tensor] = []
    original = GPT.forward

    def recording(self, idx, targets=None, **kw):
        if self.training:
            seen.append(kw.get("doc_ids"))
        return original(self, idx, targets, **kw)

    monkeypatch.setattr(GPT, "forward", recording)
    over = _overrides(corpus, tmp_path / "packed", tmp_path / "cache", **{"data.tokenizer": "bpe",
                      "data.vocab_size": 300, "data.doc_chars": 500, "data.pack_documents": "true",
                      "max_steps": 6, "eval_interval": 6, "ckpt_interval": 6})
    out = train(load_config(None, over), quiet=True)
    assert math.isfinite(out["final_loss"])
    assert len(seen) == 6 and all(d is not None and d.shape == (4, 32) for d in seen)
    assert any(int(d.max()) > 0 for d in seen), "no row held a document boundary; the test proves nothing"
    with pytest.raises((ConfigError, ValueError), match="pack_documents"):
        train(load_config(None, _overrides(corpus, tmp_path / "bytes", tmp_path / "cache",
                                           **{"data.pack_documents": "true"})), quiet=True)

"""Atomic, verified checkpoints: round trip, truncation/corruption detection, fallback to the previous good one."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sasoftmax.lm.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    set_aside_newer,
)


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(64, 64, generator=g), "cfg": {"lr": 1e-3, "name": "x"},
            "py_rng": (3, tuple(range(10)), None)}


def test_round_trip_and_pruning(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt_000030.pt", "ckpt_000020.pt"]
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
    state = load_checkpoint(tmp_path / "ckpt_000030.pt")
    assert state["step"] == 30 and torch.equal(state["w"], _state(30)["w"])
    assert state["py_rng"] == (3, tuple(range(10)), None)
    manifest = json.loads((tmp_path / "ckpt_000030.pt.json").read_text())
    assert manifest["size"] == (tmp_path / "ckpt_000030.pt").stat().st_size


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 5, _state(5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 5, _state(5))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_unfinished_write_without_manifest(tmp_path):
    path = save_checkpoint(tmp_path, 5, _state(5))
    (tmp_path / "ckpt_000005.pt.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(path)
    garbage = tmp_path / "ckpt_000007.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(garbage, verify=False)


def test_load_latest_falls_back_to_previous_good(tmp_path, caplog):
    save_checkpoint(tmp_path, 10, _state(10))
    newest = save_checkpoint(tmp_path, 20, _state(20))
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="sasoftmax.lm.checkpoint"):
        path, state = load_latest(tmp_path)
    assert path.name == "ckpt_000010.pt" and state["step"] == 10
    assert "falling back to the previous checkpoint ckpt_000010.pt" in caplog.text
    moved = set_aside_newer(tmp_path, 10)
    assert {p.name for p in moved} == {"ckpt_000020.pt.bad", "ckpt_000020.pt.json.bad"}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000010.pt"]


def test_load_latest_with_nothing_usable(tmp_path):
    assert load_latest(tmp_path) is None
    bad = save_checkpoint(tmp_path, 1, _state(1))
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        load_latest(tmp_path)

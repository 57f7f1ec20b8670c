"""Atomic, verified training checkpoints.

Layout inside a run directory::

    ckpt_000200.pt        torch.save of the state dict (model, optimizer, scheduler, step, RNG states, configs)
    ckpt_000200.pt.json   manifest: {"step", "size", "sha256"} written *after* the data file is durable

Both files are written to a temporary file in the same directory, flushed, fsync'ed and moved into place with
``os.replace``, then the directory is fsync'ed. A checkpoint counts only when its manifest exists and the data file
matches the manifest's size and SHA-256, so a write cut short (process killed, disk full) or a file damaged later is
detected with a clear :class:`CheckpointError` instead of an obscure unpickling failure. ``keep`` most recent good
checkpoints are kept (default 2: the newest and the previous good one); :func:`load_latest` falls back to the
previous good one when the newest cannot be read, and logs that it did.

States are loaded with ``torch.load(weights_only=True)``: they hold only tensors and plain Python values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import atomic_write

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "load_latest",
    "load_run",
    "prune",
    "set_aside_newer",
    "atomic_write",
    "rng_state",
    "set_rng_state",
    "full_state",
    "load_full_state",
]

log = logging.getLogger("sasoftmax.lm.checkpoint")

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or unreadable."""


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:06d}.pt"


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then delete all but the ``keep`` newest.

    Returns the path of the new checkpoint file."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    atomic_write(path, lambda f: torch.save(state, f))
    digest, size = _sha256(path)
    manifest = json.dumps({"step": step, "size": size, "sha256": digest}).encode()
    atomic_write(path.with_name(path.name + ".json"), lambda f: f.write(manifest))
    prune(directory, keep)
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint data files in ``directory``, newest step first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def prune(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their manifests)."""
    for path in list_checkpoints(directory)[keep:]:
        for p in (path, path.with_name(path.name + ".json")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True) -> dict:
    """Load one checkpoint file, checking it against its manifest first.

    Raises :class:`CheckpointError` naming the file when it is missing, has no manifest (an interrupted write),
    is truncated, does not match its checksum, or cannot be unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if verify:
        manifest_path = path.with_name(path.name + ".json")
        if not manifest_path.is_file():
            raise CheckpointError(f"checkpoint {path} has no manifest {manifest_path.name}: its write did not finish")
        try:
            manifest = json.loads(manifest_path.read_text())
            want_size, want_hash = int(manifest["size"]), str(manifest["sha256"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {err}") from err
        digest, size = _sha256(path)
        if size != want_size:
            raise CheckpointError(f"checkpoint {path} is truncated or resized: {size} bytes, expected {want_size}")
        if digest != want_hash:
            raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 mismatch with its manifest")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err


def load_run(ckpt: str | os.PathLike, step: int | None = None) -> tuple[Path, dict]:
    """``(path, state)`` of a checkpoint file, or of a run directory's checkpoint of ``step`` (default: the newest
    loadable one); :class:`CheckpointError` when there is none."""
    path = Path(ckpt)
    if path.is_dir():
        if step is not None:
            return checkpoint_path(path, step), load_checkpoint(checkpoint_path(path, step))
        found = load_latest(path)
        if found is None:
            raise CheckpointError(f"--ckpt {path}: the directory holds no checkpoint (ckpt_*.pt)")
        return found
    if step is not None:
        raise ValueError(f"--step {step} needs a run directory, got the checkpoint file {path}")
    return path, load_checkpoint(path)


def load_latest(
    directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``directory`` that loads, falling back past bad ones (each logged as a warning).

    Returns ``(path, state)``, or ``None`` when the directory holds no checkpoint at all. Raises
    :class:`CheckpointError` when there are checkpoints but none of them loads."""
    paths = list_checkpoints(directory)
    if not paths:
        return None
    errors = []
    for i, path in enumerate(paths):
        try:
            state = load_checkpoint(path, map_location=map_location)
        except CheckpointError as err:
            errors.append(str(err))
            nxt = paths[i + 1].name if i + 1 < len(paths) else None
            log.warning("%s; %s", err, f"falling back to the previous checkpoint {nxt}" if nxt else "no older one")
            continue
        return path, state
    raise CheckpointError(f"no loadable checkpoint in {directory}: " + " | ".join(errors))


def set_aside_newer(directory: str | os.PathLike, step: int) -> list[Path]:
    """Rename checkpoints newer than ``step`` (the bad ones a resume skipped) to ``*.pt.bad`` so that they neither
    shadow the checkpoints written next nor get pruned in their place. Returns the new names."""
    moved = []
    for path in list_checkpoints(directory):
        if int(_NAME.match(path.name).group(1)) <= step:
            continue
        for p in (path, path.with_name(path.name + ".json")):
            if p.exists():
                target = p.with_name(p.name + ".bad")
                os.replace(p, target)
                moved.append(target)
        log.warning("set aside unusable checkpoint %s", path.name)
    return moved


# ------------------------------------------------------------------------------------------------ training state


def rng_state() -> dict[str, Any]:
    """This process's random states (torch, numpy, python, and CUDA when in use), as plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_state(model: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; with FSDP2 gathered to CPU (a collective: every rank calls
    it)."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a checkpoint's full ``model`` / ``optimizer`` state dicts (sharding them under FSDP2)."""
    if not fsdp:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
    )

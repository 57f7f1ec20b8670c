"""Atomic, verified training checkpoints, in one file or sharded.

Layout inside a run directory, single-file format (``ckpt_format = "single"``, the default)::

    ckpt_000200.pt        torch.save of the state dict (model, optimizer, scheduler, step, RNG states, configs)
    ckpt_000200.pt.json   manifest: {"step", "size", "sha256"} written *after* the data file is durable

sharded format (``ckpt_format = "sharded"``: ``torch.distributed.checkpoint``, each rank writes its own shards of the
model and optimizer, so nothing is gathered on one rank; it loads on any number of processes, resharding)::

    ckpt_000200/          .metadata, __<rank>_0.distcp ...: the model and optimizer state (DCP)
                          extra.pt: scheduler, scaler, step, RNG states of every rank, configs (rank 0)
                          manifest.json: {"step", "format", "files": {name: {"size", "sha256"}}}, written last

A sharded checkpoint is written into ``.ckpt_000200.partial/`` and renamed into place by rank 0 once every rank's
shards and the manifest are durable: a step's checkpoint is complete or absent.

Single files are written to a temporary file in the same directory, flushed, fsync'ed and moved into place with
``os.replace``, then the directory is fsync'ed. A checkpoint counts only when its manifest exists and the data file
matches the manifest's size and SHA-256, so a write cut short (process killed, disk full) or a file damaged later is
detected with a clear :class:`CheckpointError` instead of an obscure unpickling failure. ``keep`` most recent good
checkpoints are kept (default 2: the newest and the previous good one); :func:`load_latest` falls back to the
previous good one when the newest cannot be read, and logs that it did.

States are loaded with ``torch.load(weights_only=True)``: they hold only tensors and plain Python values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import atomic_write, fsync_dir

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "load_latest",
    "load_run",
    "save_sharded",
    "load_sharded_into",
    "is_sharded",
    "step_of",
    "prune",
    "set_aside_newer",
    "atomic_write",
    "rng_state",
    "set_rng_state",
    "full_state",
    "load_full_state",
]

log = logging.getLogger("sasoftmax.lm.checkpoint")

_NAME = re.compile(r"^ckpt_(\d+)(\.pt)?$")
MANIFEST = "manifest.json"
EXTRA = "extra.pt"


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


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (``ckpt_<step>/``)."""
    return path.is_dir() and bool(_NAME.match(path.name)) and not path.name.endswith(".pt")


def step_of(path: Path) -> int:
    """The step in a checkpoint's name."""
    m = _NAME.match(path.name)
    if not m:
        raise ValueError(f"{path.name} is not a checkpoint name (ckpt_<step>.pt or ckpt_<step>/)")
    return int(m.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory`` (files ``ckpt_<step>.pt`` and sharded directories ``ckpt_<step>/``), newest step
    first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p.is_dir(), p) for p in directory.iterdir() if (m := _NAME.match(p.name))
             and (p.is_dir() != p.name.endswith(".pt"))]
    return [p for _, _, p in sorted(found, reverse=True)]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return
    for p in (path, path.with_name(path.name + ".json")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def prune(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their manifests)."""
    for path in list_checkpoints(directory)[keep:]:
        _remove(path)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True,
                    weights: bool = True) -> dict:
    """Load one checkpoint (file or sharded directory), checking it against its manifest first.

    A sharded checkpoint's state holds what its ``extra.pt`` holds, ``"format": "sharded"``, and with ``weights``
    the model's full state dict under ``"model"`` (read on this process alone, for evaluation and export; training
    restores model and optimizer with :func:`load_sharded_into`). Raises :class:`CheckpointError` naming the file
    when it is missing, has no manifest (an interrupted write), is truncated, does not match its checksum, or cannot
    be unpickled."""
    path = Path(path)
    if is_sharded(path):
        return _load_sharded(path, map_location, verify, weights)
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
    if path.is_dir() and not is_sharded(path):
        if step is not None:
            found = [p for p in list_checkpoints(path) if step_of(p) == step]
            if not found:
                raise CheckpointError(f"--step {step}: {path} holds no checkpoint of that step")
            return found[0], load_checkpoint(found[0])
        latest = load_latest(path)
        if latest is None:
            raise CheckpointError(f"--ckpt {path}: the directory holds no checkpoint (ckpt_*.pt or ckpt_*/)")
        return latest
    if step is not None:
        raise ValueError(f"--step {step} needs a run directory, got the checkpoint file {path}")
    return path, load_checkpoint(path)


def load_latest(
    directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", weights: bool = True
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
            state = load_checkpoint(path, map_location=map_location, weights=weights)
        except CheckpointError as err:
            errors.append(str(err))
            nxt = paths[i + 1].name if i + 1 < len(paths) else None
            log.warning("%s; %s", err, f"falling back to the previous checkpoint {nxt}" if nxt else "no older one")
            continue
        return path, state
    raise CheckpointError(f"no loadable checkpoint in {directory}: " + " | ".join(errors))


def set_aside_newer(directory: str | os.PathLike, step: int) -> list[Path]:
    """Rename checkpoints newer than ``step`` (the bad ones a resume skipped) to ``*.bad`` so that they neither
    shadow the checkpoints written next nor get pruned in their place. Returns the new names."""
    moved = []
    for path in list_checkpoints(directory):
        if step_of(path) <= step:
            continue
        for p in (path, path.with_name(path.name + ".json")):
            if p.exists():
                target = p.with_name(p.name + ".bad")
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(p, target)
                moved.append(target)
        log.warning("set aside unusable checkpoint %s", path.name)
    return moved


# ------------------------------------------------------------------------------------------------ sharded


def _manifest(files_dir: Path, step: int) -> dict[str, Any]:
    files = {}
    for f in sorted(p for p in files_dir.iterdir() if p.is_file() and p.name != MANIFEST):
        digest, size = _sha256(f)
        files[f.name] = {"size": size, "sha256": digest}
    return {"step": step, "format": "sharded", "files": files}


def _verify_sharded(path: Path) -> None:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: its write did not finish")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {err}") from err
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: shard {name} is missing")
        digest, size = _sha256(f)
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated or resized ({size} bytes, expected "
                                  f"{want['size']})")
        if digest != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (SHA-256 mismatch with the manifest)")


def _load_sharded(path: Path, map_location: str | torch.device, verify: bool, weights: bool) -> dict:
    if verify:
        _verify_sharded(path)
    try:
        state = torch.load(path / EXTRA, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: {EXTRA} cannot be loaded: {type(err).__name__}: {err}") from err
    state["format"] = "sharded"
    if weights:
        from .model import GPT, GPTConfig

        model = GPT(GPTConfig.from_dict(state["model_config"]))
        state["model"] = _dcp_load_model(path, model)
    return state


def _dcp_load_model(path: Path, model: nn.Module) -> dict:
    import torch.distributed.checkpoint as dcp

    sd = model.state_dict()
    try:
        with _single_process_quiet():
            dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: the model shards cannot be read: {type(err).__name__}: {err}") \
            from err
    return sd


def save_sharded(directory: str | os.PathLike, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                 extra: dict[str, Any], dist: Any, *, keep: int = 2) -> Path:
    """Write a sharded checkpoint (every rank calls it; ``dist`` is the run's
    :class:`sasoftmax.lm.distributed.Dist`): the model and optimizer state with ``torch.distributed.checkpoint``,
    ``extra`` (rank 0's: scheduler, step, RNG states, ...) beside them, the manifest last, then the rename into
    ``ckpt_<step>/``. Returns that path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    final = directory / f"ckpt_{step:06d}"
    tmp = directory / f".ckpt_{step:06d}.partial"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, opt_sd = get_state_dict(model, opt)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(tmp), no_dist=not dist.enabled)
    dist.barrier()  # every rank's shards are written
    if dist.main:
        atomic_write(tmp / EXTRA, lambda f: torch.save(extra, f))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        manifest = json.dumps(_manifest(tmp, step)).encode()
        atomic_write(tmp / MANIFEST, lambda f: f.write(manifest))
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        prune(directory, keep)
    dist.barrier()
    return final


def load_sharded_into(path: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer, distributed: bool) -> None:
    """Load a sharded checkpoint's model and optimizer state into ``model`` / ``opt`` (any number of processes,
    sharded with FSDP2 or not: ``torch.distributed.checkpoint`` reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    with _single_process_quiet():  # loads in place into the two state dicts
        dcp.load({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(path), no_dist=not distributed)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd)


@contextlib.contextmanager
def _single_process_quiet():
    """Without a process group DCP warns on every call that it assumes a single process; that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ------------------------------------------------------------------------------------------------ training state


def rng_state() -> dict[str, Any]:
    """This process's random states (torch, numpy, python, and CUDA when in use), as plain values."""
    np_state: Any = np.random.get_state()  # the legacy tuple (its stub is a union)
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

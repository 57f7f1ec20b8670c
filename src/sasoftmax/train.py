"""GPT training: configuration, single-process / DDP / FSDP2 loop, exact resume.

Entry point: :func:`train` (``sasoftmax train --config configs/x.toml --set key=value ...``).

* Config: :class:`TrainConfig`, loaded from TOML (Python >= 3.11 ``tomllib``; on 3.10 the ``tomli`` package if
  installed) or JSON, then ``--set a.b=c`` overrides, each type-checked; an unknown key is an error naming it.
  ``[model]`` holds ``preset`` plus any :class:`sasoftmax.model.GPTConfig` field (``block_size`` = training length);
  ``[data]`` holds :class:`sasoftmax.data.DataConfig`; everything else is top level.
* Loop: AdamW (``GPT.configure_optimizer``), linear warmup then cosine decay to ``min_lr``, gradient clipping,
  gradient accumulation, autocast (``bfloat16`` on CPU/GPU, ``float16`` on GPU with a grad scaler), optional
  ``torch.compile``. Progress lines (loss, tokens/s, ETA) on stderr; metrics as JSONL in ``out_dir/metrics.jsonl``;
  TensorBoard when ``tensorboard = true`` and the package is installed.
* Checkpoints (:mod:`sasoftmax.checkpoint`) every ``ckpt_interval`` steps and at the end: model, optimizer, scheduler,
  step, RNG states of every rank (torch, numpy, python), data position and both configs. The batch of step ``s`` is a
  pure function of ``(seed, s)`` (:class:`sasoftmax.data.BatchSampler`), so ``resume=True`` continues exactly: on
  CPU the losses of a resumed run equal those of an uninterrupted one bit for bit.
* Distributed: under ``torchrun`` (env ``WORLD_SIZE`` > 1) the same code runs DDP (gloo on CPU, nccl on GPU); the
  global batch is ``batch_size * world_size * grad_accum`` and equals a single-process run with
  ``grad_accum * world_size``. ``fsdp = true`` shards each transformer block and the root with FSDP2
  (``torch.distributed.fsdp.fully_shard``); checkpoints then hold full (unsharded) state dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, load_latest, save_checkpoint, set_aside_newer
from .data import BatchSampler, DataConfig, TokenData, load_token_data

__all__ = [
    "ConfigError",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "build_model_config",
    "train",
    "lr_at",
]

log = logging.getLogger("sasoftmax.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A configuration key is unknown or a value has the wrong type or range (the message names the key)."""


@dataclass
class TrainConfig:
    """Everything a training run needs. ``model`` is ``{"preset": name, **GPTConfig overrides}``.

    Attributes (beyond ``model`` and ``data``):
        batch_size: sequences per micro-batch per rank. grad_accum: micro-batches per optimizer step.
        lr, min_lr: peak and final learning rate. warmup: linear warmup steps. max_steps: optimizer steps.
        weight_decay, betas: AdamW. grad_clip: max global gradient norm (0 = off).
        dtype: autocast dtype, ``float32`` (no autocast), ``bfloat16`` or ``float16`` (CUDA only).
        compile: wrap the model in ``torch.compile``. device: ``auto``, ``cpu``, ``cuda``.
        eval_interval: validation every N steps (and at the end; 0 = only at the end). eval_batches: batches per
        validation. ckpt_interval: checkpoint every N steps (and at the end; 0 = only at the end). keep_checkpoints:
        how many recent checkpoints stay on disk (>= 2 keeps a previous good one). out_dir: run directory.
        seed: model init and batch order. log_every: progress line every N steps. tensorboard: also log to
        TensorBoard. fsdp: shard with FSDP2 instead of DDP. threads: ``torch.set_num_threads`` (0 = leave as is).
        stop_at: stop after this step while keeping the learning-rate schedule of ``max_steps`` (0 = run to
        ``max_steps``). time_limit_s: stop (validate, checkpoint, summarize) once training has taken this many
        seconds (0 = no limit); the summary then says ``stopped_early``. Neither changes what a step computes.
        diag_interval: gradient diagnostics (:mod:`sasoftmax.diagnostics`) on a fixed validation batch at step 1 and
        every N steps (0 = off), written to ``metrics.jsonl`` as ``diag/...`` keys; they change nothing in training.
        diag_batch_size: sequences in that batch.
    """

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny", "block_size": 128})
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "float32"
    compile: bool = False
    device: str = "auto"
    eval_interval: int = 200
    eval_batches: int = 20
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    seed: int = 1337
    log_every: int = 10
    tensorboard: bool = False
    fsdp: bool = False
    threads: int = 0
    stop_at: int = 0
    time_limit_s: float = 0.0
    diag_interval: int = 0
    diag_batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        _merge(cfg, d, prefix="")
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        positive = ("batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "keep_checkpoints",
                    "diag_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_interval", "ckpt_interval", "threads", "stop_at", "time_limit_s", "diag_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.model.get("preset", "tiny"), str):
            raise ConfigError(f"model.preset must be a string, got {self.model.get('preset')!r}")
        try:
            self.data.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from err


# ------------------------------------------------------------------------------------------------ config files


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (values from files) or convert (strings from ``--set``) ``value`` to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} expects {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - programming error


def _model_fields() -> dict[str, Any]:
    from .model import GPTConfig

    hints = _hints(GPTConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(GPTConfig)}


def _set_model_key(model: dict[str, Any], key: str, value: Any, full: str) -> None:
    if key == "preset":
        model["preset"] = _coerce(full, value, str)
        return
    fields = _model_fields()
    if key not in fields:
        raise ConfigError(f"unknown config key {full!r} (model keys: preset, {', '.join(sorted(fields))})")
    if key == "vocab_size":
        raise ConfigError(f"{full} is set by the tokenizer (data.vocab_size / data.tokenizer), not in [model]")
    model[key] = _coerce(full, value, fields[key])


def _merge(cfg: TrainConfig, d: dict[str, Any], prefix: str) -> None:
    hints = _hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in d.items():
        full = prefix + key
        if key not in names:
            raise ConfigError(f"unknown config key {full!r} (valid: {', '.join(sorted(names))})")
        if key == "model":
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a table of model settings, got {value!r}")
            for mk, mv in value.items():
                _set_model_key(cfg.model, mk, mv, f"{full}.{mk}")
        elif key == "data":
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a table of data settings, got {value!r}")
            dhints = _hints(DataConfig)
            for dk, dv in value.items():
                if dk not in dhints:
                    raise ConfigError(f"unknown config key '{full}.{dk}' (data keys: {', '.join(sorted(dhints))})")
                setattr(cfg.data, dk, _coerce(f"{full}.{dk}", dv, dhints[dk]))
        else:
            setattr(cfg, key, _coerce(full, value, hints[key]))


def _read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as err:
            raise ConfigError(
                f"reading {path} needs Python >= 3.11 (tomllib) or the `tomli` package; or use a .json config"
            ) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: {err}") from err


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` / ``section.key=value`` strings (``--set``) to ``cfg`` in place, type-checked."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) == 1:
            _merge(cfg, {key: value}, "")
        elif len(parts) == 2 and parts[0] in ("model", "data"):
            if parts[0] == "model":
                _set_model_key(cfg.model, parts[1], value, key)
            else:
                _merge(cfg, {"data": {parts[1]: value}}, "")
        else:
            raise ConfigError(f"unknown config key {key!r}")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the file (TOML or JSON) at ``path``, then ``overrides``; validated."""
    cfg = TrainConfig()
    if path is not None:
        _merge(cfg, _read_config_file(path), "")
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def build_model_config(model: dict[str, Any], vocab_size: int):
    """The :class:`sasoftmax.model.GPTConfig` for ``model`` (``preset`` + overrides) and a vocabulary size."""
    from .model import GPTConfig

    settings = dict(model)
    preset = settings.pop("preset", "tiny")
    fields = _model_fields()
    for key, value in settings.items():  # values from from_dict/JSON may still be strings
        if key not in fields:
            raise ConfigError(f"unknown config key 'model.{key}'")
        settings[key] = _coerce(f"model.{key}", value, fields[key])
    try:
        gcfg = GPTConfig.from_preset(preset, vocab_size=vocab_size, **settings)
        gcfg.validate()
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"model: {err}") from err
    return gcfg


# ------------------------------------------------------------------------------------------------ helpers


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.max_steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    return _Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def _device(cfg: TrainConfig, d: _Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _Metrics:
    """Rank-0 JSONL writer (+ optional TensorBoard)."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop rows written after the checkpoint we resume from
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError as err:
                log.warning("tensorboard=true but TensorBoard is unavailable (%s); writing JSONL only", err)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the largest ``nn.ModuleList`` in the model), for FSDP2 per-block sharding."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _wrap_fsdp(model: nn.Module, mp_dtype: torch.dtype | None) -> nn.Module:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as err:  # torch < 2.6
        raise RuntimeError(f"fsdp=true needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {err}") from err
    kwargs = {}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _full_state(model: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
    )


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: np.ndarray, seq_len: int, batch_size: int, n_batches: int, seed: int,
                  device: torch.device, autocast: contextlib.AbstractContextManager | None = None) -> float:
    """Mean cross-entropy over ``n_batches`` fixed random batches of ``data`` (same batches every call)."""
    was_training = model.training
    model.eval()
    sampler = BatchSampler(data, seq_len, batch_size, seed=seed)
    total = 0.0
    for i in range(n_batches):
        x, y = sampler.get(i)
        with autocast if autocast is not None else contextlib.nullcontext():
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / n_batches


# ------------------------------------------------------------------------------------------------ training


def train(cfg: TrainConfig, *, resume: bool = False, data: TokenData | None = None, quiet: bool = False) -> dict:
    """Train a GPT as configured; returns a summary dict (also written to ``out_dir/final.json`` on rank 0).

    ``resume=True`` continues from the newest loadable checkpoint in ``cfg.out_dir`` (falling back past corrupt
    ones, logged), or starts fresh when there is none. The summary holds ``final_loss`` (training loss of the last
    step, averaged over ranks and micro-batches), ``val_loss``, ``steps``, ``tokens`` and ``checkpoint``."""
    from .model import GPT

    cfg.validate()
    d = _dist_from_env()
    if cfg.fsdp and not d.enabled:
        log.info("fsdp=true in a single process: FSDP2 needs torchrun (WORLD_SIZE > 1); training unsharded")
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg, d)
    created_pg = False
    if d.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created_pg = True
    try:
        return _train(cfg, d, device, resume, data, quiet, GPT)
    finally:
        if created_pg:
            dist.destroy_process_group()
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, d: _Dist, device: torch.device, resume: bool, data: TokenData | None, quiet: bool,
           GPT) -> dict:  # noqa: N803
    dtype = DTYPES[cfg.dtype]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("dtype='float16' autocast needs CUDA; use 'bfloat16' (or 'float32') on CPU")
    out_dir = Path(cfg.out_dir)

    # data: rank 0 builds the cache, the others then reuse it
    if data is None:
        if d.main:
            data = load_token_data(cfg.data)
        if d.enabled:
            dist.barrier()
        if not d.main:
            data = load_token_data(cfg.data)
    assert data is not None
    gcfg = build_model_config(cfg.model, data.vocab_size)
    seq_len = gcfg.block_size
    sampler = BatchSampler(data.train, seq_len, cfg.batch_size, seed=cfg.seed, grad_accum=cfg.grad_accum,
                           world_size=d.world_size, rank=d.rank)
    if len(data.val) < seq_len + 1:
        raise ConfigError(f"model.block_size={seq_len} exceeds the validation split ({len(data.val)} tokens)")

    # model and optimizer (identical init on every rank)
    torch.manual_seed(cfg.seed)
    raw = GPT(gcfg).to(device)
    use_fsdp = cfg.fsdp and d.enabled
    if use_fsdp:
        _wrap_fsdp(raw, dtype if dtype != torch.float32 else None)
    opt = raw.configure_optimizer(cfg.lr, cfg.weight_decay, cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    torch.manual_seed(cfg.seed + d.rank)  # per-rank stream for dropout
    random.seed(cfg.seed + d.rank)
    np.random.seed((cfg.seed + d.rank) % 2**32)

    step, tokens_seen = 0, 0
    resumed_from = None
    resumed_losses: tuple[float, float | None] = (float("nan"), None)
    if resume:
        found = load_latest(out_dir, map_location="cpu")
        if found is None:
            _say(d, quiet, f"resume: no checkpoint in {out_dir}; starting from step 0")
        else:
            path, state = found
            if state["model_config"] != gcfg.to_dict():
                diff = sorted(k for k in gcfg.to_dict() if state["model_config"].get(k) != gcfg.to_dict()[k])
                raise ConfigError(f"resume: checkpoint {path.name} has a different model config (fields: {diff})")
            _load_full_state(raw, opt, state, use_fsdp)
            sched.load_state_dict(state["scheduler"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            rng = state["rng"]
            if len(rng) != d.world_size:
                raise CheckpointError(f"checkpoint {path.name} was written by {len(rng)} rank(s), now {d.world_size}")
            _set_rng_state(rng[d.rank])
            step, tokens_seen = int(state["step"]), int(state["tokens"])
            resumed_losses = (state.get("last_loss", float("nan")), state.get("val_loss"))
            resumed_from = path
            if d.enabled:
                dist.barrier()  # every rank has read the checkpoint before rank 0 renames anything
            if d.main:
                set_aside_newer(out_dir, step)
            _say(d, quiet, f"resumed from {path} at step {step}")

    model: nn.Module = raw
    if cfg.compile:
        model = torch.compile(model)
    if d.enabled and not use_fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    metrics = None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(
            json.dumps({"train": cfg.to_dict(), "model": gcfg.to_dict()}, indent=1))
        metrics = _Metrics(out_dir, cfg.tensorboard, step if resumed_from is not None else None)
        if step == 0:
            _say(d, quiet, f"training {raw.num_parameters():,} parameters, global batch "
                           f"{sampler.global_batch} x {seq_len} tokens, {cfg.max_steps} steps, world size "
                           f"{d.world_size}{' (FSDP2)' if use_fsdp else ''}, device {device}")

    tokens_per_step = sampler.global_batch * seq_len
    diag_batch = None
    if cfg.diag_interval > 0:  # one fixed validation batch, the same for every run of a given seed and data
        diag_batch = BatchSampler(data.val, seq_len, cfg.diag_batch_size, seed=cfg.seed + 2).get(0)
    last_loss, val_loss = resumed_losses
    ckpt_path = resumed_from
    end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.max_steps
    stopped_early = None
    t0 = time.perf_counter()
    start_step = step
    model.train()
    try:
        while step < end_step:
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = sampler.get(step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last_micro = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext()
                if d.enabled and not use_fsdp and not last_micro:
                    sync = model.no_sync()
                elif use_fsdp:
                    raw.set_requires_gradient_sync(last_micro)
                with sync:
                    with autocast:
                        _, loss = model(x, y)
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            scaler.unscale_(opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            scaler.step(opt)
            scaler.update()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            loss_avg = loss_sum / cfg.grad_accum
            if d.enabled:
                dist.all_reduce(loss_avg, op=dist.ReduceOp.SUM)
                loss_avg /= d.world_size
            last_loss = float(loss_avg)
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"training loss became {last_loss} at step {step}")
            now = time.perf_counter()
            if d.main:
                metrics.write({"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens": tokens_seen, "elapsed_s": round(now - t0, 3)})
                if step % cfg.log_every == 0 or step == end_step:
                    done = step - start_step
                    rate = tokens_per_step * done / max(now - t0, 1e-9)
                    eta = (end_step - step) * (now - t0) / max(done, 1)
                    _say(d, quiet, f"step {step}/{end_step} | loss {last_loss:.4f} | lr {lr:.2e} | "
                                   f"{rate:,.0f} tok/s | elapsed {_fmt_time(now - t0)} | ETA {_fmt_time(eta)}")
            if diag_batch is not None and (step == 1 or step % cfg.diag_interval == 0):
                diag = _diagnostics(raw, model, diag_batch, device, autocast)
                if d.main:
                    metrics.write({"step": step, **diag})
            final = step == end_step
            if not final and cfg.time_limit_s > 0:
                over = torch.tensor(float(time.perf_counter() - t0 > cfg.time_limit_s))
                if d.enabled:  # every rank must stop at the same step
                    dist.broadcast(over, 0)
                if bool(over):
                    final, end_step = True, step
                    stopped_early = f"time_limit_s={cfg.time_limit_s:g} reached at step {step}"
                    _say(d, quiet, f"stopping early: {stopped_early}")
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or final:
                val_loss = evaluate_loss(model, data.val, seq_len, cfg.batch_size, cfg.eval_batches,
                                         cfg.seed + 1, device, autocast)
                if d.main:
                    metrics.write({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
                    _say(d, quiet, f"step {step} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}")
            if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or final:
                ckpt_path = _save(out_dir, step, tokens_seen, raw, opt, sched, scaler, cfg, gcfg, d, use_fsdp,
                                  cfg.keep_checkpoints, (last_loss, val_loss))
    finally:
        if metrics is not None:
            metrics.close()
    summary = {"final_loss": last_loss, "val_loss": val_loss, "steps": step, "tokens": tokens_seen,
               "stopped_early": stopped_early,
               "checkpoint": str(ckpt_path) if ckpt_path else None, "out_dir": str(out_dir),
               "elapsed_s": time.perf_counter() - t0, "world_size": d.world_size}
    if d.main:
        (out_dir / "final.json").write_text(json.dumps(summary, indent=1))
    return summary


def _diagnostics(raw: nn.Module, model: nn.Module, batch: tuple, device: torch.device,
                 autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Gradient diagnostics of ``raw`` on ``batch`` (every rank runs them, so FSDP's collectives match; under DDP
    without gradient sync). Parameter gradients, mode and RNG are left untouched."""
    from .diagnostics import attention_diagnostics

    x, y = batch
    sync = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
    with sync:
        return attention_diagnostics(raw, x.to(device), y.to(device), autocast=autocast)


def _save(out_dir: Path, step: int, tokens: int, raw: nn.Module, opt, sched, scaler, cfg: TrainConfig, gcfg,
          d: _Dist, fsdp: bool, keep: int, losses: tuple[float, float | None]) -> Path:
    model_sd, opt_sd = _full_state(raw, opt, fsdp)
    rng = _rng_state()
    if d.enabled:
        rngs: list[Any] = [None] * d.world_size
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    path = out_dir / f"ckpt_{step:06d}.pt"
    if d.main:
        state = {"model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "tokens": tokens, "rng": rngs, "data_position": {"seed": cfg.seed, "step": step},
                 "train_config": cfg.to_dict(), "model_config": gcfg.to_dict(), "world_size": d.world_size,
                 "last_loss": losses[0], "val_loss": losses[1]}
        path = save_checkpoint(out_dir, step, state, keep=keep)
    if d.enabled:
        dist.barrier()
    return path


def _say(d: _Dist, quiet: bool, msg: str) -> None:
    if d.main and not quiet:
        print(msg, file=sys.stderr, flush=True)
    log.debug(msg)

"""Typed configuration: :class:`TrainConfig` (with :class:`sasoftmax.lm.data.DataConfig` nested) and the one loader.

A config is a tree of dataclasses. :func:`update` sets fields from a table (a parsed TOML/JSON file, or the dotted
``--set key=value`` strings of the command line), checking each value against the field's type annotation and
converting strings; an unknown key or a value of the wrong type raises :class:`ConfigError` naming the full dotted
key. Nested dataclass fields take sub-tables; a ``dict`` field with a ``keys`` schema in its metadata (``model``:
``preset`` plus the fields of :class:`sasoftmax.lm.model.GPTConfig`) takes the keys of that schema only. The same
loader reads grid files' ``[eval]`` tables (:mod:`sasoftmax.lm.grid`).

TOML needs Python >= 3.11 (``tomllib``) or the ``tomli`` package; JSON always works.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import DataConfig

__all__ = ["ConfigError", "TrainConfig", "DTYPES", "DTYPE_NAMES", "resolve_dtype", "native_bf16", "coerce", "update",
           "set_dotted", "read_config_file", "load_config", "apply_overrides", "build_model_config", "model_keys"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or
    AMX. Elsewhere bf16 autocast is emulated and several times slower than float32 (~25x for a small GPT on an
    AVX2 CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu has no public query for these
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype a config's ``dtype`` names on ``device``: ``auto`` is bfloat16 where the hardware has it
    (:func:`native_bf16`), else float32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPE_NAMES)}, got {name!r}")
    return DTYPES[name]


class ConfigError(ValueError):
    """A configuration key is unknown or a value has the wrong type or range (the message names the key)."""


# ------------------------------------------------------------------------------------------------ values


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce_scalar(key: str, value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects a string, got {value!r}")
    what = "an integer" if tp is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (tp is int and isinstance(value, float)):
        raise ConfigError(f"{key} expects {what}, got {value!r}")
    try:
        return tp(value)
    except ValueError:
        raise ConfigError(f"{key} expects {what}, got {value!r}") from None


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (values from files) or convert (strings from ``--set``) ``value`` to the annotation ``tp``: ``bool``,
    ``int``, ``float``, ``str``, ``X | None`` (``none``/``null`` strings too), ``tuple[X, Y]`` and ``tuple[X, ...]``
    (lists, or comma-separated strings). ``key`` names the value in errors."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(tp)
    if tp in (bool, int, float, str):
        return _coerce_scalar(key, value, tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, (list, tuple)) or (not variadic and len(value) != len(args)):
            want = "a list of values" if variadic else f"{len(args)} comma-separated values"
            raise ConfigError(f"{key} expects {want}, got {value!r}")
        types_ = [args[0]] * len(value) if variadic else list(args)
        return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, types_, strict=True)))
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - programming error


# ------------------------------------------------------------------------------------------------ tables


def update(obj: Any, table: Mapping[str, Any], prefix: str = "") -> Any:
    """Set the fields of the dataclass ``obj`` from ``table`` (in place, type-checked); returns ``obj``.

    ``prefix`` is the dotted path of ``obj`` in the whole config, for error messages."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in table.items():
        full = prefix + key
        if key not in fields:
            where = f"{prefix.rstrip('.')} keys" if prefix else "valid"
            raise ConfigError(f"unknown config key {full!r} ({where}: {', '.join(sorted(fields))})")
        current = getattr(obj, key)
        schema = fields[key].metadata.get("keys")
        if dataclasses.is_dataclass(current) or schema is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full} must be a table of settings, got {value!r}")
            if schema is None:
                update(current, value, full + ".")
            else:
                _update_keyed(current, value, schema(), full)
        else:
            setattr(obj, key, coerce(full, value, hints[key]))
    return obj


def _update_keyed(target: dict[str, Any], table: Mapping[str, Any], schema: Mapping[str, Any], full: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"unknown config key '{full}.{key}' ({full} keys: {', '.join(schema)})")
        tp = schema[key]
        if isinstance(tp, str):  # a key the schema refuses, with the reason
            raise ConfigError(f"{full}.{key} {tp}")
        target[key] = coerce(f"{full}.{key}", value, tp)


def set_dotted(obj: Any, key: str, value: Any) -> Any:
    """Set the dotted ``key`` (``lr``, ``model.n_layer``, ``data.source``) of the dataclass tree ``obj``."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"unknown config key {key!r}")
    table: Any = value
    for part in reversed(parts[1:]):
        table = {part: table}
    return update(obj, {parts[0]: table})


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The table in a TOML or JSON (``.json``) file; :class:`ConfigError` naming the file when it is missing or does
    not parse."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path}: {err}") from err
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]  # same API
        except ImportError as err:
            raise ConfigError(
                f"reading {path} needs Python >= 3.11 (tomllib) or the `tomli` package; or use a .json config"
            ) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: {err}") from err


# ------------------------------------------------------------------------------------------------ training config


def model_keys() -> dict[str, Any]:
    """The keys of a ``[model]`` table: ``preset`` and every :class:`sasoftmax.lm.model.GPTConfig` field but
    ``vocab_size`` (which the tokenizer sets)."""
    from .model import GPTConfig

    hints = typing.get_type_hints(GPTConfig)
    keys: dict[str, Any] = {"preset": str}
    keys.update({f.name: hints[f.name] for f in dataclasses.fields(GPTConfig)})
    keys["vocab_size"] = "is set by the tokenizer (data.vocab_size / data.tokenizer), not in [model]"
    return keys


def _positive(cfg: Any, names: Sequence[str], minimum: float) -> None:
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ConfigError(f"{name} must be >= {minimum:g}, got {getattr(cfg, name)}")


@dataclass
class TrainConfig:
    """Everything a training run needs. ``model`` is ``{"preset": name, **GPTConfig overrides}``.

    Attributes (beyond ``model`` and ``data``):
        batch_size: sequences per micro-batch per rank. grad_accum: micro-batches per optimizer step.
        lr, min_lr: peak and final learning rate. warmup: linear warmup steps. max_steps: optimizer steps.
        weight_decay, betas: AdamW. grad_clip: max global gradient norm (0 = off).
        dtype: autocast dtype, ``float32`` (no autocast), ``bfloat16``, ``float16`` (CUDA only) or ``auto`` (bfloat16
        where the device computes it in hardware, else float32: :func:`resolve_dtype`).
        compile: wrap the model in ``torch.compile``. device: ``auto``, ``cpu``, ``cuda``.
        eval_interval: validation every N steps (and at the end; 0 = only at the end). eval_batches: batches per
        validation. ckpt_interval: checkpoint every N steps (and at the end; 0 = only at the end). keep_checkpoints:
        how many recent checkpoints stay on disk (>= 2 keeps a previous good one). out_dir: run directory.
        seed: model init and batch order. log_every: progress line every N steps. tensorboard: also log to
        TensorBoard. fsdp: shard with FSDP2 instead of DDP. threads: ``torch.set_num_threads`` (0 = leave as is).
        stop_at: stop after this step while keeping the learning-rate schedule of ``max_steps`` (0 = run to
        ``max_steps``). time_limit_s: stop (validate, checkpoint, summarize) once training has taken this many
        seconds (0 = no limit); the summary then says ``stopped_early``. Neither changes what a step computes.
        diag_interval: gradient diagnostics (:mod:`sasoftmax.lm.diagnostics`) on a fixed validation batch at step 1
        and every N steps (0 = off), written to ``metrics.jsonl`` as ``diag/...`` keys; they change nothing in
        training. diag_batch_size: sequences in that batch. ckpt_format: ``single`` (one file, gathered on rank 0)
        or ``sharded`` (``torch.distributed.checkpoint``: every rank writes its shards; resumes on any world size).
    """

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny", "block_size": 128},
                                  metadata={"keys": model_keys})
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
    ckpt_format: str = "single"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict (the form stored in checkpoints, ``config.json`` and results)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Defaults updated from ``d`` (type-checked like a config file; not validated)."""
        return update(cls(), d)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        _positive(self, ("batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "keep_checkpoints",
                         "diag_batch_size"), 1)
        _positive(self, ("warmup", "eval_interval", "ckpt_interval", "threads", "stop_at", "time_limit_s",
                         "diag_interval", "weight_decay", "grad_clip"), 0)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.ckpt_format not in ("single", "sharded"):
            raise ConfigError(f"ckpt_format must be 'single' or 'sharded', got {self.ckpt_format!r}")
        if not isinstance(self.model.get("preset", "tiny"), str):
            raise ConfigError(f"model.preset must be a string, got {self.model.get('preset')!r}")
        try:
            self.data.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from err


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply ``key=value`` / ``section.key=value`` strings (``--set``) to the config ``cfg`` in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(cfg, key, value)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the file (TOML or JSON) at ``path``, then ``overrides``; validated."""
    cfg = TrainConfig()
    if path is not None:
        update(cfg, read_config_file(path))
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def build_model_config(model: Mapping[str, Any], vocab_size: int):
    """The :class:`sasoftmax.lm.model.GPTConfig` for a ``[model]`` table (``preset`` + overrides) and a vocabulary
    size; :class:`ConfigError` naming the field when it is invalid."""
    from .model import GPTConfig

    settings: dict[str, Any] = {}
    _update_keyed(settings, model, model_keys(), "model")  # values from from_dict/JSON may still be strings
    preset = settings.pop("preset", "tiny")
    try:
        return GPTConfig.from_preset(preset, vocab_size=vocab_size, **settings)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"model: {err}") from err


"""Experiment grids: the Cartesian product of training-config values, trained, evaluated and aggregated.

``sasoftmax grid GRID.toml [--out DIR] [--dry-run] [--only KEY=VALUE ...] [--shard I/N] [--set KEY=VALUE ...]``

Grid file (TOML, or JSON with the same structure):

* ``[base]``: a full training config in the :class:`sasoftmax.train.TrainConfig` schema (top-level keys,
  ``[base.model]``, ``[base.data]``), or ``base = "path/to/train.toml"`` (relative to the grid file).
* ``[grid]``: dotted config keys (``"model.normalizer"``, ``"model.positional"``, ``seed``, ``"model.block_size"``,
  any key ``--set`` accepts) each mapping to a non-empty list of values; nested tables (``[grid.model]``) are
  flattened to dotted keys. The runs are the Cartesian product, in the order the axes are written (last axis
  fastest).
* ``[eval]``: ``multipliers`` of the training length (default ``[1, 2, 4, 8, 16]``), ``tokens_per_length``
  (default 16384), ``dtype`` (default: the run's training dtype), ``batch_size`` (default 8).
* ``out_dir``: the grid directory (default ``runs/grid/<grid file stem>``; ``--out`` overrides it).

Every run trains into ``<out_dir>/runs/<run_id>`` with ``train(cfg, resume=True)`` (an interrupted grid continues
where it stopped), is evaluated at the multipliers x its training length, and gets ``result.json`` (written
atomically, schema :data:`SCHEMA_VERSION`). A run whose ``result.json`` holds the same training config (up to
:data:`NON_SEMANTIC_KEYS`) and evaluation settings, and is complete, is skipped. At the end ``<out_dir>/grid.json``
aggregates every ``result.json`` on disk (other shards' too) and a table is printed.

Run ids: ``<name>=<value>`` per axis, in axis order, joined by ``__``, where ``<name>`` is the last component of the
dotted key (``normalizer=sa_softmax__positional=alibi__seed=1``), or the full key when two axes share a last
component. Values are written as in TOML (``true``/``false``, lists joined by ``-``); characters outside
``[A-Za-z0-9._+-]`` become ``-``, and a value that had to be changed that way or is longer than 40 characters is
cut and followed by ``~`` and 8 hex digits of its SHA-256, so ids stay unique, readable and filesystem safe.

Under ``torchrun`` every rank runs the same runs (DDP inside :func:`sasoftmax.train.train`); rank 0 alone
evaluates and writes ``result.json`` / ``grid.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .checkpoint import atomic_write
from .train import DTYPES, ConfigError, TrainConfig, apply_overrides

__all__ = [
    "SCHEMA_VERSION",
    "NON_SEMANTIC_KEYS",
    "GridError",
    "EvalSpec",
    "GridRun",
    "Grid",
    "load_grid",
    "parse_grid",
    "parse_shard",
    "select_runs",
    "run_id_for",
    "format_value",
    "run_state",
    "run_grid",
    "collect_results",
    "write_json_atomic",
    "format_results_table",
]

log = logging.getLogger("sasoftmax.grid")

SCHEMA_VERSION = 1
"""Version of ``result.json`` and ``grid.json``; bumped on any incompatible change of their fields."""

DEFAULT_MULTIPLIERS = (1, 2, 4, 8, 16)

NON_SEMANTIC_KEYS = (
    "out_dir", "threads", "log_every", "tensorboard", "stop_at", "time_limit_s", "compile", "device",
    "keep_checkpoints", "ckpt_interval", "diag_interval", "diag_batch_size", "data.cache_dir",
)
"""Training-config keys that do not change what a finished run computed; ignored when deciding whether a stored
result still matches the grid (so e.g. ``--set threads=4`` or a moved grid directory does not retrain)."""

_TOP_KEYS = ("base", "grid", "eval", "out_dir", "description")
_EVAL_KEYS = ("multipliers", "tokens_per_length", "dtype", "batch_size")
_MANAGED_KEYS = ("out_dir",)  # set by the grid for every run
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_VALUE_CHARS = 40


class GridError(ConfigError):
    """A grid file, an axis, a filter or a shard specification is invalid (the message names the key)."""


# ------------------------------------------------------------------------------------------------ data classes


@dataclass(frozen=True)
class EvalSpec:
    """How every run of a grid is evaluated (see :func:`sasoftmax.evaluate.evaluate_checkpoint`)."""

    multipliers: tuple[int, ...] = DEFAULT_MULTIPLIERS
    tokens_per_length: int = 16384
    dtype: str | None = None  # None = the run's training dtype
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {"multipliers": list(self.multipliers), "tokens_per_length": self.tokens_per_length,
                "dtype": self.dtype, "batch_size": self.batch_size}


@dataclass
class GridRun:
    """One point of the grid: its position, id, axis values, full training config and training length."""

    index: int
    run_id: str
    axes: dict[str, Any]
    config: TrainConfig
    train_length: int

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    def eval_lengths(self, spec: EvalSpec) -> list[int]:
        return [self.train_length * m for m in spec.multipliers]


@dataclass
class Grid:
    """A parsed, validated grid: base config (``--set`` applied), axes, evaluation settings and every run."""

    base: TrainConfig
    axes: dict[str, list[Any]]
    eval: EvalSpec
    out_dir: Path
    runs: list[GridRun] = field(default_factory=list)
    source: str | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable description (stored in ``grid.json``)."""
        return {"source": self.source, "description": self.description, "out_dir": str(self.out_dir),
                "base": self.base.to_dict(), "axes": self.axes, "eval": self.eval.to_dict(),
                "run_ids": [r.run_id for r in self.runs]}


# ------------------------------------------------------------------------------------------------ parsing


def load_grid(path: str | os.PathLike, *, out: str | os.PathLike | None = None,
              overrides: Sequence[str] = ()) -> Grid:
    """Read and validate the grid file at ``path``; ``out`` replaces its ``out_dir``; ``overrides`` (``--set``
    strings) apply to the base config of every run."""
    from .train import _read_config_file

    path = Path(path)
    try:
        spec = _read_config_file(path)
    except json.JSONDecodeError as err:
        raise GridError(f"grid file {path}: {err}") from err
    return parse_grid(spec, base_dir=path.parent, out=out, overrides=overrides, source=str(path),
                      default_out=f"runs/grid/{path.stem}")


def parse_grid(spec: dict[str, Any], *, base_dir: str | os.PathLike = ".", out: str | os.PathLike | None = None,
               overrides: Sequence[str] = (), source: str | None = None, default_out: str = "runs/grid") -> Grid:
    """Validate a grid given as a dict (the parsed file) and expand it into runs.

    Raises :class:`GridError` naming the first bad key or value: unknown top-level or ``[eval]`` keys, a missing
    base, an empty or duplicated axis, an unknown config key, an unknown normalizer or positional encoding, or a run
    whose model config is invalid."""
    if not isinstance(spec, dict):
        raise GridError(f"a grid file must hold a table, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_TOP_KEYS))
    if unknown:
        raise GridError(f"unknown grid file key {unknown[0]!r} (valid: {', '.join(_TOP_KEYS)})")
    base = _parse_base(spec.get("base"), Path(base_dir))
    try:
        apply_overrides(base, list(overrides))
    except ConfigError as err:
        raise GridError(f"--set: {err}") from err
    axes = _parse_axes(spec.get("grid"))
    eval_spec = _parse_eval(spec.get("eval", {}))
    raw_out = out if out is not None else spec.get("out_dir", default_out)
    if not isinstance(raw_out, (str, os.PathLike)) or not str(raw_out).strip():
        raise GridError(f"out_dir must be a non-empty path, got {raw_out!r}")
    out_dir = Path(raw_out)
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise GridError(f"description must be a string, got {description!r}")
    _check_registry_names(base, axes)
    grid = Grid(base=base, axes=axes, eval=eval_spec, out_dir=out_dir, source=source, description=description)
    grid.runs = _expand(grid)
    return grid


def _parse_base(base: Any, base_dir: Path) -> TrainConfig:
    from .train import _read_config_file

    if base is None:
        raise GridError("the grid file needs a [base] table (a training config) or base = \"path/to/train.toml\"")
    if isinstance(base, str):
        path = Path(base) if Path(base).is_absolute() else base_dir / base
        try:
            base = _read_config_file(path)
        except ConfigError as err:
            raise GridError(f"base: {err}") from err
    if not isinstance(base, dict):
        raise GridError(f"base must be a table or a path string, got {base!r}")
    try:
        return TrainConfig.from_dict(base)
    except ConfigError as err:
        raise GridError(f"base: {err}") from err


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def _parse_axes(table: Any) -> dict[str, list[Any]]:
    if not isinstance(table, dict) or not table:
        raise GridError("the grid file needs a [grid] table with at least one axis (\"key\" = [values, ...])")
    axes = _flatten(table)
    for key, values in axes.items():
        if key in _MANAGED_KEYS:
            raise GridError(f"grid axis {key!r}: the grid sets each run's {key} (<grid out_dir>/runs/<run_id>)")
        if not isinstance(values, list):
            raise GridError(f"grid axis {key!r} must be a list of values, got {values!r}")
        if not values:
            raise GridError(f"grid axis {key!r} is empty (give at least one value)")
        seen: dict[str, Any] = {}
        for v in values:
            if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)):
                raise GridError(f"grid axis {key!r}: values must be scalars or flat lists, got {v!r}")
            text = format_value(v)
            if text in seen:
                raise GridError(f"grid axis {key!r} lists the value {v!r} twice")
            seen[text] = v
    return axes


def _parse_eval(table: Any) -> EvalSpec:
    if not isinstance(table, dict):
        raise GridError(f"[eval] must be a table, got {table!r}")
    unknown = sorted(set(table) - set(_EVAL_KEYS))
    if unknown:
        raise GridError(f"unknown [eval] key 'eval.{unknown[0]}' (valid: {', '.join(_EVAL_KEYS)})")
    mult = table.get("multipliers", list(DEFAULT_MULTIPLIERS))
    if not isinstance(mult, list) or not mult:
        raise GridError(f"eval.multipliers must be a non-empty list of positive integers, got {mult!r}")
    for m in mult:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise GridError(f"eval.multipliers: every multiplier must be a positive integer, got {m!r}")
    if len(set(mult)) != len(mult):
        raise GridError(f"eval.multipliers lists a multiplier twice: {mult}")
    ints = {}
    for name, default in (("tokens_per_length", 16384), ("batch_size", 8)):
        val = table.get(name, default)
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise GridError(f"eval.{name} must be a positive integer, got {val!r}")
        ints[name] = val
    dtype = table.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise GridError(f"eval.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return EvalSpec(tuple(mult), ints["tokens_per_length"], dtype, ints["batch_size"])


def _check_registry_names(base: TrainConfig, axes: dict[str, list[Any]]) -> None:
    from . import model as _model  # noqa: F401  (importing the model registers every normalizer / positional)
    from .normalizers import list_normalizers
    from .positional import list_positionals

    for key, known, kind in (("model.normalizer", list_normalizers(), "normalizer"),
                             ("model.positional", list_positionals(), "positional encoding")):
        field_name = key.split(".")[1]
        if key in axes:
            for v in axes[key]:
                if v not in known:
                    raise GridError(f"grid axis {key!r}: unknown {kind} {v!r}; known: {', '.join(known)}")
        elif field_name in base.model and base.model[field_name] not in known:
            raise GridError(f"base {key}: unknown {kind} {base.model[field_name]!r}; known: {', '.join(known)}")


def _with_values(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of ``base`` with the dotted ``values`` set (type-checked like a config file)."""
    d = base.to_dict()
    for key, value in values.items():
        parts = key.split(".")
        if len(parts) == 1:
            d[key] = value
        elif len(parts) == 2 and parts[0] in ("model", "data"):
            d[parts[0]][parts[1]] = value
        else:
            raise GridError(f"unknown config key {key!r} (keys are name, model.name or data.name)")
    return TrainConfig.from_dict(d)


def _check_axis_values(base: TrainConfig, axes: dict[str, list[Any]]) -> None:
    """Every value of every axis, set alone on ``base``, must be a valid config value (type-checked)."""
    for key, values in axes.items():
        for value in values:
            try:
                _with_values(base, {key: value})
            except GridError:
                raise
            except ConfigError as err:
                raise GridError(f"grid axis {key!r}: {err}") from err


def _expand(grid: Grid) -> list[GridRun]:
    from .train import build_model_config

    _check_axis_values(grid.base, grid.axes)
    keys = list(grid.axes)
    names = _axis_names(keys)
    runs: list[GridRun] = []
    ids: dict[str, dict[str, Any]] = {}
    for index, combo in enumerate(itertools.product(*(grid.axes[k] for k in keys))):
        values = dict(zip(keys, combo, strict=True))
        run_id = run_id_for(values, names)
        if run_id in ids:
            raise GridError(f"runs {ids[run_id]} and {values} get the same run id {run_id!r}; make the values distinct")
        ids[run_id] = values
        try:
            cfg = _with_values(grid.base, values)
            cfg.out_dir = str(grid.out_dir / "runs" / run_id)
            cfg.validate()
            vocab = 256 if cfg.data.tokenizer == "bytes" else cfg.data.vocab_size
            gcfg = build_model_config(cfg.model, vocab)
        except ConfigError as err:
            raise GridError(f"run {run_id}: {err}") from err
        runs.append(GridRun(index, run_id, values, cfg, gcfg.block_size))
    return runs


# ------------------------------------------------------------------------------------------------ run ids


def format_value(value: Any) -> str:
    """An axis value as text, as in TOML (``true``, ``0.001``, lists joined by ``-``); used in run ids and
    ``--only`` matching."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    return str(value)


def _axis_names(keys: Sequence[str]) -> dict[str, str]:
    short = [k.split(".")[-1] for k in keys]
    clash = {s for s in short if short.count(s) > 1}
    return {k: (k if s in clash else s) for k, s in zip(keys, short, strict=True)}


def _safe(text: str) -> str:
    cleaned = _SAFE.sub("-", text)
    if cleaned == text and len(text) <= _MAX_VALUE_CHARS and text not in (".", ".."):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned[:_MAX_VALUE_CHARS]}~{digest}"


def run_id_for(values: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """Deterministic, filesystem-safe id of the run with axis ``values`` (see the module docstring)."""
    names = names or _axis_names(list(values))
    return "__".join(f"{_safe(names[k])}={_safe(format_value(v))}" for k, v in values.items())


# ------------------------------------------------------------------------------------------------ selection


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` stays ``None``; :class:`GridError` otherwise."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise GridError(f"--shard expects I/N (0-based shard I of N, e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise GridError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return i, n


def _parse_only(items: Iterable[str], axes: dict[str, list[Any]]) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for item in items:
        if "=" not in item:
            raise GridError(f"--only expects key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in axes:
            raise GridError(f"--only {key!r} is not a grid axis (axes: {', '.join(axes)})")
        known = [format_value(v) for v in axes[key]]
        if value not in known:
            raise GridError(f"--only {key}={value!r}: not a value of that axis (values: {', '.join(known)})")
        wanted.setdefault(key, set()).add(value)
    return wanted


def select_runs(grid: Grid, only: Iterable[str] = (), shard: tuple[int, int] | str | None = None) -> list[GridRun]:
    """The runs kept by ``--only`` filters (same key: any of the values; different keys: all must hold), then
    every ``n``-th of those starting at ``i`` for ``shard=(i, n)``."""
    wanted = _parse_only(only, grid.axes)
    runs = [r for r in grid.runs if all(format_value(r.axes[k]) in vals for k, vals in wanted.items())]
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard is not None:
        i, n = shard
        runs = runs[i::n]
    return runs


# ------------------------------------------------------------------------------------------------ files


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _semantic(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``TrainConfig.to_dict()``) without :data:`NON_SEMANTIC_KEYS`, JSON-normalized."""
    d = json.loads(json.dumps(config))
    for key in NON_SEMANTIC_KEYS:
        if key.startswith("data."):
            d.get("data", {}).pop(key[5:], None)
        else:
            d.pop(key, None)
    return d


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    a, b = _semantic(a), _semantic(b)
    diff = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            sub_a, sub_b = a[key], b[key]
            diff += [f"{key}.{k}" for k in sorted(set(sub_a) | set(sub_b)) if sub_a.get(k) != sub_b.get(k)]
        elif a.get(key) != b.get(key):
            diff.append(key)
    return diff


def _eval_dict(run: GridRun, spec: EvalSpec) -> dict[str, Any]:
    d = spec.to_dict()
    d["dtype"] = spec.dtype or run.config.dtype
    return d


def run_state(run: GridRun, spec: EvalSpec) -> str:
    """``done`` (matching complete result), ``partial`` (matching result of a run stopped early), ``re-eval``
    (trained with this config, evaluation settings changed), ``failed`` (``error.json``), ``started`` (a run
    directory without result), ``stale`` (result or config of a different training config) or ``pending``."""
    result = read_json(run.run_dir / "result.json")
    cfg = run.config.to_dict()
    if result is not None and result.get("schema") == SCHEMA_VERSION:
        if _config_diff(result.get("train_config", {}), cfg):
            return "stale"
        if not result.get("complete", False):
            return "partial"
        return "done" if result.get("eval_spec") == _eval_dict(run, spec) else "re-eval"
    if (run.run_dir / "error.json").exists():
        return "failed"
    stored = read_json(run.run_dir / "config.json")
    if stored is not None and "train" in stored:
        return "stale" if _config_diff(stored["train"], cfg) else "started"
    return "pending"


def collect_results(grid_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every readable ``<grid_dir>/runs/*/result.json`` of the current schema, by run id (sorted)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(grid_dir).glob("runs/*/result.json")):
        res = read_json(path)
        if res is None or res.get("schema") != SCHEMA_VERSION:
            log.warning("ignoring %s (unreadable or not schema %d)", path, SCHEMA_VERSION)
            continue
        out[res.get("run_id", path.parent.name)] = res
    return out


def _collect_errors(grid_dir: Path) -> dict[str, str]:
    errors = {}
    for path in sorted(grid_dir.glob("runs/*/error.json")):
        res = read_json(path) or {}
        errors[path.parent.name] = str(res.get("error", "unreadable error.json"))
    return errors


def _write_grid_json(grid: Grid) -> Path:
    results = collect_results(grid.out_dir)
    errors = {k: v for k, v in _collect_errors(grid.out_dir).items() if k not in results}
    ids = [r.run_id for r in grid.runs]
    payload = {
        "schema": SCHEMA_VERSION,
        "written": _now(),
        "grid": grid.to_dict(),
        "runs": results,
        "missing": [i for i in ids if i not in results],
        "partial": [i for i, r in results.items() if not r.get("complete", False)],
        "failed": errors,
        "extra": [i for i in results if i not in ids],
    }
    return write_json_atomic(grid.out_dir / "grid.json", payload)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def format_results_table(results: dict[str, dict[str, Any]]) -> str:
    """Compact table: run id, steps, final validation loss, perplexity at each evaluated multiplier."""
    from .evaluate import format_table

    mults = sorted({_multiplier(r, row) for r in results.values() for row in r.get("eval", {}).get("results", [])})
    rows = []
    for run_id, res in results.items():
        ppl = {_multiplier(res, row): row["ppl"] for row in res.get("eval", {}).get("results", [])}
        summary = res.get("summary", {})
        steps = f"{summary.get('steps')}" + ("" if res.get("complete", False) else " (partial)")
        rows.append([run_id, steps, summary.get("val_loss", "-"), *(ppl.get(m, "-") for m in mults)])
    return format_table(["run", "steps", "val loss", *(f"ppl x{m:g}" for m in mults)], rows)


def _multiplier(result: dict[str, Any], row: dict[str, Any]) -> float:
    train_len = result.get("eval", {}).get("train_length") or 1
    return row["length"] / train_len


# ------------------------------------------------------------------------------------------------ running


EVAL_BARRIER_TIMEOUT_S = 4 * 3600
"""Collective timeout of the process group a grid creates under ``torchrun`` (rank 0 evaluates alone meanwhile)."""


class _Ranks:
    """Process-group bookkeeping for ``torchrun``: rank 0 decides and writes, every rank trains."""

    def __init__(self, base: TrainConfig) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.created = False
        if self.world > 1:
            import torch
            import torch.distributed as dist

            from .train import _device, _dist_from_env

            if not dist.is_initialized():
                device = _device(base, _dist_from_env())
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                # rank 0 evaluates each run while the others wait at a barrier: allow long evaluations
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(seconds=EVAL_BARRIER_TIMEOUT_S))
                self.created = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


class _DataCache:
    """Token data loaded once per distinct data config (rank 0 builds a cache first, the others then read it)."""

    def __init__(self, ranks: _Ranks) -> None:
        self.ranks = ranks
        self.loaded: dict[str, Any] = {}

    def get(self, cfg: TrainConfig):
        from .data import load_token_data

        key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
        if key not in self.loaded:
            if self.ranks.main:
                self.loaded[key] = load_token_data(cfg.data)
            self.ranks.barrier()
            if not self.ranks.main:
                self.loaded[key] = load_token_data(cfg.data)
        return self.loaded[key]


def _check_eval_fits(runs: Sequence[GridRun], spec: EvalSpec, data_for) -> None:
    for run in runs:
        data = data_for(run.config)
        longest = max(run.eval_lengths(spec))
        if longest + 1 > len(data.val):
            raise GridError(
                f"eval.multipliers: run {run.run_id} would be evaluated at length {longest} "
                f"({max(spec.multipliers)} x {run.train_length}) but its validation split holds {len(data.val)} "
                "tokens; use smaller multipliers or more data"
            )


def _train_run(run: GridRun, data, quiet: bool, previous: dict[str, Any] | None) -> dict[str, Any]:
    from .train import train

    if previous is not None:  # same training config, complete: only the evaluation changed
        return previous["summary"]
    return train(run.config, resume=True, data=data, quiet=quiet)


def _evaluate_run(run: GridRun, spec: EvalSpec, summary: dict[str, Any], data) -> dict[str, Any]:
    from .evaluate import evaluate_checkpoint

    ckpt = summary.get("checkpoint") or run.run_dir
    if not Path(ckpt).exists():
        ckpt = run.run_dir
    final = run.run_dir / "eval.json"
    tmp = run.run_dir / f".eval.json.tmp-{os.getpid()}"
    result = evaluate_checkpoint(ckpt, run.eval_lengths(spec), tokens_per_length=spec.tokens_per_length,
                                 batch_size=spec.batch_size, dtype=spec.dtype or run.config.dtype, data=data,
                                 out=tmp)
    os.replace(tmp, final)
    result["saved_to"] = str(final)
    return result


def _result(run: GridRun, spec: EvalSpec, summary: dict[str, Any], evaluation: dict[str, Any],
            source: str | None) -> dict[str, Any]:
    import torch

    return {
        "schema": SCHEMA_VERSION,
        "run_id": run.run_id,
        "axes": run.axes,
        "train_config": run.config.to_dict(),
        "train_length": run.train_length,
        "eval_spec": _eval_dict(run, spec),
        "complete": int(summary.get("steps", 0)) >= run.config.max_steps,
        "summary": summary,
        "eval": evaluation,
        "grid_file": source,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "finished": _now(),
    }


def _previous_result(run: GridRun) -> dict[str, Any] | None:
    """The stored result when ``result.json`` holds a complete run of the same training config."""
    res = read_json(run.run_dir / "result.json")
    if res is None or res.get("schema") != SCHEMA_VERSION or not res.get("complete", False):
        return None
    if _config_diff(res.get("train_config", {}), run.config.to_dict()):
        return None
    return res


def run_grid(grid: Grid, *, only: Iterable[str] = (), shard: tuple[int, int] | str | None = None,
             dry_run: bool = False, quiet: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Train and evaluate the selected runs of ``grid`` (skipping finished ones), then write ``grid.json``.

    Returns ``{"selected", "trained", "evaluated", "skipped", "failed", "states", "grid_json"}`` (run-id lists; in
    a dry run only ``selected`` and ``states``). A run whose training loss becomes non-finite gets ``error.json``
    instead of ``result.json`` and the grid goes on. :class:`GridError` for an invalid filter/shard, a run directory
    holding a different training config, or evaluation lengths the data cannot hold."""
    stream = stream or sys.stdout
    runs = select_runs(grid, only, shard)
    states = {r.run_id: run_state(r, grid.eval) for r in runs}
    outcome: dict[str, Any] = {"selected": [r.run_id for r in runs], "states": states, "trained": [],
                               "evaluated": [], "skipped": [], "failed": {}, "grid_json": None}
    ranks_main = int(os.environ.get("RANK", "0")) == 0
    if dry_run:
        if ranks_main:
            _print_dry_run(grid, runs, states, stream)
        return outcome
    stale = [r.run_id for r in runs if states[r.run_id] == "stale"]
    if stale:
        raise GridError(f"run directory {grid.out_dir / 'runs' / stale[0]} holds a different training config "
                        f"({len(stale)} such run(s)); delete it or use another --out")
    ranks = _Ranks(grid.base)
    try:
        data = _DataCache(ranks)
        todo = [r for r in runs if states[r.run_id] != "done"]
        _check_eval_fits(todo, grid.eval, data.get)
        for n, run in enumerate(runs, 1):
            _run_one(grid, run, n, len(runs), ranks, data, quiet, outcome, stream)
        if ranks.main:
            outcome["grid_json"] = str(_write_grid_json(grid))
            results = collect_results(grid.out_dir)
            order = {r.run_id: r.index for r in grid.runs}
            ordered = dict(sorted(results.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
            print(format_results_table(ordered), file=stream, flush=True)
            print(f"wrote {outcome['grid_json']}", file=stream, flush=True)
    finally:
        ranks.close()
    return outcome


def _run_one(grid: Grid, run: GridRun, n: int, total: int, ranks: _Ranks, data: _DataCache, quiet: bool,
             outcome: dict[str, Any], stream: TextIO) -> None:
    state = ranks.from_main(run_state(run, grid.eval))
    prefix = f"[{n}/{total}] {run.run_id}"
    if state == "done":
        if ranks.main:
            log.info("%s: skipped (result.json matches this training config and evaluation)", prefix)
        outcome["skipped"].append(run.run_id)
        return
    previous = ranks.from_main(_previous_result(run) if ranks.main else None)
    if ranks.main:
        what = "re-evaluating" if previous is not None else ("resuming" if state != "pending" else "training")
        print(f"{prefix}: {what}", file=stream, flush=True)
    tokens = data.get(run.config)
    try:
        summary = _train_run(run, tokens, quiet, previous)
    except FloatingPointError as err:
        outcome["failed"][run.run_id] = str(err)
        if ranks.main:
            write_json_atomic(run.run_dir / "error.json", {"schema": SCHEMA_VERSION, "run_id": run.run_id,
                                                           "axes": run.axes, "error": str(err), "at": _now()})
            print(f"{prefix}: FAILED: {err}", file=stream, flush=True)
        return
    if previous is None:
        outcome["trained"].append(run.run_id)
    if ranks.main:
        evaluation = _evaluate_run(run, grid.eval, summary, tokens)
        write_json_atomic(run.run_dir / "result.json", _result(run, grid.eval, summary, evaluation, grid.source))
        (run.run_dir / "error.json").unlink(missing_ok=True)
        ppl = ", ".join(f"{r['length']}: {r['ppl']:.3f}" for r in evaluation["results"])
        val = summary.get("val_loss")
        val_text = f"{val:.4f}" if isinstance(val, float) else str(val)
        print(f"{prefix}: val loss {val_text}, ppl {ppl}", file=stream, flush=True)
    outcome["evaluated"].append(run.run_id)
    ranks.barrier()


def _print_dry_run(grid: Grid, runs: Sequence[GridRun], states: dict[str, str], stream: TextIO) -> None:
    from .evaluate import format_table

    rows = [[r.index, r.run_id, r.train_length, states[r.run_id]] for r in runs]
    print(f"grid {grid.source or ''}: {len(grid.runs)} run(s) in total, {len(runs)} selected, out_dir "
          f"{grid.out_dir}", file=stream)
    print(format_table(["#", "run", "train length", "state"], rows), file=stream)
    counts = {s: sum(1 for v in states.values() if v == s) for s in sorted(set(states.values()))}
    print("states: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=stream, flush=True)

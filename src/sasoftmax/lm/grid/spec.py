"""Grid files: parsing and validation, the runs of a grid and their ids, ``--only`` / ``--shard`` selection."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    DTYPE_NAMES,
    ConfigError,
    TrainConfig,
    apply_overrides,
    build_model_config,
    read_config_file,
    update,
)

__all__ = ["GridError", "EvalSpec", "GridRun", "Grid", "DEFAULT_MULTIPLIERS", "load_grid", "parse_grid", "parse_vars",
           "parse_shard", "select_runs", "run_id_for", "format_value"]

DEFAULT_MULTIPLIERS = (1, 2, 4, 8, 16)

_TOP_KEYS = ("base", "grid", "eval", "out_dir", "description", "vars")
_MANAGED_KEYS = ("out_dir",)  # set by the grid for every run
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_VALUE_CHARS = 40
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class GridError(ConfigError):
    """A grid file, an axis, a filter or a shard specification is invalid (the message names the key)."""


# ------------------------------------------------------------------------------------------------ data classes


@dataclass
class EvalSpec:
    """How every run of a grid is evaluated (see :func:`sasoftmax.lm.evaluate.evaluate_checkpoint`); the ``[eval]``
    table of a grid file."""

    multipliers: tuple[int, ...] = DEFAULT_MULTIPLIERS
    tokens_per_length: int = 16384
    dtype: str | None = None  # None = the run's training dtype
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {"multipliers": list(self.multipliers), "tokens_per_length": self.tokens_per_length,
                "dtype": self.dtype, "batch_size": self.batch_size}

    def validate(self) -> None:
        """:class:`GridError` naming the first bad key."""
        if not self.multipliers or any(m < 1 for m in self.multipliers):
            raise GridError(f"eval.multipliers must be a non-empty list of positive integers, got "
                            f"{list(self.multipliers)}")
        if len(set(self.multipliers)) != len(self.multipliers):
            raise GridError(f"eval.multipliers lists a multiplier twice: {list(self.multipliers)}")
        for name in ("tokens_per_length", "batch_size"):
            if getattr(self, name) < 1:
                raise GridError(f"eval.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise GridError(f"eval.dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")


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
              overrides: Sequence[str] = (), variables: Sequence[str] = ()) -> Grid:
    """Read and validate the grid file at ``path``; ``out`` replaces its ``out_dir``; ``overrides`` (``--set``
    strings) apply to the base config of every run; ``variables`` (``--var NAME=VALUE`` strings) fill the file's
    ``${NAME}`` references."""
    path = Path(path)
    filled = parse_vars(variables)
    try:
        spec = read_config_file(path)
    except ConfigError as err:
        raise GridError(str(err)) from err
    return parse_grid(spec, base_dir=path.parent, out=out, overrides=overrides, source=str(path),
                      default_out=f"runs/grid/{path.stem}", variables=filled)


def parse_vars(items: Iterable[str]) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` (``--var``) -> ``{NAME: VALUE}``; :class:`GridError` for a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise GridError(f"--var expects NAME=VALUE with NAME a plain identifier, got {item!r}")
        out[name] = value
    return out


def _substitute(value: Any, variables: dict[str, str], declared: dict[str, str], where: str) -> Any:
    """``value`` with every ``${NAME}`` in its strings replaced by ``variables[NAME]`` (recursively in tables and
    lists); a reference to a name the file does not declare in ``[vars]``, or one not given, raises."""
    if isinstance(value, dict):
        return {k: _substitute(v, variables, declared, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, declared, where) for v in value]
    if not isinstance(value, str):
        return value

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in declared:
            raise GridError(f"{where}: ${{{name}}} is not declared in the grid file's [vars] table")
        if name not in variables:
            raise GridError(f"{where}: this grid needs --var {name}=VALUE ({declared[name]})")
        return variables[name]

    return _VAR_REF.sub(fill, value)


def _label(value: Any) -> Any:
    """An axis value as runs are named and selected by: ``${NAME}`` shown as ``NAME`` (so that run ids and
    ``--only`` do not depend on the value a machine passes)."""
    if isinstance(value, list):
        return [_label(v) for v in value]
    return _VAR_REF.sub(lambda m: m.group(1), value) if isinstance(value, str) else value


def _parse_vars_table(table: Any, variables: dict[str, str]) -> dict[str, str]:
    if table is None:
        table = {}
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise GridError("[vars] must map each variable name to a string describing what to pass")
    extra = sorted(set(variables) - set(table))
    if extra:
        raise GridError(f"--var {extra[0]}: the grid file declares no such variable "
                        f"(declared: {', '.join(table) or 'none'})")
    return dict(table)


def parse_grid(spec: dict[str, Any], *, base_dir: str | os.PathLike = ".", out: str | os.PathLike | None = None,
               overrides: Sequence[str] = (), source: str | None = None, default_out: str = "runs/grid",
               variables: dict[str, str] | None = None) -> Grid:
    """Validate a grid given as a dict (the parsed file) and expand it into runs.

    Raises :class:`GridError` naming the first bad key or value: unknown top-level or ``[eval]`` keys, a missing
    base, an empty or duplicated axis, an unknown config key, an unknown normalizer or positional encoding, an
    undeclared or missing ``${NAME}`` variable, or a run whose model config is invalid."""
    if not isinstance(spec, dict):
        raise GridError(f"a grid file must hold a table, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_TOP_KEYS))
    if unknown:
        raise GridError(f"unknown grid file key {unknown[0]!r} (valid: {', '.join(_TOP_KEYS)})")
    variables = dict(variables or {})
    declared = _parse_vars_table(spec.get("vars"), variables)
    base_table = _substitute(spec.get("base"), variables, declared, "base")
    base = _parse_base(base_table, Path(base_dir))
    try:
        apply_overrides(base, list(overrides))
    except ConfigError as err:
        raise GridError(f"--set: {err}") from err
    labels = _parse_axes(spec.get("grid"))
    axes = {k: [_label(v) for v in vals] for k, vals in labels.items()}
    values = {k: _substitute(vals, variables, declared, f"grid axis {k!r}") for k, vals in labels.items()}
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
    grid.runs = _expand(grid, values)
    return grid


def _parse_base(base: Any, base_dir: Path) -> TrainConfig:
    if base is None:
        raise GridError("the grid file needs a [base] table (a training config) or base = \"path/to/train.toml\"")
    if isinstance(base, str):
        path = Path(base) if Path(base).is_absolute() else base_dir / base
        try:
            base = read_config_file(path)
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
    spec = EvalSpec()
    try:
        update(spec, table, "eval.")
    except ConfigError as err:
        raise GridError(str(err)) from err
    spec.validate()
    return spec


def _check_registry_names(base: TrainConfig, axes: dict[str, list[Any]]) -> None:
    from ...normalizers import list_normalizers
    from ...positional import list_positionals

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


def _expand(grid: Grid, axis_values: dict[str, list[Any]]) -> list[GridRun]:
    """The runs of ``grid``: configs from ``axis_values`` (variables filled in), ids and axes from ``grid.axes``
    (their labels)."""
    _check_axis_values(grid.base, axis_values)
    keys = list(grid.axes)
    names = _axis_names(keys)
    runs: list[GridRun] = []
    ids: dict[str, dict[str, Any]] = {}
    positions = itertools.product(*(range(len(grid.axes[k])) for k in keys))
    for index, combo in enumerate(positions):
        values = {k: grid.axes[k][i] for k, i in zip(keys, combo, strict=True)}
        filled = {k: axis_values[k][i] for k, i in zip(keys, combo, strict=True)}
        run_id = run_id_for(values, names)
        if run_id in ids:
            raise GridError(f"runs {ids[run_id]} and {values} get the same run id {run_id!r}; make the values distinct")
        ids[run_id] = values
        try:
            cfg = _with_values(grid.base, filled)
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

"""What a grid leaves on disk: each run's ``result.json`` (and ``error.json``), the grid's ``grid.json``, and the state
of a run read back from them.

A result records the run's training config, axis values, evaluation settings, training summary and evaluation
(:func:`result_record`, schema :data:`SCHEMA_VERSION`). Whether a stored result still matches a run is decided on the
training config up to :data:`NON_SEMANTIC_KEYS`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from ...utils import cpu_name, format_table, read_json, utc_now, vector_isa, write_json_atomic
from .spec import EvalSpec, Grid, GridRun

__all__ = ["SCHEMA_VERSION", "NON_SEMANTIC_KEYS", "run_state", "collect_results", "write_grid_json",
           "format_results_table", "result_record", "previous_result", "read_json", "write_json_atomic"]

log = logging.getLogger("sasoftmax.lm.grid")

SCHEMA_VERSION = 1
"""Version of ``result.json`` and ``grid.json``; bumped on any incompatible change of their fields."""

NON_SEMANTIC_KEYS = (
    "out_dir", "threads", "log_every", "tensorboard", "stop_at", "time_limit_s", "compile", "device",
    "keep_checkpoints", "ckpt_interval", "diag_interval", "diag_batch_size", "ckpt_format", "data.cache_dir",
)
"""Training-config keys that do not change what a finished run computed; ignored when deciding whether a stored
result still matches the grid (so e.g. ``--set threads=4`` or a moved grid directory does not retrain)."""


def _same_files(source: Any) -> Any:
    """``data.source`` with each comma-separated entry that names an existing file or folder resolved, so that a
    corpus passed as ``../shared/x.txt`` in one session and ``/work/shared/x.txt`` in the next is the same source.
    Other entries (``stdlib``, ``hf:...``, globs, paths absent here) stay as written."""
    if not isinstance(source, str) or source == "stdlib" or source.startswith("hf:"):
        return source
    parts = []
    for part in source.split(","):
        path = Path(part.strip()).expanduser()
        parts.append(str(path.resolve()) if path.exists() else part.strip())
    return ",".join(parts)


def _semantic(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``TrainConfig.to_dict()``) without :data:`NON_SEMANTIC_KEYS`, JSON-normalized, local corpus
    paths resolved."""
    d = json.loads(json.dumps(config))
    for key in NON_SEMANTIC_KEYS:
        if key.startswith("data."):
            d.get("data", {}).pop(key[5:], None)
        else:
            d.pop(key, None)
    if isinstance(d.get("data"), dict) and "source" in d["data"]:
        d["data"]["source"] = _same_files(d["data"]["source"])
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


def write_grid_json(grid: Grid) -> Path:
    """``<out_dir>/grid.json``: the grid and every result on disk (other shards' too), with the missing, partial,
    failed and extra runs."""
    results = collect_results(grid.out_dir)
    errors = {k: v for k, v in _collect_errors(grid.out_dir).items() if k not in results}
    ids = [r.run_id for r in grid.runs]
    payload = {
        "schema": SCHEMA_VERSION,
        "written": utc_now(),
        "grid": grid.to_dict(),
        "runs": results,
        "missing": [i for i in ids if i not in results],
        "partial": [i for i, r in results.items() if not r.get("complete", False)],
        "failed": errors,
        "extra": [i for i in results if i not in ids],
    }
    return write_json_atomic(grid.out_dir / "grid.json", payload)


def format_results_table(results: dict[str, dict[str, Any]]) -> str:
    """Compact table: run id, steps, final validation loss, perplexity at each evaluated multiplier."""
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


def result_record(run: GridRun, spec: EvalSpec, summary: dict[str, Any], evaluation: dict[str, Any],
                  source: str | None) -> dict[str, Any]:
    """The ``result.json`` of a trained and evaluated run."""
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
        "processor": f"{cpu_name()} ({vector_isa()})",
        "torch": torch.__version__,
        "finished": utc_now(),
    }


def previous_result(run: GridRun) -> dict[str, Any] | None:
    """The stored result when ``result.json`` holds a complete run of the same training config."""
    res = read_json(run.run_dir / "result.json")
    if res is None or res.get("schema") != SCHEMA_VERSION or not res.get("complete", False):
        return None
    if _config_diff(res.get("train_config", {}), run.config.to_dict()):
        return None
    return res

"""Downstream tasks with EleutherAI's lm-evaluation-harness (``sasoftmax lm-eval``; the optional ``eval`` extra).

:func:`run_lm_eval` exports a run's checkpoint to a temporary Hugging Face directory (:mod:`sasoftmax.lm.export`),
runs the harness's ``hf`` model on it (exactly what ``lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True --tasks ...`` does) and writes the harness's results as JSON beside the run
(``<run dir>/lm_eval.json``, read by the grid report). Tasks are the harness's names (they download their data from
the Hub) or local task files (``include_path``). ``configs/lm_eval/zero_shot.toml`` holds the zero-shot suite that
125M-2.7B language-model papers report.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..utils import format_table, utc_now, write_json_atomic
from .checkpoint import load_run
from .config import ConfigError, read_config_file

__all__ = ["run_lm_eval", "read_suite", "format_results", "LM_EVAL_FILE"]

LM_EVAL_FILE = "lm_eval.json"
_SUITE_KEYS: dict[str, type | tuple[type, ...]] = {
    "tasks": list, "num_fewshot": int, "batch_size": int, "limit": (int, float)}


def read_suite(path: str | os.PathLike) -> dict[str, Any]:
    """A task suite file (TOML/JSON): ``tasks`` (list of names) and optionally ``num_fewshot``, ``batch_size``,
    ``limit``; :class:`ConfigError` naming a bad key."""
    table = read_config_file(path)
    for key, value in table.items():
        if key not in _SUITE_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (valid: {', '.join(_SUITE_KEYS)})")
        if not isinstance(value, _SUITE_KEYS[key]) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key} has the wrong type ({value!r})")
    if not table.get("tasks") or not all(isinstance(t, str) for t in table["tasks"]):
        raise ConfigError(f"{path}: `tasks` must be a non-empty list of task names")
    return table


def _import_harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RuntimeError(f"sasoftmax lm-eval needs lm-evaluation-harness: pip install 'sasoftmax[eval]' ({err})") \
            from err
    return lm_eval, TaskManager


def run_lm_eval(ckpt: str | os.PathLike, tasks: list[str], *, step: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 1, limit: int | float | None = None, include_path: str | None = None,
                device: str = "cpu", out: str | os.PathLike | None = None,
                imports: tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate a run (or checkpoint) on ``tasks``; returns the record written to ``out`` (default
    ``<run dir>/lm_eval.json``): ``{"checkpoint", "step", "tasks", "num_fewshot", "results", "versions", "n-shot",
    "higher_is_better", "finished"}``."""
    from .export import export_checkpoint

    if not tasks:
        raise ValueError("--tasks: give at least one task")
    lm_eval, task_manager = _import_harness()
    path, state = load_run(ckpt, step)
    with tempfile.TemporaryDirectory(prefix="sasoftmax-lm-eval-") as tmp:
        model_dir = export_checkpoint(path, Path(tmp) / "model", imports=imports)
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},trust_remote_code=True", tasks=list(tasks),
            num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, device=device, log_samples=False,
            task_manager=task_manager(include_path=include_path),
        )
    if results is None:  # the harness returns None on non-zero ranks
        return {}
    record = {"checkpoint": str(path), "step": int(state["step"]), "tasks": list(tasks), "num_fewshot": num_fewshot,
              **{k: results.get(k) for k in ("results", "versions", "n-shot", "higher_is_better")},
              "finished": utc_now()}
    record = json.loads(json.dumps(record, default=str))  # numpy scalars and the like, as the harness itself does
    write_json_atomic(Path(out) if out is not None else path.parent / LM_EVAL_FILE, record)
    return record


def format_results(record: dict[str, Any], markdown: bool = False) -> str:
    """One row per (task, metric) with its value and standard error."""
    rows = []
    for task, metrics in sorted((record.get("results") or {}).items()):
        for key, value in sorted(metrics.items()):
            if "," not in key or key.startswith("alias") or "_stderr" in key:
                continue
            name, filt = key.split(",", 1)
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append([task, name, value, stderr if isinstance(stderr, float) else "-"])
    return format_table(["task", "metric", "value", "stderr"], rows, markdown=markdown)

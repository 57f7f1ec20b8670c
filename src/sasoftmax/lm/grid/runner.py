"""Running a grid: train, evaluate and record every selected run, skipping what is done (see :mod:`sasoftmax.lm.grid`).

Under ``torchrun`` every rank trains the same runs (DDP inside :func:`sasoftmax.lm.trainer.train`); rank 0 alone
decides what to do with each run, evaluates it and writes ``result.json`` / ``grid.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ...utils import format_table, utc_now, write_json_atomic
from .. import trainer
from ..config import ConfigError, TrainConfig
from ..data import load_token_data
from ..distributed import Dist, select_device
from ..evaluate import evaluate_checkpoint
from .spec import EvalSpec, Grid, GridError, GridRun, select_runs
from .store import (
    SCHEMA_VERSION,
    collect_results,
    format_results_table,
    previous_result,
    result_record,
    run_state,
    write_grid_json,
)

__all__ = ["run_grid", "evaluate_run", "GridOutcome", "EVAL_BARRIER_TIMEOUT_S"]

log = logging.getLogger("sasoftmax.lm.grid")

EVAL_BARRIER_TIMEOUT_S = 4 * 3600
"""Collective timeout of the process group a grid creates under ``torchrun`` (rank 0 evaluates alone meanwhile)."""


def _device(base: TrainConfig, ranks: Dist) -> torch.device:
    try:
        return select_device(base.device, ranks.local_rank)
    except ValueError as err:
        raise ConfigError(str(err)) from err


class _DataCache:
    """Token data loaded once per distinct data config (rank 0 builds a cache first, the others then read it)."""

    def __init__(self, ranks: Dist) -> None:
        self.ranks = ranks
        self.loaded: dict[str, Any] = {}

    def get(self, cfg: TrainConfig):
        key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
        if key not in self.loaded:
            self.loaded[key] = self.ranks.main_first(lambda: load_token_data(cfg.data))
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
    if previous is not None:  # same training config, complete: only the evaluation changed
        return previous["summary"]
    return trainer.train(run.config, resume=True, data=data, quiet=quiet)


def evaluate_run(run: GridRun, spec: EvalSpec, summary: dict[str, Any], data) -> dict[str, Any]:
    """Evaluate a trained run as ``spec`` says (``<run dir>/eval.json``, written atomically)."""
    ckpt = summary.get("checkpoint") or run.run_dir
    if not Path(ckpt).exists():
        ckpt = run.run_dir
    return evaluate_checkpoint(ckpt, run.eval_lengths(spec), tokens_per_length=spec.tokens_per_length,
                               batch_size=spec.batch_size, dtype=spec.dtype or run.config.dtype, data=data,
                               out=run.run_dir / "eval.json")


@dataclass
class GridOutcome:
    """What :func:`run_grid` did: run ids selected, by state before running, trained, evaluated, skipped (done),
    failed (with the error), and the ``grid.json`` written. Readable as a mapping too (``outcome["failed"]``)."""

    selected: list[str]
    states: dict[str, str]
    trained: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    grid_json: str | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_grid(grid: Grid, *, only: Iterable[str] = (), shard: tuple[int, int] | str | None = None,
             dry_run: bool = False, quiet: bool = False, stream: TextIO | None = None) -> GridOutcome:
    """Train and evaluate the selected runs of ``grid`` (skipping finished ones), then write ``grid.json``.

    Returns a :class:`GridOutcome` (in a dry run only ``selected`` and ``states`` are filled). A run whose training
    loss becomes non-finite gets ``error.json`` instead of ``result.json`` and the grid goes on. :class:`GridError`
    for an invalid filter/shard, a run directory holding a different training config, or evaluation lengths the data
    cannot hold."""
    stream = stream or sys.stdout
    runs = select_runs(grid, only, shard)
    states = {r.run_id: run_state(r, grid.eval) for r in runs}
    outcome = GridOutcome([r.run_id for r in runs], states)
    ranks = Dist.from_env()
    if dry_run:
        if ranks.main:
            _print_dry_run(grid, runs, states, stream)
        return outcome
    stale = [r.run_id for r in runs if states[r.run_id] == "stale"]
    if stale:
        raise GridError(f"run directory {grid.out_dir / 'runs' / stale[0]} holds a different training config "
                        f"({len(stale)} such run(s)); delete it or use another --out")
    # rank 0 evaluates each run while the others wait at a barrier: allow long evaluations
    with ranks.start(_device(grid.base, ranks), timeout_s=EVAL_BARRIER_TIMEOUT_S):
        runner = _Runner(grid, ranks, _DataCache(ranks), quiet, outcome, stream)
        _check_eval_fits([r for r in runs if states[r.run_id] != "done"], grid.eval, runner.data.get)
        for n, run in enumerate(runs, 1):
            runner.run_one(run, f"[{n}/{len(runs)}] {run.run_id}")
        if ranks.main:
            outcome.grid_json = str(write_grid_json(grid))
            results = collect_results(grid.out_dir)
            order = {r.run_id: r.index for r in grid.runs}
            ordered = dict(sorted(results.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
            print(format_results_table(ordered), file=stream, flush=True)
            print(f"wrote {outcome.grid_json}", file=stream, flush=True)
    return outcome


@dataclass
class _Runner:
    grid: Grid
    ranks: Dist
    data: _DataCache
    quiet: bool
    outcome: GridOutcome
    stream: TextIO

    def say(self, msg: str) -> None:
        if self.ranks.main:
            print(msg, file=self.stream, flush=True)

    def run_one(self, run: GridRun, prefix: str) -> None:
        """Train (or resume, or re-evaluate) one run, evaluate it and record its result (rank 0)."""
        ranks, outcome = self.ranks, self.outcome
        state = ranks.from_main(run_state(run, self.grid.eval))
        if state == "done":
            if ranks.main:
                log.info("%s: skipped (result.json matches this training config and evaluation)", prefix)
            outcome.skipped.append(run.run_id)
            return
        previous = ranks.from_main(previous_result(run) if ranks.main else None)
        what = "re-evaluating" if previous is not None else ("resuming" if state != "pending" else "training")
        self.say(f"{prefix}: {what}")
        tokens = self.data.get(run.config)
        try:
            summary = _train_run(run, tokens, self.quiet, previous)
        except FloatingPointError as err:
            outcome.failed[run.run_id] = str(err)
            if ranks.main:
                write_json_atomic(run.run_dir / "error.json", {"schema": SCHEMA_VERSION, "run_id": run.run_id,
                                                               "axes": run.axes, "error": str(err), "at": utc_now()})
            self.say(f"{prefix}: FAILED: {err}")
            return
        if previous is None:
            outcome.trained.append(run.run_id)
        if ranks.main:
            self._record(run, summary, tokens, prefix)
        outcome.evaluated.append(run.run_id)
        ranks.barrier()

    def _record(self, run: GridRun, summary: dict[str, Any], tokens: Any, prefix: str) -> None:
        evaluation = evaluate_run(run, self.grid.eval, summary, tokens)
        record = result_record(run, self.grid.eval, summary, evaluation, self.grid.source)
        write_json_atomic(run.run_dir / "result.json", record)
        (run.run_dir / "error.json").unlink(missing_ok=True)
        ppl = ", ".join(f"{r['length']}: {r['ppl']:.3f}" for r in evaluation["results"])
        val = summary.get("val_loss")
        val_text = f"{val:.4f}" if isinstance(val, float) else str(val)
        self.say(f"{prefix}: val loss {val_text}, ppl {ppl}")


def _print_dry_run(grid: Grid, runs: Sequence[GridRun], states: dict[str, str], stream: TextIO) -> None:
    rows = [[r.index, r.run_id, r.train_length, states[r.run_id]] for r in runs]
    print(f"grid {grid.source or ''}: {len(grid.runs)} run(s) in total, {len(runs)} selected, out_dir "
          f"{grid.out_dir}", file=stream)
    print(format_table(["#", "run", "train length", "state"], rows), file=stream)
    counts = {s: sum(1 for v in states.values() if v == s) for s in sorted(set(states.values()))}
    print("states: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=stream, flush=True)

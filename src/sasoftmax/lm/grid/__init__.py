"""Experiment grids: the Cartesian product of training-config values, trained, evaluated and aggregated.

``sasoftmax grid GRID.toml [--out DIR] [--dry-run] [--only KEY=VALUE ...] [--shard I/N] [--set KEY=VALUE ...]``

Grid file (TOML, or JSON with the same structure):

* ``[base]``: a full training config in the :class:`sasoftmax.lm.config.TrainConfig` schema (top-level keys,
  ``[base.model]``, ``[base.data]``), or ``base = "path/to/train.toml"`` (relative to the grid file).
* ``[grid]``: dotted config keys (``"model.normalizer"``, ``"model.positional"``, ``seed``, ``"model.block_size"``,
  any key ``--set`` accepts) each mapping to a non-empty list of values; nested tables (``[grid.model]``) are
  flattened to dotted keys. The runs are the Cartesian product, in the order the axes are written (last axis
  fastest).
* ``[eval]``: ``multipliers`` of the training length (default ``[1, 2, 4, 8, 16]``), ``tokens_per_length``
  (default 16384), ``dtype`` (default: the run's training dtype), ``batch_size`` (default 8).
* ``out_dir``: the grid directory (default ``runs/grid/<grid file stem>``; ``--out`` overrides it).

Layout: :mod:`.spec` (this file format, runs and their ids, selection), :mod:`.store` (``result.json``,
``grid.json``, run states), :mod:`.runner` (training and evaluating the selected runs).

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

Under ``torchrun`` every rank runs the same runs (DDP inside :func:`sasoftmax.lm.trainer.train`); rank 0 alone
evaluates and writes ``result.json`` / ``grid.json``.
"""
from .runner import EVAL_BARRIER_TIMEOUT_S, GridOutcome, evaluate_run, run_grid
from .spec import (
    DEFAULT_MULTIPLIERS,
    EvalSpec,
    Grid,
    GridError,
    GridRun,
    format_value,
    load_grid,
    parse_grid,
    parse_shard,
    run_id_for,
    select_runs,
)
from .store import (
    NON_SEMANTIC_KEYS,
    SCHEMA_VERSION,
    collect_results,
    format_results_table,
    previous_result,
    read_json,
    result_record,
    run_state,
    write_grid_json,
    write_json_atomic,
)

__all__ = [
    "SCHEMA_VERSION",
    "NON_SEMANTIC_KEYS",
    "DEFAULT_MULTIPLIERS",
    "EVAL_BARRIER_TIMEOUT_S",
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
    "GridOutcome",
    "evaluate_run",
    "collect_results",
    "write_grid_json",
    "result_record",
    "previous_result",
    "read_json",
    "write_json_atomic",
    "format_results_table",
]

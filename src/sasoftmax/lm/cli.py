"""Command line: ``sasoftmax train | eval | diagnose | compare | grad-demo | grid | report``.

The same commands run as ``python -m sasoftmax``.

* ``sasoftmax train --config configs/tiny_sa.toml --set lr=1e-3 --set model.normalizer=softmax [--resume]``
  (under ``torchrun --nproc_per_node=K`` it trains with DDP, or FSDP2 with ``--set fsdp=true``)
* ``sasoftmax eval --ckpt runs/tiny_sa [--lengths 128,256,512] [--tokens 16384] [--out file.json]``
* ``sasoftmax compare [--data PATH] [--out runs/compare] [--set max_steps=100] [--normalizers a,b]``: the main job
  (softmax vs SA-Softmax, or any normalizers; tiny models, CPU friendly); ``scripts/main_job.py`` runs the same.
* ``sasoftmax diagnose --ckpt runs/tiny_sa [--lengths 128,512] [--windows 4]``: gradient diagnostics of a checkpoint.
* ``sasoftmax grad-demo``: gradient norms of a saturated attention row, softmax vs SA-Softmax.
* ``sasoftmax grid configs/grid_tiny.toml [--out DIR] [--dry-run] [--only KEY=VALUE] [--shard I/N] [--set K=V]``:
  train and evaluate every run of an experiment grid (:mod:`sasoftmax.lm.grid`), skipping finished runs.
* ``sasoftmax report GRID_DIR [--out DIR]``: tables and plots of a grid's results (:mod:`sasoftmax.lm.report`).

``sasoftmax --import my_pkg.norms <command> ...`` imports a module first (e.g. one that registers a normalizer or a
positional encoding), so registry entries defined outside the package work in every command.

Configuration errors exit with status 2 and a one-line message naming the bad key or value.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "COMMANDS"]

Parsers = argparse._SubParsersAction


def _overrides(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=what)


def _ckpt(p: argparse.ArgumentParser, lengths: str, out: str) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory (newest loadable checkpoint)")
    p.add_argument("--lengths", help=f"comma-separated lengths (default: training length {lengths})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help=f"JSON output path (default: <ckpt dir>/{out}_step<N>.json)")


# ------------------------------------------------------------------------------------------------ train


def _train_parser(sub: Parsers) -> None:
    t = sub.add_parser("train", help="train a GPT (single process, or DDP/FSDP2 under torchrun)")
    t.add_argument("--config", help="TOML (Python >= 3.11, or with tomli) or JSON config file")
    _overrides(t, "override a config key, e.g. lr=1e-3, model.normalizer=softmax, data.source=PATH")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest loadable checkpoint in out_dir (falls back past corrupt ones)")
    t.add_argument("--quiet", action="store_true", help="no progress lines")


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train

    summary = train(load_config(args.config, args.overrides), resume=args.resume, quiet=args.quiet)
    if summary.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------------------------ eval, diagnose


def _eval_parser(sub: Parsers) -> None:
    e = sub.add_parser("eval", help="perplexity of a checkpoint at several lengths")
    _ckpt(e, "x1,x2,x4,x8,x16", "eval")
    e.add_argument("--tokens", type=int, default=16384, help="tokens scored per length (default 16384)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--backend", default="auto", help="sa_attention backend for SA models (default auto)")


def _eval(args: argparse.Namespace) -> int:
    from ..utils import format_table
    from .evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(args.ckpt, args.lengths, tokens_per_length=args.tokens, batch_size=args.batch_size,
                              device=args.device, dtype=args.dtype, backend=args.backend, out=args.out)
    print(f"{res['checkpoint']} (step {res['step']}, {res['normalizer']}, {res['positional']}, "
          f"trained at length {res['train_length']})")
    rows = [[r["length"], f"{r['length'] / res['train_length']:g}x", r["windows"], r["tokens"], r["loss"],
             r["ppl"]] for r in res["results"]]
    print(format_table(["length", "x train", "windows", "tokens", "loss", "ppl"], rows))
    print(f"saved {res['saved_to']}")
    return 0


def _diagnose_parser(sub: Parsers) -> None:
    dg = sub.add_parser("diagnose", help="gradient diagnostics of a checkpoint at several lengths")
    _ckpt(dg, "x1,x4,x16", "diag")
    dg.add_argument("--windows", type=int, default=4, help="validation windows per length (default 4)")


def _diagnose(args: argparse.Namespace) -> int:
    from ..utils import format_table
    from .diagnostics import METRICS
    from .evaluate import diagnose_checkpoint

    res = diagnose_checkpoint(args.ckpt, args.lengths, windows=args.windows, device=args.device, out=args.out)
    print(f"{res['checkpoint']} (step {res['step']}, {res['normalizer']}, {res['positional']}, "
          f"trained at length {res['train_length']}); mean over layers:")
    rows = [[m, *(r.get(f"diag/{m}", "-") for r in res["results"])] for m in METRICS]
    print(format_table(["metric", *(f"L={r['length']}" for r in res["results"])], rows))
    print(f"saved {res['saved_to']}")
    return 0


# ------------------------------------------------------------------------------------------------ compare, demo


def _compare_parser(sub: Parsers) -> None:
    c = sub.add_parser("compare", help="main job: tiny softmax vs SA-Softmax, train + evaluate at 1x..8x length")
    c.add_argument("--data", default="stdlib", help="data source (default: the Python stdlib sources)")
    c.add_argument("--out", default="runs/compare", help="output directory")
    _overrides(c, "override the training config of both runs, e.g. max_steps=100")
    c.add_argument("--tokens", type=int, default=16384, help="tokens scored per evaluation length")
    c.add_argument("--budget", type=float, default=540.0,
                   help="wall-clock budget in seconds for the whole job (default 540), checked between training "
                        "slices: when the next slice would not fit, both models stop at the same step; 0 = no limit")
    c.add_argument("--chunks", type=int, default=10, help="training slices (models alternate between slices)")
    c.add_argument("--normalizers", default="softmax,sa_softmax",
                   help="comma-separated normalizers to compare (default softmax,sa_softmax); the first is the "
                        "baseline of the ratio columns")


def _compare(args: argparse.Namespace) -> int:
    from .compare import run_comparison

    run_comparison(args.out, data_source=args.data, overrides=args.overrides, tokens_per_length=args.tokens,
                   budget_s=args.budget, chunks=args.chunks,
                   normalizers=[n.strip() for n in args.normalizers.split(",") if n.strip()])
    return 0


def _grad_demo_parser(sub: Parsers) -> None:
    sub.add_parser("grad-demo", help="gradient norm of a saturated row: softmax vs SA-Softmax")


def _grad_demo(args: argparse.Namespace) -> int:
    from .evaluate import format_gradient_demo, gradient_demo

    print(format_gradient_demo(gradient_demo()))
    return 0


# ------------------------------------------------------------------------------------------------ grid, report


def _grid_parser(sub: Parsers) -> None:
    g = sub.add_parser("grid", help="train + evaluate every run of an experiment grid (resumable, shardable)")
    g.add_argument("grid_file", help="grid file (TOML or JSON): [base], [grid], [eval], out_dir")
    g.add_argument("--out", help="grid output directory (default: the file's out_dir)")
    g.add_argument("--dry-run", action="store_true", help="list the selected runs and their state; train nothing")
    g.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose axis KEY has VALUE (repeat: same key = any of, different keys = all of)")
    g.add_argument("--shard", metavar="I/N", help="run every N-th selected run starting at I (0-based)")
    _overrides(g, "override a key of the base config of every run, e.g. data.source=PATH")
    g.add_argument("--quiet", action="store_true", help="no per-step training progress lines")


def _grid(args: argparse.Namespace) -> int:
    from .grid import load_grid, parse_shard, run_grid

    shard = parse_shard(args.shard)
    grid = load_grid(args.grid_file, out=args.out, overrides=args.overrides)
    outcome = run_grid(grid, only=args.only, shard=shard, dry_run=args.dry_run, quiet=args.quiet)
    return 1 if outcome["failed"] else 0


def _report_parser(sub: Parsers) -> None:
    r = sub.add_parser("report", help="markdown report with tables and plots of a grid's results")
    r.add_argument("grid_dir", help="grid output directory (holding runs/*/result.json)")
    r.add_argument("--out", help="report directory (default: GRID_DIR/report)")
    r.add_argument("--plots", choices=["all", "summary"], default="all",
                   help="summary: only perplexity, loss and the main score-gradient figures (tables are complete)")


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    res = write_report(args.grid_dir, args.out, plots=args.plots)
    print(f"wrote {res['report']} ({len(res['figures'])} figures)")
    return 0


# ------------------------------------------------------------------------------------------------ entry point

Command = tuple[Callable[[Parsers], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "train": (_train_parser, _train),
    "eval": (_eval_parser, _eval),
    "diagnose": (_diagnose_parser, _diagnose),
    "compare": (_compare_parser, _compare),
    "grad-demo": (_grad_demo_parser, _grad_demo),
    "grid": (_grid_parser, _grid),
    "report": (_report_parser, _report),
}
"""Each command: a function adding its sub-parser and one running it (returns the exit status)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sasoftmax", description="Self-Adjust Softmax: training and evaluation tools")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this Python module first (repeatable), e.g. one that registers a normalizer or "
                        "positional encoding with register_normalizer / register_positional")
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            print(f"sasoftmax: error: --import {module}: {err}", file=sys.stderr)
            return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return COMMANDS[args.command][1](args)
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"sasoftmax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

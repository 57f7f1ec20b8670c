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
  train and evaluate every run of an experiment grid (:mod:`sasoftmax.grid`), skipping finished runs.
* ``sasoftmax report GRID_DIR [--out DIR]``: tables and plots of a grid's results (:mod:`sasoftmax.report`).

``sasoftmax --import my_pkg.norms <command> ...`` imports a module first (e.g. one that registers a normalizer or a
positional encoding), so registry entries defined outside the package work in every command.

Configuration errors exit with status 2 and a one-line message naming the bad key or value.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sasoftmax", description="Self-Adjust Softmax: training and evaluation tools")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this Python module first (repeatable), e.g. one that registers a normalizer or "
                        "positional encoding with register_normalizer / register_positional")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GPT (single process, or DDP/FSDP2 under torchrun)")
    t.add_argument("--config", help="TOML (Python >= 3.11, or with tomli) or JSON config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. lr=1e-3, model.normalizer=softmax, data.source=PATH")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest loadable checkpoint in out_dir (falls back past corrupt ones)")
    t.add_argument("--quiet", action="store_true", help="no progress lines")

    e = sub.add_parser("eval", help="perplexity of a checkpoint at several lengths")
    e.add_argument("--ckpt", required=True, help="checkpoint file or run directory (newest loadable checkpoint)")
    e.add_argument("--lengths", help="comma-separated lengths (default: training length x1,x2,x4,x8,x16)")
    e.add_argument("--tokens", type=int, default=16384, help="tokens scored per length (default 16384)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--backend", default="auto", help="sa_attention backend for SA models (default auto)")
    e.add_argument("--out", help="JSON output path (default: <ckpt dir>/eval_step<N>.json)")

    dg = sub.add_parser("diagnose", help="gradient diagnostics of a checkpoint at several lengths")
    dg.add_argument("--ckpt", required=True, help="checkpoint file or run directory (newest loadable checkpoint)")
    dg.add_argument("--lengths", help="comma-separated lengths (default: training length x1,x4,x16)")
    dg.add_argument("--windows", type=int, default=4, help="validation windows per length (default 4)")
    dg.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    dg.add_argument("--out", help="JSON output path (default: <ckpt dir>/diag_step<N>.json)")

    c = sub.add_parser("compare", help="main job: tiny softmax vs SA-Softmax, train + evaluate at 1x..8x length")
    c.add_argument("--data", default="stdlib", help="data source (default: the Python stdlib sources)")
    c.add_argument("--out", default="runs/compare", help="output directory")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the training config of both runs, e.g. max_steps=100")
    c.add_argument("--tokens", type=int, default=16384, help="tokens scored per evaluation length")
    c.add_argument("--budget", type=float, default=540.0,
                   help="wall-clock budget in seconds for the whole job (default 540), checked between training "
                        "slices: when the next slice would not fit, both models stop at the same step; 0 = no limit")
    c.add_argument("--chunks", type=int, default=10, help="training slices (models alternate between slices)")
    c.add_argument("--normalizers", default="softmax,sa_softmax",
                   help="comma-separated normalizers to compare (default softmax,sa_softmax); the first is the "
                        "baseline of the ratio columns")

    sub.add_parser("grad-demo", help="gradient norm of a saturated row: softmax vs SA-Softmax")

    g = sub.add_parser("grid", help="train + evaluate every run of an experiment grid (resumable, shardable)")
    g.add_argument("grid_file", help="grid file (TOML or JSON): [base], [grid], [eval], out_dir")
    g.add_argument("--out", help="grid output directory (default: the file's out_dir)")
    g.add_argument("--dry-run", action="store_true", help="list the selected runs and their state; train nothing")
    g.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose axis KEY has VALUE (repeat: same key = any of, different keys = all of)")
    g.add_argument("--shard", metavar="I/N", help="run every N-th selected run starting at I (0-based)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base config of every run, e.g. data.source=PATH")
    g.add_argument("--quiet", action="store_true", help="no per-step training progress lines")

    r = sub.add_parser("report", help="markdown report with tables and plots of a grid's results")
    r.add_argument("grid_dir", help="grid output directory (holding runs/*/result.json)")
    r.add_argument("--out", help="report directory (default: GRID_DIR/report)")
    r.add_argument("--plots", choices=["all", "summary"], default="all",
                   help="summary: only perplexity, loss and the main score-gradient figures (tables are complete)")
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
    from .train import ConfigError

    try:
        if args.command == "train":
            from .train import load_config, train

            cfg = load_config(args.config, args.overrides)
            summary = train(cfg, resume=args.resume, quiet=args.quiet)
            if summary.get("world_size", 1) == 1 or _rank() == 0:
                print(json.dumps(summary))
        elif args.command == "eval":
            from .evaluate import evaluate_checkpoint, format_table

            res = evaluate_checkpoint(args.ckpt, args.lengths, tokens_per_length=args.tokens,
                                      batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                      backend=args.backend, out=args.out)
            print(f"{res['checkpoint']} (step {res['step']}, {res['normalizer']}, {res['positional']}, "
                  f"trained at length {res['train_length']})")
            rows = [[r["length"], f"{r['length'] / res['train_length']:g}x", r["windows"], r["tokens"], r["loss"],
                     r["ppl"]] for r in res["results"]]
            print(format_table(["length", "x train", "windows", "tokens", "loss", "ppl"], rows))
            print(f"saved {res['saved_to']}")
        elif args.command == "diagnose":
            from .diagnostics import METRICS
            from .evaluate import diagnose_checkpoint, format_table

            res = diagnose_checkpoint(args.ckpt, args.lengths, windows=args.windows, device=args.device,
                                      out=args.out)
            print(f"{res['checkpoint']} (step {res['step']}, {res['normalizer']}, {res['positional']}, "
                  f"trained at length {res['train_length']}); mean over layers:")
            rows = [[m, *(r.get(f"diag/{m}", "-") for r in res["results"])] for m in METRICS]
            print(format_table(["metric", *(f"L={r['length']}" for r in res["results"])], rows))
            print(f"saved {res['saved_to']}")
        elif args.command == "compare":
            from .evaluate import run_comparison

            run_comparison(args.out, data_source=args.data, overrides=args.overrides, tokens_per_length=args.tokens,
                           budget_s=args.budget, chunks=args.chunks,
                           normalizers=[n.strip() for n in args.normalizers.split(",") if n.strip()])
        elif args.command == "grad-demo":
            from .evaluate import format_gradient_demo, gradient_demo

            print(format_gradient_demo(gradient_demo()))
        elif args.command == "grid":
            from .grid import load_grid, parse_shard, run_grid

            shard = parse_shard(args.shard)
            grid = load_grid(args.grid_file, out=args.out, overrides=args.overrides)
            outcome = run_grid(grid, only=args.only, shard=shard, dry_run=args.dry_run, quiet=args.quiet)
            if outcome["failed"]:
                return 1
        elif args.command == "report":
            from .report import write_report

            res = write_report(args.grid_dir, args.out, plots=args.plots)
            print(f"wrote {res['report']} ({len(res['figures'])} figures)")
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"sasoftmax {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

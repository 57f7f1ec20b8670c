"""Evaluation: perplexity at several lengths, gradient diagnostics of checkpoints, and the gradient demo.

* :func:`evaluate_checkpoint` (``sasoftmax eval --ckpt PATH [--lengths 128,256,...]``): perplexity of a checkpoint
  on its validation split at each length (default: training length x1, x2, x4, x8, x16), over non-overlapping
  windows spread evenly over the split, the same number of tokens per length (``tokens_per_length``, so each length
  sees ``tokens_per_length // length`` windows). Every token of a window is scored (the whole window's loss, as in
  length-extrapolation papers). Attention runs through the model's ``attn_backend`` (default ``"auto"``: the
  memory-efficient ``sa_attention`` path for SA normalizers, SDPA for softmax).
* :func:`gradient_demo`: norm of the Jacobian d(weights)/d(scores) of one attention row with one dominant score,
  by autograd, for softmax and the SA-Softmax variants — the paper's vanishing-gradient motivation in numbers.
* :func:`diagnose_checkpoint` (``sasoftmax diagnose``): gradient diagnostics (:mod:`sasoftmax.lm.diagnostics`) of a
  checkpoint at several lengths.

The comparison job (``sasoftmax compare``) is :mod:`sasoftmax.lm.compare`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..utils import format_table, write_json_atomic
from .checkpoint import load_run
from .config import TrainConfig, resolve_dtype
from .data import TokenData, eval_windows, load_token_data

if TYPE_CHECKING:
    from .model import GPT, GPTConfig

__all__ = ["evaluate_checkpoint", "evaluate_model", "diagnose_checkpoint", "gradient_demo", "format_gradient_demo",
           "parse_lengths"]


def parse_lengths(text: str | Sequence[int] | None) -> list[int] | None:
    """``"128,256"`` or ``[128, 256]`` -> ``[128, 256]``; ``ValueError`` naming ``lengths`` for anything else."""
    if text is None:
        return None
    items: list[Any] = list(text.split(",") if isinstance(text, str) else text)
    out = []
    for item in items:
        try:
            n = int(str(item).strip())
        except ValueError:
            raise ValueError(f"lengths: {item!r} is not an integer (expected e.g. 128,256,512)") from None
        if n < 1:
            raise ValueError(f"lengths: every length must be >= 1, got {n}")
        out.append(n)
    if not out:
        raise ValueError("lengths: expected at least one length")
    return out


def _check_lengths(lengths: Sequence[int], val_tokens: int) -> None:
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"lengths: every length must be a positive int, got {n!r}")
        if n + 1 > val_tokens:
            raise ValueError(
                f"lengths: the model cannot be evaluated at length {n}: the validation split has only {val_tokens} "
                f"tokens (a window needs {n + 1}); use shorter lengths or a larger corpus"
            )


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    val: Any,
    lengths: Sequence[int],
    *,
    tokens_per_length: int = 16384,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Perplexity of ``model`` on the token stream ``val`` at each length.

    For length ``L``: ``max(1, tokens_per_length // L)`` non-overlapping windows of ``L + 1`` tokens spread evenly
    over ``val`` (fewer when the split is too short; reported), all ``L`` targets of each window scored. Returns rows
    ``{"length", "windows", "tokens", "loss", "ppl"}``. ``ValueError`` when a length does not fit the split."""
    lengths = list(lengths)
    _check_lengths(lengths, len(val))
    if tokens_per_length < 1 or batch_size < 1:
        raise ValueError(f"tokens_per_length and batch_size must be >= 1, got {tokens_per_length}, {batch_size}")
    device = torch.device(device)
    amp = resolve_dtype(dtype, device)
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)
    was_training = model.training
    model.eval()
    rows = []
    for length in lengths:
        windows = torch.from_numpy(eval_windows(val, length, max(1, tokens_per_length // length)))
        total, count = 0.0, 0
        for i in range(0, len(windows), batch_size):
            w = windows[i : i + batch_size].to(device)
            with autocast:
                _, loss = model(w[:, :-1], w[:, 1:])
            n = w[:, 1:].numel()
            total += float(loss) * n
            count += n
        mean = total / count
        if not math.isfinite(mean):
            raise FloatingPointError(f"evaluation loss at length {length} is {mean}")
        rows.append({"length": length, "windows": len(windows), "tokens": count, "loss": mean,
                     "ppl": math.exp(min(mean, 80.0))})
    model.train(was_training)
    return rows


@dataclass
class LoadedRun:
    """A checkpoint made ready to evaluate: its model on the device, the validation data and the lengths."""

    path: Path
    state: dict
    gcfg: GPTConfig
    model: GPT
    data: TokenData
    lengths: list[int]
    device: torch.device

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def save(self, result: dict[str, Any], out: str | os.PathLike | None, prefix: str) -> dict[str, Any]:
        """Write ``result`` as JSON to ``out`` (default ``<checkpoint dir>/<prefix>_step<N>.json``)."""
        out_path = Path(out) if out is not None else self.path.parent / f"{prefix}_step{self.step}.json"
        write_json_atomic(out_path, result)
        result["saved_to"] = str(out_path)
        return result


def _prepare_run(ckpt: str | os.PathLike, lengths: Sequence[int] | str | None, default_multipliers: Sequence[int],
                 data: TokenData | None, device: str) -> LoadedRun:
    from .export import model_config
    from .model import GPT

    path, state = load_run(ckpt)
    gcfg = model_config(state)
    lengths = parse_lengths(lengths) or [gcfg.block_size * m for m in default_multipliers]
    if data is None:
        data = load_token_data(TrainConfig.from_dict(state["train_config"]).data)
    _check_lengths(lengths, len(data.val))
    if data.vocab_size != gcfg.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size}) differs from the model's ({gcfg.vocab_size})")
    dev = torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) or device == "cuda" else "cpu")
    model = GPT(gcfg)
    model.load_state_dict(state["model"])
    return LoadedRun(path, state, gcfg, model.to(dev), data, lengths, dev)


def evaluate_checkpoint(
    ckpt: str | os.PathLike,
    lengths: Sequence[int] | str | None = None,
    *,
    tokens_per_length: int = 16384,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    backend: str = "auto",
    data: TokenData | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Perplexity table of a checkpoint (file, or run directory = newest loadable checkpoint) at ``lengths``.

    The validation split is rebuilt from (or found in the cache of) the checkpoint's data config unless ``data``
    is given. Default lengths: training length x1, x2, x4, x8, x16. The result (also saved as JSON to ``out``, by
    default ``<checkpoint dir>/eval_step<N>.json``) holds the model config, the step and the rows of
    :func:`evaluate_model`."""
    run = _prepare_run(ckpt, lengths, (1, 2, 4, 8, 16), data, device)
    run.model.set_attn_backend(backend)
    rows = evaluate_model(run.model, run.data.val, run.lengths, tokens_per_length=tokens_per_length,
                          batch_size=batch_size, device=run.device, dtype=dtype)
    gcfg = run.gcfg
    result = {"checkpoint": str(run.path), "step": run.step, "train_length": gcfg.block_size,
              "normalizer": gcfg.normalizer, "positional": gcfg.positional, "model_config": gcfg.to_dict(),
              "dtype": dtype, "tokens_per_length": tokens_per_length, "results": rows}
    return run.save(result, out, "eval")


# ------------------------------------------------------------------------------------------------ gradient demo


def gradient_demo(dominant: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0), n_keys: int = 16,
                  seed: int = 0) -> dict[str, Any]:
    """Frobenius norm of the Jacobian d(weights)/d(scores) of one attention row, by autograd in float64.

    The row is ``[t, z_1, ..., z_{n_keys-1}]`` with ``z ~ N(0, 1)`` fixed by ``seed`` and a dominant score ``t``:
    as ``t`` grows softmax saturates (p -> one-hot) and its Jacobian ``diag(p) - p p^T`` vanishes. Returns
    ``{"dominant": [...], "rows": {variant: [norm per t]}}`` for softmax, SA plain (``x * softmax(x)``), SA normalized
    (range differentiated, the reference behaviour) and SA normalized with ``detach_range``."""
    from ..functional import sa_softmax

    gen = torch.Generator().manual_seed(seed)
    rest = torch.randn(n_keys - 1, generator=gen, dtype=torch.float64)
    variants = {
        "softmax": lambda x: torch.softmax(x, -1),
        "sa_plain": lambda x: sa_softmax(x, normalize=False),
        "sa_normalized": lambda x: sa_softmax(x, normalize=True),
        "sa_normalized_detached": lambda x: sa_softmax(x, normalize=True, detach_range=True),
    }
    rows: dict[str, list[float]] = {k: [] for k in variants}
    for t in dominant:
        s = torch.cat([torch.tensor([float(t)], dtype=torch.float64), rest])
        for name, fn in variants.items():
            jac = torch.autograd.functional.jacobian(fn, s)
            rows[name].append(float(jac.norm()))
    return {"dominant": [float(t) for t in dominant], "n_keys": n_keys, "rows": rows}


def format_gradient_demo(demo: dict[str, Any]) -> str:
    headers = ["dominant score", *demo["rows"].keys()]
    table = [[t, *(demo["rows"][k][i] for k in demo["rows"])] for i, t in enumerate(demo["dominant"])]
    return format_table(headers, table)


def diagnose_checkpoint(
    ckpt: str | os.PathLike,
    lengths: Sequence[int] | str | None = None,
    *,
    windows: int = 4,
    device: str = "auto",
    data: TokenData | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Gradient diagnostics (:mod:`sasoftmax.lm.diagnostics`) of a checkpoint at several sequence lengths.

    For each length ``L``: ``windows`` validation windows of ``L + 1`` tokens spread over the split (as in
    :func:`evaluate_model`), one forward+backward in float32 with explicit scores. Default lengths: training length
    x1, x4, x16. Returns (and saves as JSON to ``out``, default ``<checkpoint dir>/diag_step<N>.json``)
    ``{"checkpoint", "step", "normalizer", "positional", "train_length", "results": [{"length", "windows",
    "diag/...": value, ...}]}``. Memory is O(L^2) per layer: keep lengths moderate."""
    from .diagnostics import attention_diagnostics

    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows must be a positive int, got {windows!r}")
    run = _prepare_run(ckpt, lengths, (1, 4, 16), data, device)
    rows = []
    for length in run.lengths:
        w = torch.from_numpy(eval_windows(run.data.val, length, windows)).to(run.device)
        stats = attention_diagnostics(run.model, w[:, :-1], w[:, 1:])
        rows.append({"length": length, "windows": len(w), **stats})
    gcfg = run.gcfg
    result = {"checkpoint": str(run.path), "step": run.step, "normalizer": gcfg.normalizer,
              "positional": gcfg.positional, "train_length": gcfg.block_size, "results": rows}
    return run.save(result, out, "diag")

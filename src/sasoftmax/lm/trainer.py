"""GPT training: a :class:`Trainer` for one run (single process, DDP or FSDP2 under ``torchrun``), exact resume.

Entry point: :func:`train` (``sasoftmax train --config configs/x.toml --set key=value ...``), which sets up the
process group and the data and runs ``Trainer(...).fit()``.

* Config: :class:`sasoftmax.lm.config.TrainConfig`.
* Loop: AdamW (``GPT.configure_optimizer``), linear warmup then cosine decay to ``min_lr``, gradient clipping,
  gradient accumulation, autocast (``bfloat16`` on CPU/GPU, ``float16`` on GPU with a grad scaler), optional
  ``torch.compile``. Progress lines (loss, tokens/s, ETA) on stderr; metrics as JSONL in ``out_dir/metrics.jsonl``
  (:mod:`sasoftmax.lm.metrics`); TensorBoard when ``tensorboard = true`` and the package is installed.
* Checkpoints (:mod:`sasoftmax.lm.checkpoint`) every ``ckpt_interval`` steps and at the end: model, optimizer,
  scheduler, step, RNG states of every rank (torch, numpy, python), data position and both configs. The batch of step
  ``s`` is a pure function of ``(seed, s)`` (:class:`sasoftmax.lm.data.BatchSampler`), so ``resume=True`` continues
  exactly: on CPU the losses of a resumed run equal those of an uninterrupted one bit for bit.
* Distributed: under ``torchrun`` (env ``WORLD_SIZE`` > 1) the same code runs DDP (gloo on CPU, nccl on GPU); the
  global batch is ``batch_size * world_size * grad_accum`` and equals a single-process run with
  ``grad_accum * world_size``. ``fsdp = true`` shards each transformer block and the root with FSDP2
  (``torch.distributed.fsdp.fully_shard``); checkpoints then hold full (unsharded) state dicts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    full_state,
    load_full_state,
    load_latest,
    load_sharded_into,
    rng_state,
    save_checkpoint,
    save_sharded,
    set_aside_newer,
    set_rng_state,
)
from .config import ConfigError, TrainConfig, build_model_config, resolve_dtype
from .data import BatchSampler, BPETokenizer, TokenData, document_ids, load_token_data
from .distributed import Dist, select_device
from .metrics import MetricsWriter
from .model import GPT

__all__ = ["Trainer", "TrainSummary", "train", "lr_at", "evaluate_loss"]

log = logging.getLogger("sasoftmax.lm.trainer")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.max_steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: np.ndarray, seq_len: int, batch_size: int, n_batches: int, seed: int,
                  device: torch.device, autocast: contextlib.AbstractContextManager | None = None) -> float:
    """Mean cross-entropy over ``n_batches`` fixed random batches of ``data`` (same batches every call)."""
    was_training = model.training
    model.eval()
    sampler = BatchSampler(data, seq_len, batch_size, seed=seed)
    total = 0.0
    for i in range(n_batches):
        x, y = sampler.get(i)
        with autocast if autocast is not None else contextlib.nullcontext():
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / n_batches


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _wrap_fsdp(model: GPT, mp_dtype: torch.dtype | None) -> None:
    """Shard each transformer block and the root with FSDP2 (mixed precision when ``mp_dtype`` is given)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as err:  # torch < 2.6
        raise RuntimeError(f"fsdp=true needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {err}") from err
    policy = (MixedPrecisionPolicy() if mp_dtype is None
              else MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32))
    for block in model.layers():
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


@dataclass
class TrainSummary:
    """What a run ended with (also written to ``out_dir/final.json``)."""

    final_loss: float  # training loss of the last step, averaged over ranks and micro-batches
    val_loss: float | None
    steps: int
    tokens: int
    stopped_early: str | None
    checkpoint: str | None
    out_dir: str
    elapsed_s: float
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """One training run: the model (raw and wrapped), optimizer, schedule, sampler and metrics.

    ``train_step`` runs one optimizer step, ``evaluate`` the validation loss, ``save`` / ``restore`` a checkpoint,
    ``fit`` the whole loop to ``max_steps`` (or ``stop_at``, or the time limit). Every rank constructs one; only rank 0
    writes files."""

    def __init__(self, cfg: TrainConfig, data: TokenData, dist: Dist, device: torch.device, *, quiet: bool = False):
        cfg.validate()
        cfg = TrainConfig.from_dict(cfg.to_dict())  # a copy: resuming on another world size may adjust grad_accum
        self.cfg, self.data, self.dist, self.device, self.quiet = cfg, data, dist, device, quiet
        self.dtype = resolve_dtype(cfg.dtype, device)
        if self.dtype == torch.float16 and device.type != "cuda":
            raise ConfigError("dtype='float16' autocast needs CUDA; use 'bfloat16' (or 'float32') on CPU")
        self.out_dir = Path(cfg.out_dir)
        self.gcfg = build_model_config(cfg.model, data.vocab_size)
        self.seq_len = self.gcfg.block_size
        self.sampler = self._sampler()
        # packed documents: the end-of-text id that separates them (None: rows attend across documents)
        self.eot_id: int | None = None
        if cfg.data.pack_documents:
            tok = data.tokenizer()
            if not isinstance(tok, BPETokenizer):
                raise ConfigError("data.pack_documents needs the BPE tokenizer (its end-of-text token ends documents)")
            self.eot_id = int(tok.eot_id)
        if len(data.val) < self.seq_len + 1:
            raise ConfigError(f"model.block_size={self.seq_len} exceeds the validation split ({len(data.val)} tokens)")
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.raw = GPT(self.gcfg).to(device)
        self.fsdp = cfg.fsdp and dist.enabled
        if self.fsdp:
            _wrap_fsdp(self.raw, self.dtype if self.dtype != torch.float32 else None)
        self.opt = self.raw.configure_optimizer(cfg.lr, cfg.weight_decay, cfg.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_at(s, cfg) / cfg.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(self.dtype == torch.float16))
        torch.manual_seed(cfg.seed + dist.rank)  # per-rank stream for dropout
        random.seed(cfg.seed + dist.rank)
        np.random.seed((cfg.seed + dist.rank) % 2**32)
        self.autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.model: Any = self.raw  # the raw GPT, or torch.compile / DDP around it
        self.step = self.tokens = 0
        self.last_loss: float = float("nan")
        self.val_loss: float | None = None
        self.checkpoint: Path | None = None
        self.resumed = False

    def _sampler(self) -> BatchSampler:
        cfg, d = self.cfg, self.dist
        return BatchSampler(self.data.train, self.seq_len, cfg.batch_size, seed=cfg.seed, grad_accum=cfg.grad_accum,
                            world_size=d.world_size, rank=d.rank)

    # ------------------------------------------------------------------ state

    def restore(self) -> Path | None:
        """Continue from the newest loadable checkpoint in ``out_dir`` (falling back past corrupt ones, which are set
        aside); returns its path, or None (and a message) when there is none. A checkpoint written by another number
        of processes resumes with the same global batch (``grad_accum`` adjusted) and so the same data order."""
        found = load_latest(self.out_dir, map_location="cpu", weights=False)
        if found is None:
            self._say(f"resume: no checkpoint in {self.out_dir}; starting from step 0")
            return None
        path, state = found
        want = self.gcfg.to_dict()
        if state["model_config"] != want:
            diff = sorted(k for k in want if state["model_config"].get(k) != want[k])
            raise ConfigError(f"resume: checkpoint {path.name} has a different model config (fields: {diff})")
        if state.get("format") == "sharded":
            load_sharded_into(path, self.raw, self.opt, self.dist.enabled)
        else:
            load_full_state(self.raw, self.opt, state, self.fsdp)
        self.sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self._resume_processes(path, state)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.last_loss, self.val_loss = state.get("last_loss", float("nan")), state.get("val_loss")
        self.checkpoint, self.resumed = path, True
        self.dist.barrier()  # every rank has read the checkpoint before rank 0 renames anything
        if self.dist.main:
            set_aside_newer(self.out_dir, self.step)
        self._say(f"resumed from {path} at step {self.step}")
        return path

    def _resume_processes(self, path: Path, state: dict[str, Any]) -> None:
        """RNG states per rank; with another world size, the saved global batch through ``grad_accum``."""
        d, cfg = self.dist, self.cfg
        rngs = state["rng"]
        if d.rank < len(rngs):
            set_rng_state(rngs[d.rank])
        if len(rngs) == d.world_size:
            return
        saved = state["train_config"]
        global_batch = saved["batch_size"] * saved["grad_accum"] * len(rngs)
        per_step = cfg.batch_size * d.world_size
        if global_batch % per_step != 0:
            raise ConfigError(f"resume: checkpoint {path.name} was written by {len(rngs)} process(es) with a global "
                              f"batch of {global_batch}, which batch_size={cfg.batch_size} x {d.world_size} "
                              "process(es) cannot reproduce; choose a batch_size that divides it")
        if global_batch != per_step * cfg.grad_accum:
            cfg.grad_accum = global_batch // per_step
            self.sampler = self._sampler()
        self._say(f"resume: checkpoint written by {len(rngs)} process(es), now {d.world_size}: global batch "
                  f"{global_batch} kept (grad_accum={cfg.grad_accum}); ranks >= {len(rngs)} start fresh RNG streams")

    def _extra_state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        return {"scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "tokens": self.tokens, "rng": rngs, "data_position": {"seed": cfg.seed, "step": self.step},
                "train_config": cfg.to_dict(), "model_config": self.gcfg.to_dict(),
                "world_size": self.dist.world_size, "last_loss": self.last_loss, "val_loss": self.val_loss}

    def save(self) -> Path:
        """Checkpoint the current step (a collective under FSDP2/DDP: every rank calls it); returns its path."""
        rngs = self.dist.all_gather_object(rng_state())
        keep = self.cfg.keep_checkpoints
        if self.cfg.ckpt_format == "sharded":
            path = save_sharded(self.out_dir, self.step, self.raw, self.opt, self._extra_state(rngs), self.dist,
                                keep=keep)
        else:
            model_sd, opt_sd = full_state(self.raw, self.opt, self.fsdp)
            path = self.out_dir / f"ckpt_{self.step:06d}.pt"
            if self.dist.main:
                state = {"model": model_sd, "optimizer": opt_sd, **self._extra_state(rngs)}
                path = save_checkpoint(self.out_dir, self.step, state, keep=keep)
            self.dist.barrier()
        self.checkpoint = path
        return path

    # ------------------------------------------------------------------ steps

    def _wrap(self) -> None:
        """``torch.compile`` and DDP around the raw model, as configured (once, before the first step)."""
        if self.model is not self.raw:
            return
        if self.cfg.compile:
            self.model = torch.compile(self.model)
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns ``{"loss", "lr", "grad_norm"}``."""
        self._wrap()
        self.model.train()
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.sampler.get(self.step, micro)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last_micro = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and not self.fsdp and not last_micro:
                sync = self.model.no_sync()
            elif self.fsdp:
                cast(Any, self.raw).set_requires_gradient_sync(last_micro)  # added by fully_shard
            doc_ids = None if self.eot_id is None else document_ids(x, self.eot_id)
            with sync:
                with self.autocast:
                    _, loss = self.model(x, y, doc_ids=doc_ids)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        self.scaler.unscale_(self.opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        self.scaler.step(self.opt)
        self.scaler.update()
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.sampler.global_batch * self.seq_len
        self.last_loss = float(self.dist.mean(loss_sum / cfg.grad_accum))
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(f"training loss became {self.last_loss} at step {self.step}")
        return {"loss": self.last_loss, "lr": lr, "grad_norm": grad_norm}

    def evaluate(self) -> float:
        """Validation loss on ``eval_batches`` fixed batches (the same every call)."""
        cfg = self.cfg
        self.val_loss = evaluate_loss(self.model, self.data.val, self.seq_len, cfg.batch_size, cfg.eval_batches,
                                      cfg.seed + 1, self.device, self.autocast)
        return self.val_loss

    def diagnostics(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """Gradient diagnostics of the raw model on ``batch`` (every rank runs them, so FSDP's collectives match;
        under DDP without gradient sync). Parameter gradients, mode and RNG are left untouched."""
        from .diagnostics import attention_diagnostics

        x, y = batch
        sync = self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()
        with sync:
            return attention_diagnostics(self.raw, x.to(self.device), y.to(self.device), autocast=self.autocast)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainSummary:
        """Train to ``max_steps`` (or ``stop_at``, or until ``time_limit_s``): log every step, validate every
        ``eval_interval`` steps, checkpoint every ``ckpt_interval`` steps, and both at the end."""
        cfg, d = self.cfg, self.dist
        metrics = self._start_metrics()
        diag_batch = None
        if cfg.diag_interval > 0:  # one fixed validation batch, the same for every run of a given seed and data
            diag_batch = BatchSampler(self.data.val, self.seq_len, cfg.diag_batch_size, seed=cfg.seed + 2).get(0)
        end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.max_steps
        stopped_early = None
        t0, start_step = time.perf_counter(), self.step
        try:
            while self.step < end_step:
                row = self.train_step()
                self._log_step(metrics, row, t0, start_step, end_step)
                if diag_batch is not None and (self.step == 1 or self.step % cfg.diag_interval == 0):
                    diag = self.diagnostics(diag_batch)
                    if metrics is not None:
                        metrics.write({"step": self.step, **diag})
                final = self.step == end_step
                if not final and cfg.time_limit_s > 0 and d.main_flag(time.perf_counter() - t0 > cfg.time_limit_s):
                    final, end_step = True, self.step
                    stopped_early = f"time_limit_s={cfg.time_limit_s:g} reached at step {self.step}"
                    self._say(f"stopping early: {stopped_early}")
                if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or final:
                    self._validate(metrics)
                if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or final:
                    self.save()
        finally:
            if metrics is not None:
                metrics.close()
        summary = TrainSummary(self.last_loss, self.val_loss, self.step, self.tokens, stopped_early,
                               str(self.checkpoint) if self.checkpoint else None, str(self.out_dir),
                               time.perf_counter() - t0, d.world_size)
        if d.main:
            (self.out_dir / "final.json").write_text(json.dumps(summary.to_dict(), indent=1))
        return summary

    def _start_metrics(self) -> MetricsWriter | None:
        if not self.dist.main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(
            json.dumps({"train": self.cfg.to_dict(), "model": self.gcfg.to_dict()}, indent=1))
        tokenizer_dir = self.out_dir / "tokenizer"  # for export and sampling, independent of the token cache
        tokenizer_dir.mkdir(exist_ok=True)
        self.data.tokenizer().save(tokenizer_dir)
        if self.step == 0:
            self._say(f"training {self.raw.num_parameters():,} parameters, global batch {self.sampler.global_batch} "
                      f"x {self.seq_len} tokens, {self.cfg.max_steps} steps, world size {self.dist.world_size}"
                      f"{' (FSDP2)' if self.fsdp else ''}, device {self.device}")
        return MetricsWriter(self.out_dir, self.cfg.tensorboard, self.step if self.resumed else None)

    def _log_step(self, metrics: MetricsWriter | None, row: dict[str, float], t0: float, start_step: int,
                  end_step: int) -> None:
        if metrics is None:
            return
        now = time.perf_counter()
        metrics.write({"step": self.step, **row, "tokens": self.tokens, "elapsed_s": round(now - t0, 3)})
        if self.step % self.cfg.log_every == 0 or self.step == end_step:
            done = self.step - start_step
            rate = self.sampler.global_batch * self.seq_len * done / max(now - t0, 1e-9)
            eta = (end_step - self.step) * (now - t0) / max(done, 1)
            self._say(f"step {self.step}/{end_step} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {rate:,.0f} tok/s "
                      f"| elapsed {_fmt_time(now - t0)} | ETA {_fmt_time(eta)}")

    def _validate(self, metrics: MetricsWriter | None) -> None:
        val = self.evaluate()
        if metrics is not None:
            ppl = math.exp(min(val, 50.0))
            metrics.write({"step": self.step, "val_loss": val, "val_ppl": ppl})
            self._say(f"step {self.step} | val loss {val:.4f} | val ppl {ppl:.2f}")

    def _say(self, msg: str) -> None:
        if self.dist.main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)
        log.debug(msg)


def train(cfg: TrainConfig, *, resume: bool = False, data: TokenData | None = None, quiet: bool = False) -> dict:
    """Train a GPT as configured; returns :class:`TrainSummary` as a dict (also written to ``out_dir/final.json`` on
    rank 0).

    ``resume=True`` continues from the newest loadable checkpoint in ``cfg.out_dir`` (falling back past corrupt
    ones, logged), or starts fresh when there is none. Under ``torchrun`` this creates the process group (and
    destroys it at the end) unless one exists; rank 0 builds the token cache before the others read it."""
    cfg.validate()
    d = Dist.from_env()
    if cfg.fsdp and not d.enabled:
        log.info("fsdp=true in a single process: FSDP2 needs torchrun (WORLD_SIZE > 1); training unsharded")
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        device = select_device(cfg.device, d.local_rank)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        with d.start(device):
            if data is None:
                data = d.main_first(lambda: load_token_data(cfg.data))
            trainer = Trainer(cfg, data, d, device, quiet=quiet)
            if resume:
                trainer.restore()
            return trainer.fit().to_dict()
    finally:
        torch.set_num_threads(threads_before)

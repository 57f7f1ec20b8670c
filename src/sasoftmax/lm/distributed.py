"""One process-group setup for everything that runs under ``torchrun``: the trainer and the experiment grid.

:class:`Dist` reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (a single process when they are absent), picks the
device, creates the process group (gloo on CPU, nccl on CUDA) if nobody has, and offers the few collectives the
harness needs: a barrier, rank 0's value on every rank, and "rank 0 does it first, then the others" (building a token
cache once). Used as a context manager it destroys the group it created on exit.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Dist", "select_device"]

T = TypeVar("T")


def select_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (``ValueError`` when CUDA is not available)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Dist:
    """This process's place in the run: ``world_size``, ``rank``, ``local_rank`` (1, 0, 0 without torchrun)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False  # whether this object created the process group (and destroys it on close)
    device: torch.device | None = None  # where collectives put their tensors (set by start)

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device, timeout_s: float | None = None) -> Dist:
        """Create the process group for ``device`` unless there is one already (or this is a single process)."""
        self.device = device
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
            self.created = True
        return self

    def close(self) -> None:
        """Destroy the process group if :meth:`start` created it."""
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
        self.created = False

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on every other rank (e.g. rank 0 builds a cache the others then read)."""
        result: Any = fn() if self.main else None
        self.barrier()
        if not self.main:
            result = fn()
        return result

    def all_gather_object(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over ranks (in place)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def main_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (all ranks must agree, e.g. on stopping at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.broadcast(t, 0)
        return bool(t)

"""Training metrics: one writer (rank 0's ``metrics.jsonl``, optionally TensorBoard) and one reader.

Each row is a JSON object with a ``step`` and scalars: ``loss``, ``lr``, ``grad_norm``, ``tokens``, ``elapsed_s`` every
step; ``val_loss``, ``val_ppl`` at validations; ``diag/<metric>`` and ``diag/<metric>/layer<i>`` at gradient
diagnostics (:mod:`sasoftmax.lm.diagnostics`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..utils import atomic_write

__all__ = ["MetricsWriter", "read_metrics", "last_diagnostics", "METRICS_FILE"]

log = logging.getLogger("sasoftmax.lm.metrics")

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (or of the one in a run directory); lines that do not parse (e.g. cut by
    a crash) and rows without a numeric ``step`` are skipped; a missing file gives no rows."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def last_diagnostics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last gradient-diagnostics row (``diag/`` keys and its ``step``) of a run's metrics, or None."""
    rows = [r for r in read_metrics(run_dir) if any(k.startswith("diag/") for k in r)]
    return rows[-1] if rows else None


class MetricsWriter:
    """Appends rows to ``out_dir/metrics.jsonl`` (and TensorBoard scalars when asked and installed).

    ``resume_step``: continuing a run from the checkpoint of that step, rows written after it (by the interrupted
    run) are dropped first; None starts a new file."""

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = False, resume_step: int | None = None) -> None:
        out_dir = Path(out_dir)
        self.path = out_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= resume_step)
            atomic_write(self.path, lambda f: f.write(kept.encode()))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError as err:
                log.warning("tensorboard=true but TensorBoard is unavailable (%s); writing JSONL only", err)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()

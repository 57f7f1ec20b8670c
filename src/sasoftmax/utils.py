"""Small shared helpers: atomic file writes, plain-text/markdown tables, and what a machine is.

* :func:`atomic_write` / :func:`write_json_atomic` / :func:`read_json`: a crash leaves the old file or the new one,
  never half of one (checkpoints, results, reports).
* :func:`format_table` / :func:`format_number`: the one table formatter of the command line, results and reports.
* :func:`machine_info` / :func:`cpu_name`: the machine line every result file and benchmark prints.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json_atomic", "read_json", "fsync_dir", "format_table", "format_number",
           "machine_info", "cpu_name", "vector_isa", "utc_now"]


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (where the platform has directory descriptors)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(binary file)`` on a temporary file in the same directory, fsync, ``os.replace``
    and fsync of the directory: a crash leaves the old file or the new one, never half of one. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` with :func:`atomic_write`."""
    text = json.dumps(obj, indent=1) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object stored at ``path``, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def format_number(x: Any) -> str:
    """A table cell: floats with 3 decimals (scientific outside [1e-3, 1e5)), None as ``-``, the rest as ``str``."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.3f}"
        return f"{x:.3e}"
    return str(x)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A plain-text table (columns right-aligned) or a GitHub-markdown one (``| a | b |`` rows, unpadded); cells go
    through :func:`format_number`."""
    cells = [[str(h) for h in headers]] + [[format_number(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cells[0], widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo, None where there is none (or no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists for the first CPU (empty where there is no such file)."""
    return set((_cpuinfo("flags") or "").split())


def vector_isa() -> str:
    """The widest x86 vector extension the CPU reports (AVX-512, AVX2, AVX), or the machine type elsewhere."""
    flags = cpu_flags()
    for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx")):
        if flag in flags:
            return name
    return platform.machine() or "unknown"


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    """What result files record about the machine: date, platform, CPU model and count, Python, torch, threads."""
    import torch

    return {"date": utc_now(), "machine": platform.platform(), "processor": cpu_name(), "isa": vector_isa(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}

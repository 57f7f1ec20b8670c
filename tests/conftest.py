"""Test-wide setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here, at
collection time, whenever no GPU is present. On a CUDA machine the real kernels run.
"""

from __future__ import annotations

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch import problems surface in the tests themselves
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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

# torch.compile's on-disk caches do not key on a custom op's fake implementation: a compiled graph cached by an
# earlier version of the kernel (e.g. with another layout of the saved row statistics) would be reused. Tests
# compile into a fresh cache of their own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sasoftmax-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

"""Test-wide setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here, at
collection time, whenever no GPU is present. On a CUDA machine the real kernels run.

Test files that need an optional package import it at their top like any other; where the package is not installed
they are not collected, and the report header says which files and why (:data:`OPTIONAL`).
"""

from __future__ import annotations

import importlib.util
import os

# optional package -> the test files that need it
OPTIONAL = {
    "triton": ["core/test_triton.py", "gpu/test_triton_gpu.py"],
    "transformers": ["integrations/test_hf.py", "lm/test_export.py", "lm/test_export_gpt_neox.py"],
    "torchtitan": ["integrations/test_torchtitan.py"],
    # vLLM lives in .venv-serve: scripts/test.sh runs tests/serve there
    "vllm": ["serve/test_vllm.py", "serve/test_vllm_paged.py"],
}
_MISSING = {pkg: files for pkg, files in OPTIONAL.items() if importlib.util.find_spec(pkg) is None}
collect_ignore = [path for files in _MISSING.values() for path in files]


def pytest_report_header(config) -> list[str]:
    return [f"not collected: {', '.join(files)} (needs {pkg}, which is not installed)"
            for pkg, files in _MISSING.items()]


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

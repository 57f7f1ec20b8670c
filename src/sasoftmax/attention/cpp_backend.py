"""The ``"cpp"`` backend: the fused CPU kernel of ``csrc/`` (docs/cpu_kernel.md), built on first use and cached.

The C++ sources ship with the package. The first call on a machine compiles them with
``torch.utils.cpp_extension.load`` (ninja and a C++ compiler needed; ``scripts/setup.sh`` does it once at setup) into
a build directory keyed by a hash of the sources, the torch and Python versions and the compiler flags, so that a
source change or another torch rebuilds and nothing stale is ever loaded. Later processes import the built library
directly (no compiler, no ninja). The directory is ``$SASOFTMAX_EXTENSIONS_DIR`` if set, else inside the virtual
environment (``<venv>/sasoftmax-extensions``), else torch's extensions directory (``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``).

Where the kernel cannot be had (no compiler, no ninja, a failed build, ``SASOFTMAX_CPP=0``), :func:`load_error` says
why; ``backend="auto"`` then logs one warning and uses the chunked backend, ``backend="cpp"`` raises.

``SASOFTMAX_CPU_GEMM=aten`` makes the kernel use ``at::mm`` instead of the BLAS symbols of torch's MKL build
(which it otherwise uses after a self-test, see ``csrc/gemm.h``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..env import flag, text
from .inputs import AttentionInputs

__all__ = ["build", "extension", "load_error", "gemm_in_use", "score_products_in_use", "unsupported_reason",
           "cpp_attention", "block_rows", "hardware_capabilities"]

log = logging.getLogger("sasoftmax.attention")

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("sa_cpu.cpp",)
HEADERS = tuple(sorted(p.name for p in CSRC.glob("*.h")))  # all of them: any edit rebuilds

# Query rows per block: about ROW_BUFFER_ELEMENTS scores in the forward's per-thread (rows x Nk) buffer, between
# MIN_ROWS and MAX_ROWS (the backward's buffers are rows x 256). More rows per block reuse each streamed key/value
# row more often. Measured on a 2-core AVX2 CPU (docs/cpu_kernel.md): in the forward 32-256 rows were within 5% of
# each other, in the backward 128 or 256 rows with 128-512 keys per block within noise; with the earlier whole-row
# backward 128 rows beat 32 and 64.
ROW_BUFFER_ELEMENTS = 1 << 19
MIN_ROWS = 16
MAX_ROWS = 128
# The kernel passes sizes to BLAS as 32-bit integers.
MAX_DIM = 2**31 - 1

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")  # what -mavx512{f,bw,vl,dq} below needs


def hardware_capabilities() -> tuple[str, ...]:
    """The kernel builds this CPU can run, lowest first: ``DEFAULT`` always, ``AVX2`` and ``AVX512`` where
    /proc/cpuinfo lists their instructions (x86 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("DEFAULT",)
    from ..utils import cpu_flags

    flags = cpu_flags()
    caps = ["DEFAULT"]
    if {"avx2", "fma", "f16c"} <= flags:
        caps.append("AVX2")
        if set(_AVX512_FLAGS) <= flags:
            caps.append("AVX512")
    return tuple(caps)


def _cpu_flags() -> tuple[str, list[str]]:
    """(capability, compiler flags): ATen's vector code for the instruction set torch itself dispatches to here
    (lowered with ``ATEN_CPU_CAPABILITY=default|avx2``), never above what the CPU can run (torch reports an
    ``ATEN_CPU_CAPABILITY`` the CPU lacks as it is, and such a build would die of an illegal instruction)."""
    cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    hardware = hardware_capabilities()
    if cap.startswith("AVX512") and "AVX512" not in hardware:
        cap = hardware[-1]
    if cap == "AVX2" and "AVX2" not in hardware:
        cap = "DEFAULT"
    if platform.machine().lower() in ("x86_64", "amd64"):
        if cap.startswith("AVX512"):
            return "AVX512", ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
                              "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
        if cap == "AVX2":
            return "AVX2", ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def _build_flags() -> list[str]:
    # -ffp-contract=off: no silent fused multiply-adds, so that equal products round equally (the plain form's
    # backward relies on it to cancel s dP against Delta exactly, see csrc/rows.h)
    return ["-O3", "-ffp-contract=off", "-fopenmp", *_cpu_flags()[1]]


def _key() -> str:
    """Hash of everything the built library depends on."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    for part in (torch.__version__, str(getattr(torch.version, "git_version", "")), sys.version, platform.machine(),
                 " ".join(_build_flags()), os.environ.get("CXX", "")):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _root() -> Path:
    env = text("SASOFTMAX_EXTENSIONS_DIR")
    if env:
        return Path(env)
    if sys.prefix != sys.base_prefix:  # a virtual environment: keep the build with the environment it belongs to
        return Path(sys.prefix) / "sasoftmax-extensions"
    base = os.environ.get("TORCH_EXTENSIONS_DIR", "").strip()
    return Path(base) if base else Path.home() / ".cache" / "torch_extensions"


def _name() -> str:
    return f"sasoftmax_cpu_{_key()}"


def _import_built(name: str, directory: Path) -> ModuleType | None:
    path = directory / f"{name}.so"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _toolchain_error() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)"
    try:  # the `ninja` package from requirements/main.txt; its binary is not on PATH unless the venv is activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    return None


def _compile(name: str, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    print(f"sasoftmax: compiling the fused CPU attention kernel (once per source/torch version) into {directory}",
          file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=_build_flags(),
        extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False,
    )


def _first_error(message: str) -> str:
    """The compiler's first error line of a failed build (else the message's last line)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [""])[0 if errors else -1]


def build() -> ModuleType | None:
    """Load the kernel, compiling it first if this machine has no build for the current sources; None (and
    :func:`load_error` says why) if it cannot be had. Thread-safe; the outcome is remembered for the process."""
    with _LOCK:
        if "done" in _STATE:
            return _STATE.get("ext")  # type: ignore[return-value]
        ext, err = None, None
        if not flag("SASOFTMAX_CPP"):
            err = "disabled by SASOFTMAX_CPP=0"
        else:
            name = _name()
            directory = _root() / name
            try:
                try:
                    ext = _import_built(name, directory)
                except ImportError:  # e.g. another process is writing it right now: build() below waits for it
                    ext = None
                if ext is None:
                    err = _toolchain_error()
                    if err is None:
                        ext = _compile(name, directory)
            except Exception as e:  # noqa: BLE001 - any build or load failure means: use another backend
                err = f"building the C++ kernel failed: {type(e).__name__}: {_first_error(str(e))}"[:400]
                ext = None
        if ext is not None:
            _STATE["gemm"] = ext.select_gemm(text("SASOFTMAX_CPU_GEMM"))
            _STATE["scores"] = _select_score_products(ext)
        _STATE.update(done=True, ext=ext, error=err)
        return ext


def _select_score_products(ext: ModuleType) -> str:
    """Sets how the kernel forms S = Q K^T and dP = dO V^T; returns a description. By default K and V are packed
    into panels once per call (csrc/panels.h) when at least ``ext.DEFAULT_PANEL_MIN_ROWS`` query rows share each
    key/value head; ``SASOFTMAX_CPU_PANELS=0`` keeps BLAS for them."""
    if not ext.panels_available():
        return "blas (this build has no AVX2/AVX512 panel code)"
    if not flag("SASOFTMAX_CPU_PANELS"):
        ext.set_panel_min_rows(2**62)
        return "blas (SASOFTMAX_CPU_PANELS=0)"
    ext.set_panel_min_rows(ext.DEFAULT_PANEL_MIN_ROWS)
    return f"panels from {ext.DEFAULT_PANEL_MIN_ROWS} query rows per kv head"


def _constant_when_compiled(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this one marker), without importing
    ``torch._dynamo`` when this module is imported: that import alone costs ~1.5 s, on every ``import sasoftmax``.
    tests/core/test_compile.py checks that the decorator still sets exactly this marker."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_compiled
def load_error() -> str | None:
    """None if the fused kernel is available (building it on first use), else why not. A constant to
    ``torch.compile`` (evaluated once when tracing), so that backend selection does not break graphs."""
    build()
    return _STATE.get("error")  # type: ignore[return-value]


def extension() -> ModuleType:
    """The compiled kernel module; ``RuntimeError`` saying why if it cannot be had."""
    ext = build()
    if ext is None:
        raise RuntimeError(f"backend='cpp' is unavailable: {_STATE.get('error')}")
    return ext


def gemm_in_use() -> str | None:
    """Which matrix-product implementation the kernel uses ("blas" or "aten (why)"), None if not loaded."""
    build()
    return _STATE.get("gemm")  # type: ignore[return-value]


def score_products_in_use() -> str | None:
    """How the kernel forms its score products ("panels from N query rows per kv head" or "blas (why)"), None if
    not loaded."""
    build()
    return _STATE.get("scores")  # type: ignore[return-value]


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """``None`` if :func:`cpp_attention` can run ``inp``, else a short human-readable reason."""
    if inp.q.device.type != "cpu":
        return f"tensors are on {inp.q.device.type}, the kernel is for the CPU"
    err = load_error()
    if err is not None:
        return err
    if max(inp.nq, inp.nk, inp.q.shape[-1], inp.v.shape[-1]) > MAX_DIM // 2:
        return "a sequence length or head_dim too large for the kernel's 32-bit BLAS sizes"
    return None


def block_rows(nk: int, rows: int | None = None) -> int:
    """Query rows per block of the kernel for ``nk`` keys (``rows`` forces it)."""
    if rows is not None:
        return max(1, int(rows))
    return max(MIN_ROWS, min(MAX_ROWS, ROW_BUFFER_ELEMENTS // max(nk, 1)))


def compute_operands(q: Tensor, mask_add: Tensor | None, bias: Tensor | None, slopes: Tensor | None):
    """The float operands in the kernel's compute dtype (float64 for float64 inputs, else float32), converted
    without materializing broadcast dims: ``(mask_add, bias, slopes)``."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    slopes = None if slopes is None else slopes.to(cdt).contiguous()
    return _compact_to(mask_add, cdt), _compact_to(bias, cdt), slopes


def _compact_to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``; dims broadcast with stride 0 are converted once and expanded again."""
    if t is None or t.dtype == dtype:
        return t
    index = tuple(slice(0, 1) if t.stride(d) == 0 and t.shape[d] > 1 else slice(None) for d in range(t.dim()))
    return t[index].to(dtype).expand(t.shape)


def cpp_attention(inp: AttentionInputs, block_size: int | None = None) -> Tensor:
    """SA attention of a validated CPU call through the fused kernel (``block_size``: query rows per block,
    default sized from the key count). Raises ``ValueError`` if the kernel cannot run this call and
    ``RuntimeError`` if the kernel is unavailable."""
    reason = unsupported_reason(inp)
    if reason is not None:
        if reason == load_error():
            raise RuntimeError(f"backend='cpp' is unavailable: {reason}")
        raise ValueError(f"backend='cpp' cannot run this call: {reason}")
    from .ops import attention

    return attention(inp, "cpp", block_size)


def main() -> int:
    """Build (if needed) and report; exit status 1 if unavailable. ``scripts/setup.sh`` runs it as
    ``python -c "from sasoftmax.attention import cpp_backend; raise SystemExit(cpp_backend.main())"``."""
    ext = build()
    if ext is None:
        print(f"sasoftmax: fused CPU kernel unavailable: {_STATE.get('error')}; the chunked backend will be used")
        return 1
    print(f"sasoftmax: fused CPU kernel ready ({ext.capability()}, gemm: {_STATE.get('gemm')}, scores: "
          f"{_STATE.get('scores')}) in "
          f"{_root() / _name()}")
    return 0

"""Building and loading the fused CPU kernel of ``csrc/`` (docs/cpu_kernel.md): compiled on first use and cached.

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

from ....env import flag, text

__all__ = ["build", "extension", "load_error", "gemm_in_use", "score_products_in_use", "hardware_capabilities",
           "default_panel_rows", "main"]

log = logging.getLogger("sasoftmax.attention")

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("sa_cpu.cpp",)
HEADERS = tuple(sorted(p.name for p in CSRC.glob("*.h")))  # all of them: any edit rebuilds

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")  # what -mavx512{f,bw,vl,dq} below needs


def hardware_capabilities() -> tuple[str, ...]:
    """The kernel builds this CPU can run, lowest first: ``DEFAULT`` always, ``AVX2`` and ``AVX512`` where
    /proc/cpuinfo lists their instructions (x86 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("DEFAULT",)
    from ....utils import cpu_flags

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


def _tool_path() -> str:
    """PATH for the build: the `ninja` package's binary (requirements/main.txt) is not on PATH unless the virtual
    environment is activated."""
    path = os.environ.get("PATH", "")
    try:
        import ninja

        return ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        return path


def _toolchain_error() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)"
    if shutil.which("ninja", path=_tool_path()) is None:
        return "ninja is not installed (pip install ninja)"
    return None


def _compile(name: str, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    print(f"sasoftmax: compiling the fused CPU attention kernel (once per source/torch version) into {directory}",
          file=sys.stderr, flush=True)
    saved = os.environ.get("PATH")
    os.environ["PATH"] = _tool_path()  # torch's build runs ninja from PATH; restored below (build() holds a lock)
    try:
        return cpp_extension.load(
            name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=_build_flags(),
            extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False,
        )
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


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


def default_panel_rows() -> int:
    """Query rows per key/value head from which the kernel forms S = Q K^T and dP = dO V^T from K/V packed into
    panels once per call (csrc/panels.h) instead of BLAS per block; ``SASOFTMAX_CPU_PANELS=0`` keeps BLAS."""
    ext = extension()
    return ext.DEFAULT_PANEL_MIN_ROWS if flag("SASOFTMAX_CPU_PANELS") else 2**62


def _select_score_products(ext: ModuleType) -> str:
    """How the kernel forms its score products by default, in words."""
    if not ext.panels_available():
        return "blas (this build has no AVX2/AVX512 panel code)"
    if not flag("SASOFTMAX_CPU_PANELS"):
        return "blas (SASOFTMAX_CPU_PANELS=0)"
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


def main() -> int:
    """Build (if needed) and report; exit status 1 if unavailable. ``scripts/setup.sh`` runs it as
    ``python -c "from sasoftmax.attention.backends.cpp import build; raise SystemExit(build.main())"``."""
    ext = build()
    if ext is None:
        print(f"sasoftmax: fused CPU kernel unavailable: {_STATE.get('error')}; the chunked backend will be used")
        return 1
    print(f"sasoftmax: fused CPU kernel ready ({ext.capability()}, gemm: {_STATE.get('gemm')}, scores: "
          f"{_STATE.get('scores')}) in "
          f"{_root() / _name()}")
    return 0

"""The attention backends and their registry.

A backend is a module with three functions:

* ``load_error() -> str | None``: why it cannot be used at all in this process (a missing package, a kernel that
  does not build), else None;
* ``unsupported_reason(inp: AttentionInputs) -> str | None``: why it cannot run this call, else None;
* ``run(inp: AttentionInputs) -> Tensor``: the ``(B, Hq, Nq, Dv)`` output, differentiable in q, k, v and bias.

:data:`REGISTRY` lists them in ``backend="auto"``'s order of preference; ``auto`` takes the first one that serves the
call's device (:attr:`Backend.devices`), is available and can run the call, logging why it passed over the others
(one warning per process when a backend meant for the device is unavailable). Adding a backend is one module and one
:func:`register_backend` line. The modules of the backends that serve this machine's devices are imported with
the registry (:func:`preload`), because ``torch.compile`` cannot trace an import: a compiled first call must find
them loaded. On a machine without CUDA ``import sasoftmax`` therefore still does not import triton.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ..inputs import AttentionInputs

__all__ = ["Backend", "REGISTRY", "register_backend", "get_backend", "backend_names", "choose", "preload"]

log = logging.getLogger("sasoftmax.attention")


@dataclass(frozen=True)
class Backend:
    """One backend: its ``name`` (what ``backend=`` takes), the module implementing it, the device types ``auto``
    may use it for (None: any) and a short description for messages."""

    name: str
    module_name: str
    devices: tuple[str, ...] | None
    description: str

    @property
    def module(self) -> ModuleType:
        module = _MODULES.get(self.module_name)
        if module is None:  # (first use; a dict lookup afterwards, which torch.compile traces)
            if torch.compiler.is_compiling():
                raise RuntimeError(f"sasoftmax: the {self.name!r} backend was first needed inside torch.compile, "
                                   "which cannot import it; call sasoftmax.attention.backends.preload() (or run "
                                   "the model once) before compiling")
            module = _MODULES[self.module_name] = importlib.import_module(self.module_name)
        return module

    def load_error(self) -> str | None:
        return self.module.load_error()

    def unsupported_reason(self, inp: AttentionInputs) -> str | None:
        return self.module.unsupported_reason(inp)

    def run(self, inp: AttentionInputs) -> Tensor:
        return self.module.run(inp)


REGISTRY: list[Backend] = []
_MODULES: dict[str, ModuleType] = {}


def backend_names() -> list[str]:
    return [b.name for b in REGISTRY]


def register_backend(backend: Backend, *, before: str | None = None) -> None:
    """Add ``backend`` to the registry (at the end of ``auto``'s preference, or before the backend named ``before``);
    a backend of the same name is replaced in place."""
    names = backend_names()
    if backend.name in names:
        REGISTRY[names.index(backend.name)] = backend
        return
    REGISTRY.insert(names.index(before) if before in names else len(REGISTRY), backend)


register_backend(Backend("triton", f"{__name__}.triton", ("cuda",), "the fused GPU kernel (Triton)"))
register_backend(Backend("cpp", f"{__name__}.cpp", ("cpu",), "the fused CPU attention kernel"))
register_backend(Backend("chunked", f"{__name__}.chunked", None, "the memory-efficient chunked backend"))
register_backend(Backend("reference", f"{__name__}.reference", None, "the materialized reference backend"))


def preload(device_types: tuple[str, ...] | None = None) -> None:
    """Import the modules of the registered backends that serve ``device_types`` (default: ``"cpu"``, plus
    ``"cuda"`` when CUDA is available), so that a first call inside ``torch.compile`` finds them loaded."""
    if device_types is None:
        device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for backend in REGISTRY:
        if backend.devices is None or any(d in backend.devices for d in device_types):
            backend.module  # noqa: B018 - imported for its side effect


def get_backend(name: str) -> Backend:
    for b in REGISTRY:
        if b.name == name:
            return b
    raise ValueError(f"unknown `backend`={name!r}; expected one of {['auto', *backend_names()]}")


_WARNED: set[tuple[str, str]] = set()


def _note(skipped: list[tuple[Backend, str, bool]], chosen: Backend) -> None:
    """Log why ``auto`` passed over the ``skipped`` backends: once per process as a warning for one that is
    unavailable (meant for this device but not usable here), else at debug level."""
    if torch.compiler.is_compiling():  # (a logging call would break a compiled graph)
        return
    for backend, reason, unavailable in skipped:
        if unavailable and (backend.name, reason) not in _WARNED:
            _WARNED.add((backend.name, reason))
            log.warning("sasoftmax: %s is unavailable (%s); using %s", backend.description, reason,
                        chosen.description)
        log.debug("auto: %s cannot run this call (%s); using %s", backend.name, reason, chosen.name)


def choose(inp: AttentionInputs) -> Backend:
    """``backend="auto"``: the first backend of :data:`REGISTRY` that serves the device and can run the call."""
    device = inp.q.device.type
    skipped: list[tuple[Backend, str, bool]] = []
    for backend in REGISTRY:
        if backend.devices is not None and device not in backend.devices:
            continue
        err = backend.load_error()
        reason = err if err is not None else backend.unsupported_reason(inp)
        if reason is None:
            if skipped:
                _note(skipped, backend)
            return backend
        skipped.append((backend, reason, err is not None))
    raise RuntimeError(f"no sasoftmax backend can run this call on {device}")  # pragma: no cover - chunked runs all


preload()

"""The normalizer registry: :class:`Normalizer` entries by name (the calling conventions are in
:mod:`sasoftmax.normalizers`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ..attention.materialized import WeightsFn, materialized_attention

__all__ = ["Normalizer", "AttentionFn", "InitParamsFn", "WeightsFn", "register_normalizer", "unregister_normalizer",
           "get_normalizer", "list_normalizers"]

AttentionFn = Callable[..., Tensor]
InitParamsFn = Callable[[nn.Module, int], None]


@dataclass(frozen=True)
class Normalizer:
    """One registry entry.

    Attributes:
        name: registry key (also what ``GPTConfig.normalizer`` holds).
        fn: the attention function, see the module docstring for its signature.
        description: one line for listings and docs.
        needs_params: True when the normalizer keeps learnable parameters on the attention module.
        init_params: ``init_params(module, n_heads)`` creates those parameters (e.g. an ``nn.Parameter`` of shape
            ``(n_heads,)``) on the attention module; called once when the model is built. None = nothing to create.
        weights: materialized weights from scores (see the module docstring), or None when the method has none.
    """

    name: str
    fn: AttentionFn
    description: str
    needs_params: bool = False
    init_params: InitParamsFn | None = None
    weights: WeightsFn | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        return self.fn(q, k, v, **kwargs)


_REGISTRY: dict[str, Normalizer] = {}


def register_normalizer(
    name: str,
    fn: AttentionFn | None = None,
    description: str = "",
    *,
    needs_params: bool = False,
    init_params: InitParamsFn | None = None,
    weights: WeightsFn | None = None,
    overwrite: bool = False,
) -> Normalizer | Callable[[AttentionFn], AttentionFn]:
    """Add a normalizer to the registry.

    Use directly, ``register_normalizer("softmax_plus_one", fn, "e^x / (1 + sum e^x)")``, which returns the
    :class:`Normalizer`, or as a decorator, ``@register_normalizer("softmax_plus_one", description=...)``, which
    returns the function unchanged. With only ``weights`` (``register_normalizer(name, weights=w, ...)``) the
    attention function is :func:`materialized_attention` over ``w``. Raises ``ValueError`` if ``name`` is taken
    (unless ``overwrite=True``) or empty, ``TypeError`` if ``fn``/``init_params``/``weights`` are not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if needs_params and init_params is None:
        raise ValueError(f"normalizer {name!r}: `needs_params=True` requires an `init_params(module, n_heads)` hook")
    if init_params is not None and not callable(init_params):
        raise TypeError(f"`init_params` must be callable, got {type(init_params).__name__}")
    if weights is not None and not callable(weights):
        raise TypeError(f"`weights` must be callable, got {type(weights).__name__}")

    def _add(f: AttentionFn) -> Normalizer:
        if not callable(f):
            raise TypeError(f"`fn` must be callable, got {type(f).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"normalizer {name!r} is already registered (pass overwrite=True to replace it)")
        entry = Normalizer(
            name=name, fn=f, description=description, needs_params=bool(needs_params or init_params is not None),
            init_params=init_params, weights=weights,
        )
        _REGISTRY[name] = entry
        return entry

    if fn is None and weights is not None:
        return _add(_materialized_fn(name, weights))
    if fn is None:

        def decorator(f: AttentionFn) -> AttentionFn:
            _add(f)
            return f

        return decorator
    return _add(fn)


def unregister_normalizer(name: str) -> None:
    """Remove ``name`` from the registry (``ValueError`` if it is not registered)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; known: {list_normalizers()}")
    del _REGISTRY[name]


def get_normalizer(name: str) -> Normalizer:
    """The registry entry for ``name``; ``ValueError`` listing the known names if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown normalizer {name!r}; known normalizers: {list_normalizers()}") from None


def list_normalizers() -> list[str]:
    """Registered normalizer names, sorted."""
    return sorted(_REGISTRY)


def _materialized_fn(name: str, weights: WeightsFn) -> AttentionFn:
    def fn(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        out = materialized_attention(weights, q, k, v, **kwargs)
        assert isinstance(out, Tensor)  # (no return_weights: the output alone)
        return out

    fn.__name__ = f"{name}_materialized_attention"
    fn.__doc__ = f"Materialized attention over the weights of the {name!r} normalizer (O(N^2) memory)."
    return fn

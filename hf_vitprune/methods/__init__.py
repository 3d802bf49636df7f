"""Pruning methods, registered by name in one mapping (as peft's PEFT_TYPE_TO_CONFIG_MAPPING)."""

from __future__ import annotations

from .base import PruningMethod, PruningMethodConfig
from .magnitude import MagnitudeConfig, MagnitudeMethod
from .taylor import TaylorConfig, TaylorMethod

METHODS: dict[str, type[PruningMethod]] = {
    MagnitudeMethod.name: MagnitudeMethod,
    TaylorMethod.name: TaylorMethod,
}


def get_method(method: str | PruningMethod, **kwargs) -> PruningMethod:
    """A method instance from its registered name (options as keyword arguments) or an instance."""
    if isinstance(method, PruningMethod):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} given with a method instance; set them on its config.")
        return method
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}.")
    return METHODS[method](**kwargs)


__all__ = [
    "METHODS",
    "MagnitudeConfig",
    "MagnitudeMethod",
    "PruningMethod",
    "PruningMethodConfig",
    "TaylorConfig",
    "TaylorMethod",
    "get_method",
]

"""Pruning methods, registered by name in one mapping (as peft's PEFT_TYPE_TO_CONFIG_MAPPING)."""

from __future__ import annotations

from .base import PruningMethod, PruningMethodConfig
from .lpvit import LPViTConfig, LPViTMethod
from .magnitude import MagnitudeConfig, MagnitudeMethod
from .nvit import NViTConfig, NViTMethod
from .savit import SAViTConfig, SAViTMethod
from .taylor import TaylorConfig, TaylorMethod

METHODS: dict[str, type[PruningMethod]] = {
    MagnitudeMethod.name: MagnitudeMethod,
    TaylorMethod.name: TaylorMethod,
    LPViTMethod.name: LPViTMethod,
    SAViTMethod.name: SAViTMethod,
    NViTMethod.name: NViTMethod,
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
    "LPViTConfig",
    "LPViTMethod",
    "MagnitudeConfig",
    "MagnitudeMethod",
    "NViTConfig",
    "NViTMethod",
    "PruningMethod",
    "PruningMethodConfig",
    "SAViTConfig",
    "SAViTMethod",
    "TaylorConfig",
    "TaylorMethod",
    "get_method",
]

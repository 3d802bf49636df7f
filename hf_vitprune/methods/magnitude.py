"""Magnitude pruning (Torch-Pruning's `GroupMagnitudeImportance`): a unit's score is the L_p norm of the weights
it owns. No data needed. Norms of different kinds are not comparable, so the default scope is uniform."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..importance import Scores, magnitude_scores
from .base import PruningMethod, PruningMethodConfig


@dataclass
class MagnitudeConfig(PruningMethodConfig):
    """`p`: the norm's order (1 or 2 in Torch-Pruning's examples)."""

    scope: str = "uniform"
    p: float = 2.0


class MagnitudeMethod(PruningMethod):
    name = "magnitude"
    config_class = MagnitudeConfig

    def score(self, model: nn.Module, dataloader: Iterable | None = None) -> Scores:
        return magnitude_scores(model, self.config.kinds, p=self.config.p)

"""First-order Taylor pruning on gates: per batch (dL/dg)^2, averaged. The scores estimate the loss change of
removing a unit, so they compare across layers and kinds, and the default scope is one global ranking."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..importance import Scores, taylor_scores
from .base import PruningMethod, PruningMethodConfig


@dataclass
class TaylorConfig(PruningMethodConfig):
    """`num_batches`: how many batches of the dataloader to score with (None: all)."""

    num_batches: int | None = None


class TaylorMethod(PruningMethod):
    name = "taylor"
    config_class = TaylorConfig
    data_driven = True

    def score(self, model: nn.Module, dataloader: Iterable | None = None) -> Scores:
        return taylor_scores(model, dataloader, self.config.kinds, self.config.num_batches)

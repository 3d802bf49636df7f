"""`NViTMethod` ("nvit" in the registry): NViT's saliency and latency-aware global group selection, one-shot.

`prune(model, "nvit", target_macs_ratio=0.5, dataloader=loader)` scores every unit with NViT's saliency averaged
over the dataloader's batches, then runs NViT's schedule with that saliency held fixed: one group at a time, the
group of lowest latency-aware score in one ranking over all layers and kinds goes, and the units are re-priced at
the new dims; the plan is the first one along this sequence that meets the target. For a latency target pass a
`hf_vitprune.latency.LatencyTable` as `latency_model`; for a MACs or params target the credit is the MACs or
parameters a unit saves. The prune-while-training schedule of the paper is `NViTCallback`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...budget import Budget, Selector
from ...importance import Scores
from ...structure import PruningPlan, _channel_indices, base_model
from ..base import PruningMethod
from .config import NViTConfig
from .grouping import Geometry, cost_model_for, greedy_sequence
from .saliency import saliency_scores


class NViTMethod(PruningMethod):
    name = "nvit"
    config_class = NViTConfig
    data_driven = True

    def selector(self, model: nn.Module, budget: Budget) -> Selector:
        """The engine's selector with NViT's group sizes for this model."""
        sizes = self.config.group_sizes(base_model(model).config)
        return Selector(model, budget, self.config.kinds, {kind: sizes[kind] for kind in self.config.kinds})

    def check_reachable(self, model: nn.Module, budget: Budget) -> None:
        self.selector(model, budget).check_reachable()

    def score(self, model: nn.Module, dataloader: Iterable | None = None) -> Scores:
        """Mean over batches of NViT's per-unit (scaled Σ w·dL/dw)², reduced over processes (saliency.py)."""
        config = self.config
        return saliency_scores(model, dataloader, config.kinds, config.criterion_scale, config.num_batches)

    def select(self, model: nn.Module, scores: Scores, budget: Budget) -> PruningPlan:
        """The first plan of NViT's greedy latency-aware sequence whose cost meets the budget (bisection on the
        sequence length, the cost falling as groups go)."""
        vit = base_model(model)
        selector = self.selector(model, budget)
        selector.check_reachable()
        channel_index = _channel_indices(vit.config, vit)
        cost = cost_model_for(budget, vit.config)
        dense = cost.total(Geometry.from_masks(_full_masks(selector.sizes), channel_index))
        order, sequence = greedy_sequence(
            scores,
            selector.sizes,
            channel_index,
            self.config.group_sizes(vit.config),
            self.config.kinds,
            cost,
            self.config.latency_regularization / dense,
            selector.removable_groups,
        )

        def plan_after(k: int) -> PruningPlan:
            removed: dict[tuple[str, int], int] = {}
            for key in sequence[:k]:
                removed[key] = removed.get(key, 0) + 1
            return selector.plan(order, removed)

        low, high = 0, len(sequence)  # removing everything removable meets the target (check_reachable)
        while low < high:
            middle = (low + high) // 2
            if selector.cost(plan_after(middle)) <= selector.target_cost:
                high = middle
            else:
                low = middle + 1
        return plan_after(low)


def _full_masks(sizes: dict[str, list[int]]) -> dict[str, list[torch.Tensor]]:
    return {kind: [torch.ones(n, dtype=torch.bool) for n in layers] for kind, layers in sizes.items()}

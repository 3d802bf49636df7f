"""Budgets: choose which units to remove so that the pruned model meets a cost target.

A target is a fraction of the dense model's cost kept: MACs, parameters, or latency (from a latency model such as
NViT's look-up table). Units of a layer are sorted by score and removed in groups of `round_to` from the least
important, so kept dims stay multiples of `round_to` (hardware alignment), and the last group of every layer
always stays (a block never loses its last head, neuron or channel). Two scopes:

- `global`: one ranking over all layers and kinds of (group score / group cost), the cost-normalised ranking of
  NViT and Torch-Pruning's global mode; the shortest prefix that meets the target is found by bisection, since
  the cost only falls as units are removed.
- `uniform`: the same fraction of units removed from every layer (Torch-Pruning's default, local mode), raised
  kind by kind in the smallest steps the groups allow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_pruned_vit import PrunedViTConfig
from .structure import KINDS, PruningPlan, _channel_indices, base_model, check_kinds, pruned_config, unit_counts

SCOPES = ("global", "uniform")


@dataclass
class Budget:
    """Keep at most `ratio` of the dense cost, as measured by `cost(config)`."""

    metric: str
    ratio: float
    cost: Callable[[PrunedViTConfig], float]


def make_budget(
    target_macs_ratio: float | None = None,
    target_params_ratio: float | None = None,
    target_latency_ratio: float | None = None,
    latency_model: Callable[[PrunedViTConfig], float] | None = None,
) -> Budget:
    """Exactly one target, a fraction in (0, 1). A latency target needs `latency_model(config) -> seconds`."""
    from .cost import count_macs, count_params

    given = {
        "target_macs_ratio": target_macs_ratio,
        "target_params_ratio": target_params_ratio,
        "target_latency_ratio": target_latency_ratio,
    }
    chosen = {name: value for name, value in given.items() if value is not None}
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of {list(given)}, got {sorted(chosen) or 'none'}.")
    ((name, ratio),) = chosen.items()
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {ratio!r}.")
    if name == "target_latency_ratio":
        if latency_model is None:
            raise ValueError("target_latency_ratio needs latency_model (e.g. an NViT LatencyTable).")
        return Budget("latency", float(ratio), latency_model)
    cost = count_macs if name == "target_macs_ratio" else count_params
    return Budget(name.split("_")[1], float(ratio), cost)


def _per_kind(value: int | dict[str, int], name: str) -> dict[str, int]:
    values = value if isinstance(value, dict) else {kind: value for kind in KINDS}
    for kind, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}[{kind!r}] must be a positive integer, got {v!r}.")
    return {kind: values.get(kind, 1) for kind in KINDS}


class Selector:
    """Group the units of every prunable layer and evaluate the cost of removing the lowest groups."""

    def __init__(
        self,
        model: nn.Module,
        budget: Budget,
        kinds: tuple[str, ...],
        round_to: int | dict[str, int] = 1,
    ):
        vit = base_model(model)
        self.config = vit.config
        self.channel_index = _channel_indices(self.config, vit)
        self.budget = budget
        self.kinds = check_kinds(kinds)
        self.round_to = _per_kind(round_to, "round_to")
        self.sizes = unit_counts(self.config)
        self.dense_cost = budget.cost(self.config)
        self.target_cost = budget.ratio * self.dense_cost
        self.layers = [(kind, layer) for kind in self.kinds for layer in range(len(self.sizes[kind]))]

    def removable_groups(self, kind: str, layer: int) -> int:
        """Groups that may go: all but the last (which also holds any remainder)."""
        return (self.sizes[kind][layer] - 1) // self.round_to[kind]

    def plan(self, order: dict[tuple[str, int], torch.Tensor], removed: dict[tuple[str, int], int]) -> PruningPlan:
        """The plan that removes the `removed[layer]` lowest groups of each layer (units in ascending `order`)."""
        plan = PruningPlan(sizes=self.sizes)
        for kind in self.kinds:
            plan.keep[kind] = []
            for layer in range(len(self.sizes[kind])):
                gone = removed.get((kind, layer), 0) * self.round_to[kind]
                plan.keep[kind].append(sorted(order[(kind, layer)][gone:].tolist()))
        return plan

    def cost(self, plan: PruningPlan) -> float:
        return self.budget.cost(pruned_config(self.config, plan, self.channel_index)[0])

    def check_reachable(self) -> None:
        """Raise before any scoring if removing every removable group still misses the target."""
        order = {key: torch.arange(self.sizes[key[0]][key[1]]) for key in self.layers}
        smallest = self.plan(order, {key: self.removable_groups(*key) for key in self.layers})
        floor = self.cost(smallest) / self.dense_cost
        if floor > self.budget.ratio:
            raise ValueError(
                f"target_{self.budget.metric}_ratio={self.budget.ratio:g} is unreachable: pruning kinds "
                f"{list(self.kinds)} with round_to={[self.round_to[k] for k in self.kinds]} keeps at least "
                f"{floor:.3f} of the dense {self.budget.metric}. Prune more kinds or lower round_to."
            )

    def group_costs(self) -> dict[tuple[str, int], float]:
        """Cost saved by removing one group of each layer from the dense model (for cost-normalised ranking)."""
        full = {key: torch.arange(self.sizes[key[0]][key[1]]) for key in self.layers}
        dense = self.cost(self.plan(full, {}))
        return {
            key: max(dense - self.cost(self.plan(full, {key: 1})), 1e-12) if self.removable_groups(*key) else 1.0
            for key in self.layers
        }

    def select(self, scores: dict[str, list[torch.Tensor]], scope: str = "global", normalize: bool = True):
        """The plan with the fewest removals that meets the budget (`scope`: "global" or "uniform")."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")
        self.check_reachable()
        order, group_scores = {}, {}
        for kind, layer in self.layers:
            score = scores[kind][layer].detach().double().cpu()
            if score.numel() != self.sizes[kind][layer]:
                raise ValueError(
                    f"{kind!r} layer {layer} has {self.sizes[kind][layer]} units, scores have {score.numel()}."
                )
            order[(kind, layer)] = torch.argsort(score, stable=True)
            sorted_scores = score[order[(kind, layer)]]
            g = self.round_to[kind]
            n = self.removable_groups(kind, layer)
            group_scores[(kind, layer)] = sorted_scores[: n * g].view(n, g).sum(1) if n else torch.zeros(0)
        if scope == "uniform":
            return self._select_uniform(order)
        costs = self.group_costs() if normalize else dict.fromkeys(self.layers, 1.0)
        candidates = sorted(
            (float(value) / costs[key], position, index, key)
            for position, key in enumerate(self.layers)
            for index, value in enumerate(group_scores[key].tolist())
        )

        # within a layer the ratios ascend with the group index (equal costs), so a prefix removes lowest groups
        return self._shortest_prefix(order, [[key] for *_, key in candidates])

    def _select_uniform(self, order: dict[tuple[str, int], torch.Tensor]) -> PruningPlan:
        """Raise one fraction f for every layer: a layer's j-th group goes when f reaches j * round_to / size. The
        steps are those thresholds, the groups of one kind at one threshold moving together (kinds in `KINDS`
        order on a tie), and the shortest prefix of steps that meets the target is found by bisection. Stepping
        kind by kind instead of by f alone keeps one step small: with f alone, the fraction that takes the first
        head of every block (f = 1/4 with 4 heads) also takes the embedding and MLP groups of that fraction."""
        steps: dict[tuple[float, int], list[tuple[str, int]]] = {}
        for key in self.layers:
            kind, layer = key
            for j in range(1, self.removable_groups(kind, layer) + 1):
                threshold = j * self.round_to[kind] / self.sizes[kind][layer]
                steps.setdefault((threshold, KINDS.index(kind)), []).append(key)
        return self._shortest_prefix(order, [steps[step] for step in sorted(steps)])

    def _shortest_prefix(
        self, order: dict[tuple[str, int], torch.Tensor], steps: list[list[tuple[str, int]]]
    ) -> PruningPlan:
        """The plan of the shortest prefix of `steps` (each removes one more group from each layer it lists) that
        meets the target, by bisection: the cost only falls as groups go, and all steps meet it (check_reachable)."""

        def removed_after(k: int) -> dict[tuple[str, int], int]:
            removed: dict[tuple[str, int], int] = {}
            for keys in steps[:k]:
                for key in keys:
                    removed[key] = removed.get(key, 0) + 1
            return removed

        low, high = 0, len(steps)
        while low < high:
            middle = (low + high) // 2
            if self.cost(self.plan(order, removed_after(middle))) <= self.target_cost:
                high = middle
            else:
                low = middle + 1
        return self.plan(order, removed_after(low))

"""`LPViTMethod`: LPViT as a registered pruning method (`hf_vitprune.prune(model, "lpvit", ...)`).

Its units are weight blocks, not heads or neurons, so it overrides the unit-based contract:

- `score` returns `LPViTScores` (per-block statistics of every LPViT layer, from calibration gradients);
- `select` returns a `BlockMaskPlan` (block masks by module name) from the rate-distortion allocation;
- `compact` puts the masks on a copy of the model and compacts the rows and columns they empty (exact), so the
  result is a smaller PrunedViT whose masked layers keep their masks (saved and restored by `from_pretrained`);
- `check_reachable` accepts MACs and parameter targets (not latency) and checks the per-layer density floor.

Costs are those of the model `prune` returns, with this library's counter (`hf_vitprune.cost`): attention
matmuls are counted and the classifier runs once per image, which fixes the original counter (linear layers only,
classifier MACs x 1000), and units that the masks empty are priced as removed by compaction (with their unmasked
Q/K/V rows, attention matmuls and partner weights), so the allocation does not overshoot the target.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn

from ...budget import Budget
from ...modeling_pruned_vit import PrunedViTModel, PrunedViTPreTrainedModel
from ...structure import base_model
from ..base import PruningMethod
from .allocation import (
    BlockStats,
    LPViTScores,
    allocate,
    calibration_gradients,
    distortion_curve,
    kept_blocks,
    layer_stats,
    numerical_derivative,
    power_coefficient,
    prune_order,
    smooth_curve,
)
from .compaction import compact_block_sparse, compacted_cost
from .config import LPViTConfig
from .masks import BlockMaskPlan, LPViTLayer, flat_shape, grid_shape, lpvit_layers, remove_block_masks

logger = logging.getLogger(__name__)

#: Derivative half-width the original uses for the power weight beta.
BETA_DERIVATIVE_H = 10


class LPViTMethod(PruningMethod):
    """LPViT block pruning (options: `LPViTConfig`); see the module docstring for how it plugs into `prune`."""

    name = "lpvit"
    config_class = LPViTConfig
    data_driven = True
    config: LPViTConfig

    def layers(self, model: nn.Module) -> list[LPViTLayer]:
        if isinstance(model, PrunedViTModel):
            raise TypeError("lpvit needs a classification model: its calibration loss is mean(logits^2).")
        layers = lpvit_layers(model, self.config.layers)
        if not layers:
            raise ValueError(f"the model has no layer of types {list(self.config.layers)} to prune.")
        return layers

    def block_size(self, model: nn.Module) -> tuple[int, int]:
        return self.config.resolved_block_size(base_model(model).config.hidden_size)

    @staticmethod
    def _check_metric(budget: Budget) -> None:
        if budget.metric not in ("macs", "params"):
            raise ValueError(f"lpvit supports target_macs_ratio and target_params_ratio, not a {budget.metric} target.")

    def _cap(self, target: float) -> float:
        """Largest block sparsity of a layer: 1 - min(min_density, (1 - target) / 2), the original's `min_sp`."""
        return 1 - min(self.config.min_density, (1 - target) / 2)

    def check_reachable(self, model: nn.Module, budget: Budget) -> None:
        """Raise before scoring when even every layer at its largest sparsity misses the target (every pruned
        block counted full; the extra savings of compaction are not counted)."""
        self._check_metric(budget)
        layers, block_size = self.layers(model), self.block_size(model)
        dense = budget.cost(base_model(model).config)
        saved = 0
        for layer in layers:
            blocks = layer.num_blocks(block_size)
            pruned = blocks - kept_blocks(blocks, self._cap(budget.ratio))
            weight = layer.tokens if budget.metric == "macs" else 1
            saved += weight * min(layer.numel, pruned * block_size[0] * block_size[1])
        floor = (dense - saved) / dense
        if floor > budget.ratio:
            raise ValueError(
                f"target_{budget.metric}_ratio={budget.ratio:g} is unreachable: pruning layers "
                f"{list(self.config.layers)} keeps at least {floor:.3f} of the dense {budget.metric}. "
                "Prune more layer types or lower min_density."
            )

    def score(self, model: nn.Module, dataloader: Iterable | None = None) -> LPViTScores:
        """Block statistics of every LPViT layer from the calibration gradients (see `allocation`)."""
        layers, block_size = self.layers(model), self.block_size(model)
        gradients = calibration_gradients(model, layers, dataloader, self.config.num_batches)
        return {layer.name: layer_stats(layer, gradients, block_size) for layer in layers}

    def curves(self, stats: list[BlockStats], orders: list[torch.Tensor]) -> list[torch.Tensor]:
        """Distortion curves (smoothed when configured), one per layer, at p = 0, 1/N, ..., 1."""
        config = self.config
        curves = [
            distortion_curve(s, o, config.num_points, config.second_order, config.second_order_mode, config.damping)
            for s, o in zip(stats, orders)
        ]
        return [smooth_curve(c, config.smooth) for c in curves] if config.smooth is not None else curves

    def slopes(self, curves: list[torch.Tensor], layers: list[LPViTLayer], block_size) -> list[torch.Tensor]:
        """J'_l: derivative of the distortion plus, with `lambda_power`, beta * c_l * p (or (1 - p), "survived"),
        beta = lambda_power * mean_l max S'_l / mean_l max P'_l (derivatives with h = 10, as the original)."""
        config = self.config
        grid = torch.arange(config.num_points + 1, dtype=torch.float64) / config.num_points
        if config.lambda_power > 0:
            power = [power_coefficient(layer, block_size) * grid for layer in layers]
            if config.power_sign == "survived":
                power = [p.flip(0) for p in power]  # c_l (1 - p)
            distortion_slope = [float(numerical_derivative(c, grid, BETA_DERIVATIVE_H).max()) for c in curves]
            power_slope = [float(numerical_derivative(p, grid, BETA_DERIVATIVE_H).abs().max()) for p in power]
            beta = config.lambda_power * (sum(distortion_slope) / len(curves)) / (sum(power_slope) / len(curves))
            curves = [c + beta * p for c, p in zip(curves, power)]
        return [numerical_derivative(c, grid, config.derivative_h) for c in curves]

    def select(self, model: nn.Module, scores: LPViTScores, budget: Budget) -> BlockMaskPlan:
        """Allocate block sparsities to meet `budget` and build the top-k block masks at those sparsities."""
        layers, block_size = self.layers(model), self.block_size(model)
        missing = sorted({layer.name for layer in layers} - set(scores))
        if missing:
            raise ValueError(f"scores lack layers {missing[:5]}; score the model with this method first.")
        stats = [scores[layer.name] for layer in layers]
        orders = [prune_order(s, self.config.ranking) for s in stats]
        slopes = self.slopes(self.curves(stats, orders), layers, block_size)
        self._check_metric(budget)
        dense = budget.cost(base_model(model).config)

        def masks_at(sparsities: list[float]) -> dict[str, torch.Tensor]:
            masks = {}
            for layer, s, order, p in zip(layers, stats, orders, sparsities):
                keep = torch.zeros(s.num_blocks, dtype=torch.uint8)
                keep[order[s.num_blocks - kept_blocks(s.num_blocks, p) :]] = 1
                start = 0
                for name, module in layer.modules:
                    shape = grid_shape(flat_shape(module), block_size)
                    masks[name] = keep[start : start + shape[0] * shape[1]].view(shape)
                    start += shape[0] * shape[1]
            return masks

        def cost_ratio(sparsities: list[float]) -> float:
            masks = masks_at(sparsities)
            return compacted_cost(model, masks, block_size, self.config.kinds, budget.cost, budget.metric) / dense

        grid = torch.arange(self.config.num_points, dtype=torch.float64) / self.config.num_points
        allocation = allocate(slopes, grid, self._cap(budget.ratio), cost_ratio, budget.ratio)
        logger.info(
            "lpvit: lambda = 2^%.3f, %s ratio %.4f (target %.4f)",
            allocation.exponent,
            budget.metric,
            allocation.ratio,
            budget.ratio,
        )
        masks = masks_at(allocation.sparsity)
        sparsity = {layer.name: p for layer, p in zip(layers, allocation.sparsity)}
        return BlockMaskPlan(block_size, masks, sparsity)

    def compact(self, model: PrunedViTPreTrainedModel, plan: BlockMaskPlan) -> PrunedViTPreTrainedModel:
        """A copy of `model` with the plan's masks (any earlier masks folded first), its emptied rows and columns
        compacted (`compact_block_sparse`); `model` is not modified."""
        masked = copy.deepcopy(model)
        remove_block_masks(masked)
        plan.apply(masked)
        pruned, _ = compact_block_sparse(masked, self.config.kinds)
        return pruned

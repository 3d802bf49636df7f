"""SAViT as a registered pruning method: `prune(model, "savit", target_macs_ratio=..., dataloader=...)`."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from ...budget import Budget
from ...importance import Scores, is_main_process, taylor_scores
from ...structure import PruningPlan, base_model, pruned_config, unit_counts
from ..base import PruningMethod
from .allocation import RatioProblem, allocate, check_plain_blocks, protected_count
from .config import SAViTConfig
from .hessian import collaborative_hessian
from .importance_io import SAViTImportance

logger = logging.getLogger(__name__)


def calibration_batches(dataloader: Iterable, fraction: float) -> int | None:
    """Batches to use: ⌊fraction·len⌋ (at least 1), or None (all of them) for fraction 1."""
    if fraction == 1:
        return None
    if not hasattr(dataloader, "__len__"):
        raise ValueError("calibration_fraction < 1 needs a dataloader with a length; pass fewer batches instead.")
    return max(1, int(fraction * len(dataloader)))


class SAViTMethod(PruningMethod):
    """SAViT (Zheng et al., NeurIPS 2022): structure-aware pruning of heads, MLP neurons and embedding channels.

    `score` computes the gate Fisher of every unit (per batch (dL/dg)², averaged: `importance.taylor_scores`,
    the original's `--pruning_method 2` without its constant 2^32 loss-scale factor) and the 3x3 cross-component
    Hessian Ĥ (`hessian.collaborative_hessian`); `select` allocates the counts per component under the cost target
    (`allocation`) and prunes the lowest-scored units of each component, across all blocks.

    Deviation on purpose: the masked model here takes LayerNorm statistics over active embedding channels only,
    so the compact model computes exactly the masked one. SAViT's residual gate left LayerNorm over all channels
    (zeros and LayerNorm bias leaking into the pruned channels), so its compact model differed from its masked
    model until fine-tuning. Statistics therefore describe this library's exact pruned function; likewise the MLP
    gate here multiplies the GELU output where SAViT gated its input (a 0 gate removes the neuron either way, the
    gradients differ). Follows the released code where it differs from the paper: the allocation objective is Ĥ's
    quadratic form alone (the unit scores only rank units within a component). Fixed defects: see `allocation`.
    """

    name = "savit"
    config_class = SAViTConfig
    data_driven = True

    def __init__(self, config: SAViTConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.data_driven = self.config.importance_from is None or self.config.need_hessian
        self.importance: SAViTImportance | None = None

    def score(self, model: nn.Module, dataloader: Iterable | None = None) -> Scores:
        """Unit scores (returned) and Ĥ (kept in `self.importance`, with the scores), from data or from
        `importance_from`; written to `importance_to` when set."""
        config = self.config
        counts = unit_counts(base_model(model).config)
        if self.data_driven and dataloader is None:
            raise ValueError("savit needs data for its statistics: pass a dataloader (or importance_from).")
        num_batches = calibration_batches(dataloader, config.calibration_fraction) if self.data_driven else None
        if config.importance_from is not None:
            importance = SAViTImportance.load(config.importance_from)
            for kind in config.kinds:
                shapes = [s.numel() for s in importance.scores.get(kind, [])]
                if shapes != counts[kind]:
                    raise ValueError(
                        f"importance_from has {kind!r} scores for {shapes} units, the model has {counts[kind]}."
                    )
            scores = {kind: importance.scores[kind] for kind in config.kinds}
            metadata = dict(importance.metadata, importance_from=str(config.importance_from))
        else:
            scores = taylor_scores(model, dataloader, config.kinds, num_batches)
            importance = SAViTImportance(scores)
            metadata = {"calibration_fraction": config.calibration_fraction}
        hessian = importance.hessian
        if config.need_hessian:
            hessian, batches = collaborative_hessian(
                model, dataloader, num_batches, seed=config.seed, hessian_embed_factor=config.hessian_embed_factor
            )
            metadata.update(hessian_batches=batches, seed=config.seed, hessian_embed_factor=config.hessian_embed_factor)
        elif hessian is None:
            raise ValueError(f"importance_from={str(config.importance_from)!r} has no Hessian: set need_hessian=True.")
        logger.info("savit Hessian (rows/columns head, mlp, embed): %s", hessian.tolist())
        self.importance = SAViTImportance(scores, hessian, metadata)
        if config.importance_to is not None and is_main_process():
            self.importance.save(config.importance_to)
        return scores

    def select(self, model: nn.Module, scores: Scores, budget: Budget) -> PruningPlan:
        """Allocate the counts per component under `budget` and prune the lowest-scored unprotected units."""
        if self.importance is None:
            raise ValueError("savit selects with the Hessian of its own score(): call score() first.")
        config = self.config
        problem = RatioProblem(
            base_model(model).config,
            scores,
            self.importance.hessian,
            budget,
            config.kinds,
            config.tolerance,
            config.protect_fraction,
        )
        options = {
            "population_size": config.population_size,
            "num_offspring": config.num_offspring,
            "num_generations": config.num_generations,
            "seed": config.seed,
        }
        allocation = allocate(problem, config.search, **options)
        plan = problem.plan(allocation)
        achieved = budget.cost(pruned_config(problem.model.config, plan)[0])
        if achieved > problem.target:  # the cost model is exact; this guards the promise never to overshoot
            raise RuntimeError(f"savit plan costs {achieved} > target {problem.target}: cost model mismatch.")
        return plan

    def check_reachable(self, model: nn.Module, budget: Budget) -> None:
        """Raise before any scoring when pruning every unprotected unit still misses the target."""
        config = base_model(model).config
        check_plain_blocks(config)
        if budget.metric not in ("macs", "params"):
            raise ValueError(f"savit allocates under a MACs or params target, not {budget.metric!r}.")
        plan = PruningPlan.full(config)
        for kind in self.config.kinds:
            plan.keep[kind] = [list(range(protected_count(n, self.config.protect_fraction))) for n in plan.sizes[kind]]
        floor = budget.cost(pruned_config(config, plan)[0]) / budget.cost(config)
        if floor > budget.ratio:
            raise ValueError(
                f"target_{budget.metric}_ratio={budget.ratio:g} is unreachable: savit pruning "
                f"{list(self.config.kinds)} with protect_fraction={self.config.protect_fraction:g} keeps at least "
                f"{floor:.3f} of the dense {budget.metric}."
            )

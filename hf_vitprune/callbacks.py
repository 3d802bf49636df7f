"""`PruningCallback`: any registered pruning method inside `transformers.Trainer`, one-shot or iterative.

The callback only decides *when*; the method scores and selects. While training, pruned units are masked through
the gates (never by changing shapes: a callback cannot rebuild the optimizer or the DDP wrapper safely, see
HF_NOTES §2.4). After `trainer.train()`, `callback.compact(model)` returns the smaller, exactly equivalent model.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Sequence

import torch
from transformers import TrainerCallback

from .budget import Budget, make_budget
from .importance import is_main_process
from .methods import PruningMethod, get_method
from .modeling_pruned_vit import PrunedViTPreTrainedModel
from .structure import PruningPlan, apply_masks, base_model, compact

logger = logging.getLogger(__name__)

PLAN_FILE = "pruning_plan.json"


class PruningCallback(TrainerCallback):
    """Prune at the given optimizer steps, to a target reached linearly over the steps (one step: one-shot).

    Args:
        method: a registered method name or a `PruningMethod` instance.
        target_macs_ratio / target_params_ratio: the final fraction of the dense cost kept.
        prune_steps: optimizer steps at which to prune (0 = before the first step). With n steps, step k keeps
            `1 - (1 - target) * (k + 1) / n` of the dense cost.
        num_score_batches: batches of the trainer's train dataloader (or `dataloader`) used for each scoring.
        dataloader: batches to score with instead of the trainer's.
        method_kwargs: the method's options.
    """

    def __init__(
        self,
        method: str | PruningMethod = "taylor",
        target_macs_ratio: float | None = None,
        *,
        target_params_ratio: float | None = None,
        prune_steps: Sequence[int] = (0,),
        num_score_batches: int = 8,
        dataloader: Iterable | None = None,
        **method_kwargs,
    ) -> None:
        self.method = get_method(method, **method_kwargs)
        self.budget = make_budget(target_macs_ratio, target_params_ratio)
        steps = sorted(set(prune_steps))
        if not steps or steps[0] < 0:
            raise ValueError(f"prune_steps must be non-empty, non-negative optimizer steps, got {list(prune_steps)}.")
        self.prune_steps = steps
        self.num_score_batches = num_score_batches
        self.dataloader = dataloader
        self.plan: PruningPlan | None = None

    def stage_budget(self, stage: int) -> Budget:
        ratio = 1 - (1 - self.budget.ratio) * (stage + 1) / len(self.prune_steps)
        return Budget(self.budget.metric, ratio, self.budget.cost)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.dataloader is None:
            self.dataloader = train_dataloader
        self.method.check_reachable(model, self.budget)
        if self.plan is not None:  # resumed: the masks are not in the weights, put them back
            apply_masks(model, self.plan)
        if state.global_step == 0 and self.prune_steps[0] == 0:
            self._prune(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.prune_steps and state.global_step > 0:
            self._prune(model, self.prune_steps.index(state.global_step))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.plan is not None:
            zero_pruned_weights(model, self.plan)

    def on_save(self, args, state, control, **kwargs):
        if self.plan is not None and is_main_process():
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.plan.save(os.path.join(folder, PLAN_FILE))

    def _prune(self, model: PrunedViTPreTrainedModel, stage: int) -> None:
        if self.dataloader is None and self.method.data_driven:
            raise ValueError(f"{self.method.name} needs data: give the Trainer a train_dataset or pass dataloader.")
        batches = itertools.islice(self.dataloader, self.num_score_batches) if self.dataloader is not None else None
        scores = self.method.score(model, list(batches) if batches is not None else None)
        if self.plan is not None:  # what is pruned stays pruned: lowest possible score
            for kind in scores:
                for layer, score in enumerate(scores[kind]):
                    score[~self.plan.mask(kind, layer)] = -torch.inf
        self.plan = self.method.select(model, scores, self.stage_budget(stage))
        apply_masks(model, self.plan)
        zero_pruned_weights(model, self.plan)
        logger.info(
            "pruning stage %d/%d: heads %s, mlp %s",
            stage + 1,
            len(self.prune_steps),
            self.plan.num_kept("head"),
            self.plan.num_kept("mlp"),
        )

    def compact(self, model: PrunedViTPreTrainedModel) -> PrunedViTPreTrainedModel:
        """The compact model of the current plan (call after `trainer.train()`)."""
        if self.plan is None:
            raise ValueError("nothing was pruned yet: compact() is for after training.")
        return compact(model, self.plan)


@torch.no_grad()
def zero_pruned_weights(model: PrunedViTPreTrainedModel, plan: PruningPlan) -> None:
    """Zero the rows that produce masked heads, Q/K/V indices and MLP neurons (NViT re-zeroes after every optimizer
    step), so weight decay and momentum cannot revive them and the masked weights read as pruned on disk."""
    vit = base_model(model)
    for i, layer in enumerate(vit.layers):
        attn = layer.attention
        qk = plan.mask("qk", i)[None, :] & plan.mask("head", i)[:, None]
        v = plan.mask("v", i)[None, :] & plan.mask("head", i)[:, None]
        for proj, keep in ((attn.q_proj, qk), (attn.k_proj, qk), (attn.v_proj, v)):
            rows = ~keep.flatten().to(proj.weight.device)
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
        neurons = ~plan.mask("mlp", i).to(layer.mlp.fc1.weight.device)
        layer.mlp.fc1.weight[neurons] = 0
        layer.mlp.fc1.bias[neurons] = 0

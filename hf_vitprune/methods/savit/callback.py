"""`SAViTCallback`: SAViT one-shot pruning inside `transformers.Trainer`, then fine-tuning with the masks."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ...callbacks import PruningCallback, zero_pruned_weights
from ...modeling_pruned_vit import PrunedViTPreTrainedModel
from ...structure import apply_masks

logger = logging.getLogger(__name__)


class SAViTCallback(PruningCallback):
    """Prune once with SAViT, before the first optimizer step (`prune_step=0`) or after step `prune_step`.

    Statistics come from the trainer's train dataloader (or `dataloader`), `calibration_fraction` of its batches,
    as the original's `--pruning_feed_percent`. The plan is applied as 0/1 gates and the pruned rows are re-zeroed
    after every optimizer step, so the fine-tuning runs on the masked model; shapes never change inside the
    Trainer (HF_NOTES §2.4). After `trainer.train()`, `callback.compact(model)` returns the smaller model, exactly
    equal to the masked one. The plan is saved with every checkpoint and re-applied on resume.

    Args:
        target_macs_ratio / target_params_ratio: fraction of the dense cost kept (give one).
        prune_step: optimizer step after which to prune (0: at train begin).
        dataloader: batches to score with instead of the trainer's train dataloader (must be re-iterable: the
            scores and the Hessian are two passes).
        savit_options: `SAViTConfig` options, e.g. `search="grid"`, `calibration_fraction=0.1`.

    Example:
        ```python
        callback = SAViTCallback(target_macs_ratio=0.5, calibration_fraction=0.1)
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
        trainer.train()
        compact = callback.compact(trainer.model)
        ```
    """

    def __init__(
        self,
        target_macs_ratio: float | None = None,
        *,
        target_params_ratio: float | None = None,
        prune_step: int = 0,
        dataloader: Iterable | None = None,
        **savit_options,
    ) -> None:
        if isinstance(prune_step, bool) or not isinstance(prune_step, int) or prune_step < 0:
            raise ValueError(f"prune_step must be a non-negative integer (optimizer step), got {prune_step!r}.")
        super().__init__(
            "savit",
            target_macs_ratio,
            target_params_ratio=target_params_ratio,
            prune_steps=(prune_step,),
            dataloader=dataloader,
            **savit_options,
        )

    def _prune(self, model: PrunedViTPreTrainedModel, stage: int) -> None:
        """Score on the whole dataloader (the method takes its calibration fraction), allocate, mask."""
        scores = self.method.score(model, self.dataloader)
        self.plan = self.method.select(model, scores, self.budget)
        apply_masks(model, self.plan)
        zero_pruned_weights(model, self.plan)
        logger.info(
            "savit pruned at step %d: heads %s, mlp %s, embed %s kept",
            self.prune_steps[stage],
            self.plan.num_kept("head"),
            self.plan.num_kept("mlp"),
            self.plan.num_kept("embed"),
        )

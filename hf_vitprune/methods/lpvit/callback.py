"""`LPViTCallback`: keep LPViT's block masks fixed while fine-tuning with `transformers.Trainer`."""

from __future__ import annotations

from transformers import TrainerCallback

from .masks import fold_block_masks, masked_fraction, masked_modules


class LPViTCallback(TrainerCallback):
    """Fine-tuning with fixed block masks, as the original's stage 2 (no regrowth, no re-pruning).

    The masked layers compute with `W * M`, so masked weights get no gradient. After every optimizer step the
    callback zeroes the stored weights under the masks again (`W <- W * M`), so nothing (momentum or optimizer
    state from before the masks, a custom optimizer) can revive them, and every checkpoint holds the pruned
    weights with their masks. The masked fraction of the masked layers' weights is logged as `block_sparsity`.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not masked_modules(model):
            raise ValueError(
                "LPViTCallback needs a block-masked model: prune it with hf_vitprune.prune(model, 'lpvit', ...), "
                "load a block-sparse checkpoint or convert LPViT masks with from_lpvit_masks."
            )
        fold_block_masks(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        fold_block_masks(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is not None and model is not None:
            logs["block_sparsity"] = masked_fraction(model)

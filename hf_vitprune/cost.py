"""Analytic cost model of PrunedViT: multiply-accumulates (MACs) and parameters, from the config alone.

MACs are per image (times `batch_size`) and count every matrix product of the forward pass: the patch-embedding
convolution, the Q/K/V/output projections, the two attention matmuls (q·kᵀ and probabilities·v), the MLP, the
pooler and the classifier(s). LayerNorms, softmax, activations, residual adds, biases, token concatenation and
gates are not counted, as `torch.utils.flop_counter.FlopCounterMode` does not count them either (its FLOPs are
2 x these MACs). Parameters are exact: they equal `sum(p.numel() for p in model.parameters())` (the
`channel_index` buffer and the gates are buffers, not parameters).

Block-sparse layers (LPViT's `weight_block_mask`, see `modeling_pruned_vit.add_block_mask`) count only their kept
blocks, LPViT's "FLOPs remained": for a model (not a config), every weight a block mask zeroes is subtracted from
the MACs (once per token the layer is applied to) and from the parameters (so `count_params` then counts the
weights that are kept, not `p.numel()`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .configuration_pruned_vit import PrunedViTConfig
from .modeling_pruned_vit import (
    BLOCK_MASK_BUFFER,
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
    PrunedViTModel,
    expand_block_mask,
)

_ACCEPTED = (
    PrunedViTConfig,
    PrunedViTModel,
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
)


class Cost(NamedTuple):
    """MACs (per image) and parameters of a part of the model."""

    macs: int
    params: int


def _sum(costs: Iterable[Cost]) -> Cost:
    """Elementwise sum (`+` on tuples concatenates)."""
    costs = list(costs)
    return Cost(sum(cost.macs for cost in costs), sum(cost.params for cost in costs))


@dataclass
class CostBreakdown:
    """A cost split into the embeddings, each transformer block and the head.

    `head` is everything after the last block: the final LayerNorm, the pooler and the classifier(s).
    """

    embeddings: int
    blocks: list[int]
    head: int

    @property
    def total(self) -> int:
        return self.embeddings + sum(self.blocks) + self.head


def linear_cost(tokens: int, in_features: int, out_features: int, bias: bool = True) -> Cost:
    """A dense `nn.Linear(in_features, out_features)` applied to `tokens` vectors."""
    return Cost(tokens * in_features * out_features, in_features * out_features + (out_features if bias else 0))


def block_cost(
    tokens: int,
    block_dim: int,
    heads: int,
    qk_head_dim: int,
    v_head_dim: int,
    intermediate_size: int,
    *,
    hidden_size: int | None = None,
    qkv_bias: bool = True,
) -> Cost:
    """MACs (per image) and parameters of one transformer block on `tokens` tokens.

    `block_dim` is the residual width the block reads and writes; `hidden_size` is the width of its two
    LayerNorms (the whole residual stream, even when `block_dim < hidden_size`; defaults to `block_dim`).
    Pure arithmetic on the dims, so pruning code can price a unit by the difference of two calls.
    """
    hidden_size = block_dim if hidden_size is None else hidden_size
    qk_width, v_width = heads * qk_head_dim, heads * v_head_dim
    return _sum(
        (
            Cost(0, 2 * 2 * hidden_size),  # layernorm_before, layernorm_after (weight and bias)
            linear_cost(tokens, block_dim, qk_width, qkv_bias),  # q_proj
            linear_cost(tokens, block_dim, qk_width, qkv_bias),  # k_proj
            linear_cost(tokens, block_dim, v_width, qkv_bias),  # v_proj
            Cost(tokens * tokens * (qk_width + v_width), 0),  # q·kᵀ, then probabilities·v
            linear_cost(tokens, v_width, block_dim),  # o_proj
            linear_cost(tokens, block_dim, intermediate_size),  # fc1
            linear_cost(tokens, intermediate_size, block_dim),  # fc2
        )
    )


def _embeddings_cost(config: PrunedViTConfig) -> Cost:
    """Patch-embedding convolution (one `C*p*p -> E` product per patch), CLS/distillation tokens, positions."""
    hidden = config.hidden_size
    tokens = config.num_prefix_tokens + config.num_patches
    return _sum(
        (
            linear_cost(config.num_patches, config.num_channels * config.patch_size**2, hidden),
            Cost(0, config.num_prefix_tokens * hidden + tokens * hidden),
        )
    )


def _head_cost(config: PrunedViTConfig, num_classifiers: int, pooler: bool) -> Cost:
    """Final LayerNorm, optional pooler (dense on the pooled token) and `num_classifiers` linear classifiers."""
    hidden = config.hidden_size
    pooler_cost = linear_cost(1, hidden, config.pooler_output_size or hidden) if pooler else Cost(0, 0)
    classifiers = [linear_cost(1, hidden, config.num_labels)] * num_classifiers
    return _sum((Cost(0, 2 * hidden), pooler_cost, *classifiers))


def _heads_of(model_or_config: PrunedViTConfig | nn.Module) -> tuple[PrunedViTConfig, int, bool]:
    """The config, number of classifiers and presence of a pooler of a model or config (see `count_macs`)."""
    if isinstance(model_or_config, PrunedViTConfig):
        return model_or_config, 1 + int(model_or_config.use_distillation_token), False
    if isinstance(model_or_config, PrunedViTModel):
        return model_or_config.config, 0, model_or_config.pooler is not None
    if isinstance(model_or_config, PrunedViTForImageClassification):
        classifiers = [model_or_config.classifier]
    elif isinstance(model_or_config, PrunedViTForImageClassificationWithTeacher):
        classifiers = [model_or_config.cls_classifier, model_or_config.distillation_classifier]
    else:
        names = ", ".join(cls.__name__ for cls in _ACCEPTED)
        raise TypeError(f"model_or_config must be one of {names}; got {type(model_or_config).__name__}.")
    num_classifiers = sum(isinstance(classifier, nn.Linear) for classifier in classifiers)
    return model_or_config.config, num_classifiers, model_or_config.vit.pooler is not None


def _breakdown(model_or_config: PrunedViTConfig | nn.Module) -> tuple[Cost, list[Cost], Cost]:
    config, num_classifiers, pooler = _heads_of(model_or_config)
    tokens = config.num_prefix_tokens + config.num_patches
    dims = zip(
        config.block_dims, config.heads_per_layer, config.qk_head_dims, config.v_head_dims, config.intermediate_sizes
    )
    blocks = [block_cost(tokens, *block, hidden_size=config.hidden_size, qkv_bias=config.qkv_bias) for block in dims]
    if getattr(config, "qkv_token_scale", False):  # NViT's per-token q/k/v multiplier: `tokens` parameters a block
        blocks = [Cost(block.macs, block.params + tokens) for block in blocks]
    embeddings, head = _embeddings_cost(config), _head_cost(config, num_classifiers, pooler)
    if isinstance(model_or_config, PrunedViTConfig):
        return embeddings, blocks, head
    masked = _masked_weights_cost(model_or_config)
    return _minus(embeddings, masked[0]), [_minus(b, m) for b, m in zip(blocks, masked[1])], _minus(head, masked[2])


def _minus(cost: Cost, saved: Cost) -> Cost:
    return Cost(cost.macs - saved.macs, cost.params - saved.params)


def _masked_weights(module: nn.Module) -> int:
    """Weights of `module` that its block mask zeroes (0 without a mask); partial edge blocks count their size."""
    mask = getattr(module, BLOCK_MASK_BUFFER, None)
    if mask is None:
        return 0
    shape = (module.weight.shape[0], module.weight[0].numel())
    return module.weight.numel() - int(expand_block_mask(mask, module.block_size, shape).sum())


def _masked_weights_cost(model: nn.Module) -> tuple[Cost, list[Cost], Cost]:
    """MACs and parameters of the block-masked weights, split like `_breakdown`: the patch projection runs once
    per patch, block layers once per token, the pooler and classifiers once per image."""
    vit = model if isinstance(model, PrunedViTModel) else model.vit
    config = vit.config

    def saved(modules: Iterable[nn.Module], tokens: int) -> Cost:
        weights = sum(_masked_weights(module) for module in modules)
        return Cost(tokens * weights, weights)

    inner = {id(m) for part in (vit.embeddings, *vit.layers) for m in part.modules()}
    return (
        saved(vit.embeddings.modules(), config.num_patches),
        [saved(layer.modules(), config.num_prefix_tokens + config.num_patches) for layer in vit.layers],
        saved((m for m in model.modules() if id(m) not in inner), 1),
    )


def count_macs(
    model_or_config: PrunedViTConfig | nn.Module, by_block: bool = False, batch_size: int = 1
) -> int | CostBreakdown:
    """Analytic multiply-accumulates of a forward pass on `batch_size` images (see the module docstring).

    Args:
        model_or_config: a `PrunedViTConfig`, `PrunedViTModel`, `PrunedViTForImageClassification` or
            `PrunedViTForImageClassificationWithTeacher`. For a model, the heads it has are counted (pooler,
            classifier or the two DeiT classifiers), and block-masked layers count only their kept blocks. A
            config is counted dense, as `PrunedViTForImageClassification` without pooler, plus the distillation
            classifier of the WithTeacher model when `use_distillation_token` is set.
        by_block: return a `CostBreakdown` (embeddings, each block, head) instead of the total.
        batch_size: number of images.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    embeddings, blocks, head = _breakdown(model_or_config)
    breakdown = CostBreakdown(
        embeddings.macs * batch_size, [block.macs * batch_size for block in blocks], head.macs * batch_size
    )
    return breakdown if by_block else breakdown.total


def count_params(model_or_config: PrunedViTConfig | nn.Module, by_block: bool = False) -> int | CostBreakdown:
    """Parameter count, equal to `sum(p.numel() for p in model.parameters())` minus the weights block masks zero.

    Accepts the same inputs, with the same head assumption for a config, as `count_macs`. `by_block` returns a
    `CostBreakdown`; each block includes its two LayerNorms, the head includes the final LayerNorm.
    """
    embeddings, blocks, head = _breakdown(model_or_config)
    breakdown = CostBreakdown(embeddings.params, [block.params for block in blocks], head.params)
    return breakdown if by_block else breakdown.total


def cost_record(
    model: PrunedViTConfig | nn.Module, dense: PrunedViTConfig | nn.Module | None = None, **dense_cost: int
) -> dict[str, float]:
    """MACs and params of `model` beside those of the dense model (`dense`, or `dense_macs=`/`dense_params=` given
    directly), with their ratios: the cost part of a `config.pruning` record."""
    macs, params = count_macs(model), count_params(model)
    dense_macs = dense_cost["dense_macs"] if "dense_macs" in dense_cost else count_macs(dense)
    dense_params = dense_cost["dense_params"] if "dense_params" in dense_cost else count_params(dense)
    return {
        "macs": macs,
        "params": params,
        "dense_macs": dense_macs,
        "dense_params": dense_params,
        "macs_ratio": macs / dense_macs,
        "params_ratio": params / dense_params,
    }


__all__ = ["Cost", "CostBreakdown", "block_cost", "cost_record", "count_macs", "count_params", "linear_cost"]

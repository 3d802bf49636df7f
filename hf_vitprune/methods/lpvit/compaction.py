"""Exact compaction of block-sparse layers: rows and columns that the masks empty become smaller dense dims.

A block mask that empties whole rows or columns removes structured units, expressed as a `PruningPlan` and cut
by `hf_vitprune.structure.compact`:

- MLP neuron j: fc2 column j fully masked, or fc1 row j fully masked (the neuron then outputs act(b1_j), a
  constant folded into fc2's bias).
- V index j of head h: o_proj column fully masked, or v_proj row fully masked (every token's value is then the
  bias, softmax rows sum to 1, so the head outputs the bias: folded into o_proj's bias). A head goes when all its
  V indices go; a V index goes when it goes in every kept head.
- Q/K index j: k_proj row fully masked in every kept head (q.k then shifts each query's logits by a constant,
  which softmax ignores), or q_proj row fully masked with a zero bias (the product is 0).

Embedding and per-block channels are not removed (an emptied o_proj/fc2 row still adds its bias). The remaining
sparsity stays as block masks on the smaller model, re-tiled from the top-left; a block is kept when it holds any
kept weight, so the compact model computes exactly what the masked one does (eval mode). Everything is computed
on block masks, so `compacted_cost` can price a candidate allocation without building it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...configuration_pruned_vit import PrunedViTConfig
from ...modeling_pruned_vit import PrunedViTPreTrainedModel, add_block_mask
from ...structure import PruningPlan, _channel_indices, _rows, base_model, compact, pruned_config
from .config import COMPACT_KINDS
from .masks import block_masks, flat_shape, lpvit_layers, record_block_sparsity, remove_block_masks

#: A module's kept (rows, columns) after compaction; None = all.
Slice = tuple[torch.Tensor | None, torch.Tensor | None]


def _line_sizes(length: int, block: int) -> torch.Tensor:
    """Rows (or columns) in each block-row (block-column); the last one may be partial."""
    sizes = torch.full((-(-length // block),), block, dtype=torch.long)
    sizes[-1] = length - block * (sizes.numel() - 1)
    return sizes


def dead_lines(mask: torch.Tensor, block_size: tuple[int, int], shape: tuple[int, int], dim: int) -> torch.Tensor:
    """Boolean per row (`dim=0`) or column (`dim=1`) of a weight: True when its block mask empties it."""
    return (~mask.bool().any(1 - dim)).repeat_interleave(block_size[dim])[: shape[dim]]


def _grouping(kept: torch.Tensor | None, length: int, block: int) -> torch.Tensor:
    """[new blocks, old blocks] 0/1 matrix: which old block-lines the kept lines of each new block-line come from."""
    kept = torch.arange(length) if kept is None else kept.cpu()
    groups = torch.zeros(-(-max(kept.numel(), 1) // block), -(-length // block), dtype=torch.float64)
    groups[torch.arange(kept.numel()) // block, kept // block] = 1
    return groups


def retile(
    mask: torch.Tensor, block_size: tuple[int, int], shape: tuple[int, int], rows: torch.Tensor | None, cols=None
) -> torch.Tensor:
    """Block mask of the submatrix of kept `rows` and `cols` (None = all), re-tiled from its top-left: a new block
    is kept when any kept weight falls in it."""
    row_groups = _grouping(rows, shape[0], block_size[0])
    col_groups = _grouping(cols, shape[1], block_size[1])
    return (row_groups @ mask.double().cpu() @ col_groups.T > 0).to(torch.uint8)


def _masked_elements(mask: torch.Tensor, block_size: tuple[int, int], shape: tuple[int, int]) -> int:
    """Weights zeroed by a block mask of a `shape` matrix (partial edge blocks count their size)."""
    rows, cols = _line_sizes(shape[0], block_size[0]), _line_sizes(shape[1], block_size[1])
    return int(rows.double() @ (1 - mask.double().cpu()) @ cols.double())


def _removed(kind: str, kinds: tuple[str, ...], gone: torch.Tensor) -> torch.Tensor:
    """Units of `kind` removed: none if the kind is not compacted, else `gone` but the first unit when every
    unit would go (a layer keeps at least one unit)."""
    if kind not in kinds:
        return torch.zeros_like(gone)
    if bool(gone.all()):
        gone = gone.clone()
        gone[0] = False
    return gone


@dataclass
class BlockUnits:
    """Which units of one transformer block the masks empty (`*_dead`: rows/columns; `*_gone`: units removed)."""

    v_dead: torch.Tensor
    o_dead: torch.Tensor
    fc1_dead: torch.Tensor
    fc2_dead: torch.Tensor
    head_gone: torch.Tensor
    qk_gone: torch.Tensor
    v_gone: torch.Tensor
    mlp_gone: torch.Tensor


def removable_units(
    model: PrunedViTPreTrainedModel,
    masks: dict[str, torch.Tensor],
    block_size: tuple[int, int],
    kinds: tuple[str, ...] = COMPACT_KINDS,
) -> tuple[PruningPlan, dict[str, Slice], list[BlockUnits]]:
    """The units `masks` (module name -> block mask; other modules unmasked) let compaction remove from `model`:
    the plan, each block module's kept (rows, cols), and per block the `BlockUnits` (see the module docstring)."""
    unknown = sorted(set(kinds) - set(COMPACT_KINDS))
    if unknown:
        raise ValueError(f"kinds must be a subset of {COMPACT_KINDS}, got {list(kinds)}.")
    vit = base_model(model)
    config = vit.config
    names = {id(module): name for name, module in model.named_modules()}
    plan = PruningPlan.full(config)
    for kind in kinds:
        plan.keep[kind] = []
    slices: dict[str, Slice] = {}
    units = []

    def dead(module: nn.Module, dim: int) -> torch.Tensor:
        mask = masks.get(names[id(module)])
        shape = flat_shape(module)
        if mask is None:
            return torch.zeros(shape[dim], dtype=torch.bool)
        return dead_lines(mask.cpu(), block_size, shape, dim)

    for i, layer in enumerate(vit.layers):
        attn, mlp = layer.attention, layer.mlp
        heads, qk_dim, v_dim = config.heads_per_layer[i], config.qk_head_dims[i], config.v_head_dims[i]
        v_dead, o_dead = dead(attn.v_proj, 0), dead(attn.o_proj, 1)
        pair_gone = (v_dead | o_dead).view(heads, v_dim)
        head_gone = _removed("head", kinds, pair_gone.all(1))
        kept_heads = (~head_gone).nonzero().flatten()
        v_gone = _removed("v", kinds, pair_gone[kept_heads].all(0))
        q_silent = dead(attn.q_proj, 0)
        if attn.q_proj.bias is not None:
            q_silent &= attn.q_proj.bias.detach().cpu() == 0
        qk_pairs = (dead(attn.k_proj, 0) | q_silent).view(heads, qk_dim)
        qk_gone = _removed("qk", kinds, qk_pairs[kept_heads].all(0))
        fc1_dead, fc2_dead = dead(mlp.fc1, 0), dead(mlp.fc2, 1)
        mlp_gone = _removed("mlp", kinds, fc1_dead | fc2_dead)
        units.append(BlockUnits(v_dead, o_dead, fc1_dead, fc2_dead, head_gone, qk_gone, v_gone, mlp_gone))

        keep = {"head": head_gone, "qk": qk_gone, "v": v_gone, "mlp": mlp_gone}
        for kind in kinds:
            plan.keep[kind].append((~keep[kind]).nonzero().flatten().tolist())
        qk_rows = _rows(plan.kept("head", i), plan.kept("qk", i), qk_dim)
        v_rows = _rows(plan.kept("head", i), plan.kept("v", i), v_dim)
        neurons = torch.tensor(plan.kept("mlp", i), dtype=torch.long)
        for module, kept in (
            (attn.q_proj, (qk_rows, None)),
            (attn.k_proj, (qk_rows, None)),
            (attn.v_proj, (v_rows, None)),
            (attn.o_proj, (None, v_rows)),
            (mlp.fc1, (neurons, None)),
            (mlp.fc2, (None, neurons)),
        ):
            slices[names[id(module)]] = kept
    return plan, slices, units


def compacted_cost(
    model: PrunedViTPreTrainedModel,
    masks: dict[str, torch.Tensor],
    block_size: tuple[int, int],
    kinds: tuple[str, ...],
    cost: Callable[[PrunedViTConfig], float],
    metric: str,
) -> float:
    """`cost` ("macs" or "params" of `hf_vitprune.cost`) of the model `compact_block_sparse` would return for
    `masks` on `model`, without building it: the compact config's cost minus the weights its masks zero."""
    plan, slices, _ = removable_units(model, masks, block_size, kinds)
    vit = base_model(model)
    total = cost(pruned_config(vit.config, plan, _channel_indices(vit.config, vit))[0])
    modules = dict(model.named_modules())
    tokens = {name: layer.tokens for layer in lpvit_layers(model) for name, _ in layer.modules}
    for name, mask in masks.items():
        shape = flat_shape(modules[name])
        rows, cols = slices.get(name, (None, None))
        new_shape = (shape[0] if rows is None else rows.numel(), shape[1] if cols is None else cols.numel())
        masked = _masked_elements(retile(mask, block_size, shape, rows, cols), block_size, new_shape)
        total -= masked * (tokens[name] if metric == "macs" else 1)
    return total


@torch.no_grad()
def compact_block_sparse(
    model: PrunedViTPreTrainedModel, kinds: tuple[str, ...] = COMPACT_KINDS
) -> tuple[PrunedViTPreTrainedModel, PruningPlan]:
    """The smaller block-sparse PrunedViT equal to `model` (to float rounding), and the plan of the units removed.

    Args:
        model: a PrunedViT with block masks; it is not modified.
        kinds: unit kinds that may be removed, from `COMPACT_KINDS`.
    """
    masks = block_masks(model)
    if not masks:
        raise ValueError("the model has no block masks: nothing to compact.")
    modules = dict(model.named_modules())
    block_size = modules[next(iter(masks))].block_size
    plan, slices, units = removable_units(model, masks, block_size, kinds)
    work = copy.deepcopy(model)
    remove_block_masks(work)  # folds W * M, so removed rows and columns hold zeros only
    for layer, block in zip(base_model(work).layers, units):
        attn, mlp = layer.attention, layer.mlp
        # constant outputs of removed units go into the next bias: values of emptied v rows, act(b1) of fc1 rows
        pairs = (block.head_gone[:, None] | block.v_gone[None, :]).flatten() & block.v_dead & ~block.o_dead
        if attn.v_proj.bias is not None and pairs.any():
            columns = pairs.nonzero().flatten().to(attn.o_proj.weight.device)
            attn.o_proj.bias += attn.o_proj.weight[:, columns] @ attn.v_proj.bias[columns]
        folded = (block.mlp_gone & block.fc1_dead & ~block.fc2_dead).nonzero().flatten()
        if folded.numel():
            folded = folded.to(mlp.fc2.weight.device)
            mlp.fc2.bias += mlp.fc2.weight[:, folded] @ mlp.activation_fn(mlp.fc1.bias[folded])
    small = compact(work, plan)
    small_modules = dict(small.named_modules())
    for name, mask in masks.items():
        rows, cols = slices.get(name, (None, None))
        new_mask = retile(mask, block_size, flat_shape(modules[name]), rows, cols)
        add_block_mask(small_modules[name], block_size, new_mask)
    record_block_sparsity(small)
    return small, plan

"""NViT's latency-aware group ranking (spec §2.3, §3.2, §4.2): what one unit saves, groups, and the global choice.

A unit's latency-aware score is its saliency minus η times the cost its removal saves (NViT: I_S − η·ΔLat, Eq. 7).
The cost saved is that of one unit at the current dims: for a head of block b, cost(block b with H_b − 1 heads) −
cost(block b); for an embedding channel, the sum of that difference over every block (plus, for the MACs and
params models, the patch embedding and classifiers, which NViT's latency table does not price). As in NViT the
credit is 0 once a layer has no more than one group left (H ≤ 2, QK ≤ 8, V ≤ 8, MLP ≤ 16 on DeiT-B), every
unit of a layer gets the same credit, and pruned units get it too (their saliency is 0).

Within a layer, units are sorted by score and cut into consecutive groups of the kind's size from the lowest; a
group's score is the sum of its units' (spec §2.3: the docstring there says average, the code sums). The last group
of a layer (with any remainder) is never removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...budget import Budget
from ...configuration_pruned_vit import PrunedViTConfig
from ...cost import block_cost, count_macs, count_params
from ...importance import Scores

logger = logging.getLogger(__name__)

#: Position of each per-block kind in a block's dims [embed, heads, qk, v, mlp] (the LatencyTable axes).
_POSITION = {"embed": 0, "head": 1, "qk": 2, "v": 3, "mlp": 4}
Masks = dict[str, list[torch.Tensor]]


@dataclass
class CostModel:
    """A model's cost as the sum over blocks of `block(embed, heads, qk, v, mlp)` plus `rest(hidden_size)` (patch
    embedding, tokens, final norm and classifiers; 0 for NViT's latency table)."""

    block: Callable[[int, int, int, int, int], float]
    rest: Callable[[int], float]
    name: str

    def total(self, geometry: Geometry) -> float:
        return sum(self.block(*dims) for dims in geometry.blocks) + self.rest(geometry.embed)


def analytic_cost_model(config: PrunedViTConfig, metric: str) -> CostModel:
    """MACs or parameters of the blocks (`cost.block_cost`); the rest is taken proportional to the embedding
    width (exact for MACs, up to the classifier biases for parameters)."""
    tokens = config.num_prefix_tokens + config.num_patches
    field = {"macs": 0, "params": 1}[metric]

    def block(embed: int, heads: int, qk: int, v: int, mlp: int) -> float:
        return float(block_cost(tokens, embed, heads, qk, v, mlp, qkv_bias=config.qkv_bias)[field])

    breakdown = (count_macs if metric == "macs" else count_params)(config, by_block=True)
    per_channel = (breakdown.embeddings + breakdown.head) / config.hidden_size
    return CostModel(block, lambda embed: per_channel * embed, metric)


def cost_model_for(budget: Budget, config: PrunedViTConfig) -> CostModel:
    """The cost model of the latency-aware score: the budget's latency table (anything with a `block` method, such
    as `hf_vitprune.latency.LatencyTable`), else the analytic MACs or params. A latency model without per-block
    prices cannot give NViT's credits; MACs are used for the credit then (the target stays the latency)."""
    block = getattr(budget.cost, "block", None)
    if callable(block):
        return CostModel(block, lambda embed: 0.0, "latency table")
    if budget.metric in ("macs", "params"):
        return analytic_cost_model(config, budget.metric)
    logger.warning(
        "latency_model %r has no per-block `block(...)` prices; nvit credits units by MACs saved instead "
        "(use hf_vitprune.latency.LatencyTable for NViT's latency-aware scores).",
        budget.cost,
    )
    return analytic_cost_model(config, "macs")


@dataclass
class Geometry:
    """Current dims: the embedding width and, per block, [residual width read, heads, qk, v, mlp]."""

    embed: int
    blocks: list[list[int]]

    @classmethod
    def from_masks(cls, masks: Masks, channel_index: list[torch.Tensor]) -> Geometry:
        """`masks` holds a boolean mask per layer of every kind in `_POSITION` (all True when not pruned)."""
        embed = masks["embed"][0]
        blocks = []
        for b, index in enumerate(channel_index):
            counts = [int(masks[kind][b].sum()) for kind in ("head", "qk", "v", "mlp")]
            blocks.append([int(embed[index].sum()), *counts])
        return cls(int(embed.sum()), blocks)


def block_credits(cost: CostModel, dims: list[int], group_sizes: dict[str, int]) -> dict[str, float]:
    """Cost saved by removing one unit of each kind from one block (for "embed": this block's share). 0 when the
    layer has at most one group left, as NViT's guards."""
    base = cost.block(*dims)
    credits = {}
    for kind, position in _POSITION.items():
        limit = 1 if kind == "embed" else group_sizes[kind]
        if dims[position] > limit:
            fewer = list(dims)
            fewer[position] -= 1
            credits[kind] = base - cost.block(*fewer)
        else:
            credits[kind] = 0.0
    return credits


def embed_credit(cost: CostModel, geometry: Geometry, shares: list[float], group_size: int) -> float:
    """Cost saved by one embedding channel: every block's share plus the rest of the model."""
    if geometry.embed <= group_size:
        return 0.0
    return sum(shares) + cost.rest(geometry.embed) - cost.rest(geometry.embed - 1)


def unit_credits(
    cost: CostModel, geometry: Geometry, group_sizes: dict[str, int], kinds: tuple[str, ...]
) -> dict[tuple[str, int], float]:
    """Cost saved by removing one unit of every layer of `kinds`, at `geometry`."""
    per_block = [block_credits(cost, dims, group_sizes) for dims in geometry.blocks]
    credits = {(kind, b): c[kind] for kind in kinds if kind != "embed" for b, c in enumerate(per_block)}
    if "embed" in kinds:
        credits[("embed", 0)] = embed_credit(cost, geometry, [c["embed"] for c in per_block], group_sizes["embed"])
    return credits


def layer_groups(scores: torch.Tensor, mask: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Units of a layer in group order (pruned units first, then ascending score) and the removable groups' score
    sums (all but the last group)."""
    key = scores.double().masked_fill(~mask, float("-inf"))
    order = torch.argsort(key, stable=True)
    n = (scores.numel() - 1) // group_size
    return order, scores.double()[order][: n * group_size].view(n, group_size).sum(1)


def pruning_step(
    saliency: Scores,
    masks: Masks,
    credits: dict[tuple[str, int], float],
    group_sizes: dict[str, int],
    count: int,
    cumulative: bool,
) -> tuple[Masks, int]:
    """One NViT pruning step: new masks and the number of groups newly removed.

    Unit score = saliency x mask − credit (credits already multiplied by η / dense cost). With `cumulative`
    (NViT's code) every group of every layer, already-pruned ones included, is ranked and all groups scoring at
    most the `count`-th lowest are removed: `count` = groups_per_step x t at step t, so about groups_per_step new
    groups per step but not exactly (a pruned group can outrank an active one). Otherwise exactly the `count`
    lowest *active* groups go.
    """
    candidates = []
    for position, (kind, layer) in enumerate(credits):
        mask = masks[kind][layer]
        scores = saliency[kind][layer].double() * mask - credits[(kind, layer)]
        order, group_scores = layer_groups(scores, mask, group_sizes[kind])
        size = group_sizes[kind]
        for index, value in enumerate(group_scores.tolist()):
            units = order[index * size : (index + 1) * size]
            candidates.append((value, position, index, kind, layer, units, bool(mask[units].any())))
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    if cumulative:
        if not candidates:
            return masks, 0
        threshold = candidates[min(max(count, 1), len(candidates)) - 1][0]
        chosen = [c for c in candidates if c[0] <= threshold]
    else:
        chosen = [c for c in candidates if c[6]][:count]
    new_masks = {kind: [m.clone() for m in layers] for kind, layers in masks.items()}
    for *_, kind, layer, units, _active in chosen:
        new_masks[kind][layer][units] = False
    return new_masks, sum(c[6] for c in chosen)


def greedy_sequence(
    saliency: Scores,
    sizes: dict[str, list[int]],
    channel_index: list[torch.Tensor],
    group_sizes: dict[str, int],
    kinds: tuple[str, ...],
    cost: CostModel,
    eta: float,
    removable: Callable[[str, int], int],
) -> tuple[dict[tuple[str, int], torch.Tensor], list[tuple[str, int]]]:
    """NViT's schedule with fixed saliency and one group per step: repeatedly remove the group of lowest
    latency-aware score, re-pricing units at the new dims, until nothing is removable.

    Returns each layer's unit order (ascending saliency) and the sequence of layers a group was removed from; the
    first k entries give the plan after k steps (`Selector.plan`).
    """
    layers = [(kind, layer) for kind in kinds for layer in range(len(sizes[kind]))]
    order, group_sums = {}, {}
    for kind, layer in layers:
        score = saliency[kind][layer].detach().double().cpu()
        order[(kind, layer)] = torch.argsort(score, stable=True)
        n, size = removable(kind, layer), group_sizes[kind]
        group_sums[(kind, layer)] = score[order[(kind, layer)]][: n * size].view(n, size).sum(1).tolist()
    embed_mask = torch.ones(sizes["embed"][0], dtype=torch.bool)
    masks = {kind: [torch.ones(n, dtype=torch.bool) for n in sizes[kind]] for kind in _POSITION}
    masks["embed"] = [embed_mask]
    geometry = Geometry.from_masks(masks, channel_index)
    shares = [block_credits(cost, dims, group_sizes) for dims in geometry.blocks]
    removed = dict.fromkeys(layers, 0)
    sequence = []
    while True:
        best = None
        for position, key in enumerate(layers):
            kind, layer = key
            step = removed[key]
            if step >= len(group_sums[key]):
                continue
            if kind == "embed":
                credit = embed_credit(cost, geometry, [s["embed"] for s in shares], group_sizes["embed"])
            else:
                credit = shares[layer][kind]
            value = group_sums[key][step] - eta * group_sizes[kind] * credit
            if best is None or (value, position) < best[:2]:
                best = (value, position, key)
        if best is None:
            return order, sequence
        kind, layer = key = best[2]
        removed[key] += 1
        sequence.append(key)
        if kind == "embed":
            embed_mask[order[key][(removed[key] - 1) * group_sizes[kind] : removed[key] * group_sizes[kind]]] = False
            geometry.embed = int(embed_mask.sum())
            for b, index in enumerate(channel_index):
                geometry.blocks[b][0] = int(embed_mask[index].sum())
            changed = range(len(geometry.blocks))
        else:
            geometry.blocks[layer][_POSITION[kind]] -= group_sizes[kind]
            changed = [layer]
        for b in changed:
            shares[b] = block_credits(cost, geometry.blocks[b], group_sizes)

"""Prunable units of a PrunedViT, pruning plans, masks on the gates, and exact compaction.

Every kind of unit is addressed the same way: a kind has a list of *layers* (one per block, or a single layer for
the global embedding), and a layer has a number of units. A `PruningPlan` keeps, per kind and layer, the sorted
indices of the units that stay. It is applied either as 0/1 masks on the model's gates (for training with masks,
and for scoring) or by compaction into a smaller PrunedViT that computes exactly what the masked model computes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration_pruned_vit import PrunedViTConfig
from .modeling_pruned_vit import PrunedViTModel, PrunedViTPreTrainedModel

#: kind -> (what one unit is, config attribute giving the per-layer unit count).
UNIT_KINDS: dict[str, tuple[str, str | None]] = {
    "embed": ("residual (embedding) channel shared by all blocks", None),
    "channel": ("residual channel read and written by one block", "block_dim"),
    "head": ("attention head", "num_attention_heads"),
    "qk": ("query/key index, the same in every head of a block", "qk_head_dim"),
    "v": ("value index, the same in every head of a block", "v_head_dim"),
    "mlp": ("MLP hidden neuron", "intermediate_size"),
}
KINDS = tuple(UNIT_KINDS)


def check_kinds(kinds: list[str] | tuple[str, ...], argument: str = "kinds") -> tuple[str, ...]:
    """Validate a list of unit kinds, with a clear error naming `argument` and the allowed values."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in UNIT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"{argument} must be a non-empty subset of {KINDS}, got {list(kinds)}.")
    return tuple(kinds)


def unit_counts(config: PrunedViTConfig) -> dict[str, list[int]]:
    """Number of units per layer for every kind (`embed` has one layer)."""
    counts = {"embed": [config.hidden_size]}
    for kind, (_, attribute) in UNIT_KINDS.items():
        if attribute is not None:
            counts[kind] = config.layer_values(attribute)
    return counts


def base_model(model: nn.Module) -> PrunedViTModel:
    """The PrunedViTModel inside any PrunedViT class (or the model itself)."""
    if isinstance(model, PrunedViTModel):
        return model
    if isinstance(model, PrunedViTPreTrainedModel) and isinstance(getattr(model, "vit", None), PrunedViTModel):
        return model.vit
    raise TypeError(f"expected a PrunedViT model, got {type(model).__name__}; convert it with to_pruned_vit first.")


def gate_owners(model: nn.Module, kind: str) -> list[tuple[nn.Module, str]]:
    """(module, buffer name) of the gate of every layer of `kind`."""
    vit = base_model(model)
    if kind == "embed":
        return [(vit, "embed_gate")]
    owners = {
        "channel": lambda layer: (layer, "channel_gate"),
        "head": lambda layer: (layer.attention, "head_gate"),
        "qk": lambda layer: (layer.attention, "qk_gate"),
        "v": lambda layer: (layer.attention, "v_gate"),
        "mlp": lambda layer: (layer.mlp, "neuron_gate"),
    }[kind]
    return [owners(layer) for layer in vit.layers]


def _parameter_like(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def enable_gates(model: nn.Module, kinds: tuple[str, ...] = KINDS, requires_grad: bool = True) -> dict:
    """Put gates on every layer of `kinds` and return them as {kind: [tensor per layer]}.

    A gate starts at the layer's current mask when one is applied (`apply_masks`), else at ones. The gates are
    leaf tensors on the model's device; after a backward pass their `.grad` holds dL/dg, the raw material of
    Taylor and Fisher scores. Remove them with `remove_gates` (which also removes masks: re-apply them after).
    """
    reference = _parameter_like(model)
    counts = unit_counts(base_model(model).config)
    gates: dict[str, list[torch.Tensor]] = {}
    for kind in check_kinds(kinds):
        gates[kind] = []
        for (module, name), size in zip(gate_owners(model, kind), counts[kind]):
            current = getattr(module, name)
            start = torch.ones(size) if current is None else current.detach()
            gate = start.to(device=reference.device, dtype=reference.dtype).clone().requires_grad_(requires_grad)
            setattr(module, name, gate)
            gates[kind].append(gate)
    return gates


def remove_gates(model: nn.Module) -> None:
    """Back to the plain forward: every gate set to None."""
    for kind in KINDS:
        for module, name in gate_owners(model, kind):
            setattr(module, name, None)


def write_json_atomically(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to a temporary file beside `path`, then rename it: `path` is never half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass
class PruningPlan:
    """Kept unit indices per kind and layer: `keep[kind][layer]` is a sorted list of indices.

    Kinds absent from `keep` are kept whole. `sizes[kind][layer]` records the unit counts of the model the plan
    was made for, so a plan is checked against the model it is applied to.
    """

    sizes: dict[str, list[int]]
    keep: dict[str, list[list[int]]] = field(default_factory=dict)

    @classmethod
    def full(cls, config: PrunedViTConfig) -> PruningPlan:
        """The plan that keeps everything."""
        return cls(sizes=unit_counts(config))

    @classmethod
    def from_masks(cls, config: PrunedViTConfig, masks: dict[str, list[torch.Tensor]]) -> PruningPlan:
        """A plan from boolean (or 0/1) masks per kind and layer."""
        plan = cls.full(config)
        for kind, layers in masks.items():
            plan.keep[kind] = [torch.nonzero(torch.as_tensor(m)).flatten().tolist() for m in layers]
        plan.validate(config)
        return plan

    def kept(self, kind: str, layer: int) -> list[int]:
        """Kept indices of one layer (all of them when the kind is not pruned)."""
        if kind in self.keep:
            return self.keep[kind][layer]
        return list(range(self.sizes[kind][layer]))

    def num_kept(self, kind: str) -> list[int]:
        return [len(self.kept(kind, layer)) for layer in range(len(self.sizes[kind]))]

    def mask(self, kind: str, layer: int) -> torch.Tensor:
        """Boolean mask of one layer."""
        mask = torch.zeros(self.sizes[kind][layer], dtype=torch.bool)
        mask[self.kept(kind, layer)] = True
        return mask

    def is_full(self) -> bool:
        return all(self.num_kept(kind) == self.sizes[kind] for kind in self.sizes)

    def validate(self, config: PrunedViTConfig, channel_index: list[torch.Tensor] | None = None) -> None:
        """Check that the plan fits `config`: sizes, index ranges, sorted unique indices, at least one unit kept
        per layer, and at least one residual channel left in every block (whose channels are `channel_index`)."""
        if self.sizes != unit_counts(config):
            raise ValueError(f"plan was made for unit counts {self.sizes}, the model has {unit_counts(config)}.")
        for kind, layers in self.keep.items():
            check_kinds([kind], "plan kind")
            if len(layers) != len(self.sizes[kind]):
                raise ValueError(f"plan has {len(layers)} layers of {kind!r}, the model has {len(self.sizes[kind])}.")
            for layer, (indices, size) in enumerate(zip(layers, self.sizes[kind])):
                if not indices:
                    raise ValueError(f"plan removes every {kind!r} unit of layer {layer}; at least one must stay.")
                if list(indices) != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= size:
                    raise ValueError(f"plan indices of {kind!r} layer {layer} must be sorted, unique, in [0, {size}).")
        embed = set(self.kept("embed", 0))
        for i, index in enumerate(channel_index or _channel_indices(config)):
            if not any(int(index[j]) in embed for j in self.kept("channel", i)):
                raise ValueError(f"plan leaves block {i} with no residual channel (channel and embed pruning).")

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "keep": self.keep}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        return cls(sizes={k: list(v) for k, v in data["sizes"].items()}, keep={k: v for k, v in data["keep"].items()})

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON (through a temporary file, so a crash never leaves half a plan)."""
        write_json_atomically(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def apply_masks(model: nn.Module, plan: PruningPlan) -> None:
    """Set every gate to the plan's 0/1 mask (no gradient), so the model computes the pruned function."""
    vit = base_model(model)
    plan.validate(vit.config, _channel_indices(vit.config, vit))
    reference = _parameter_like(model)
    for kind in KINDS:
        for layer, (module, name) in enumerate(gate_owners(model, kind)):
            mask = plan.mask(kind, layer).to(device=reference.device, dtype=reference.dtype)
            setattr(module, name, None if bool(mask.all()) else mask)


def _channel_indices(config: PrunedViTConfig, model: PrunedViTModel | None = None) -> list[torch.Tensor]:
    """Residual channels read by each block (the identity when the block reads them all)."""
    indices = []
    for i, dim in enumerate(config.block_dims):
        index = model.layers[i].channel_index if model is not None else None
        indices.append(index.cpu() if index is not None else torch.arange(dim))
    return indices


def pruned_config(config: PrunedViTConfig, plan: PruningPlan, channel_index: list[torch.Tensor] | None = None):
    """The config of the compact model; also returns, per block, the kept block positions and the new
    channel_index (positions in the kept residual channels)."""
    channel_index = channel_index if channel_index is not None else _channel_indices(config)
    plan.validate(config, channel_index)
    embed = plan.kept("embed", 0)
    new_position = {c: p for p, c in enumerate(embed)}
    block_positions, new_index = [], []
    for i, index in enumerate(channel_index):
        positions = [j for j in plan.kept("channel", i) if int(index[j]) in new_position]
        block_positions.append(positions)
        new_index.append(torch.tensor([new_position[int(index[j])] for j in positions], dtype=torch.long))
    values = config.to_dict()
    values.pop("per_layer_config", None)
    values.update(
        hidden_size=len(embed),
        num_attention_heads=plan.num_kept("head"),
        qk_head_dim=plan.num_kept("qk"),
        v_head_dim=plan.num_kept("v"),
        intermediate_size=plan.num_kept("mlp"),
        block_dim=[len(p) for p in block_positions],
        attention_scale=config.attention_scales,
    )
    return type(config)(**values), block_positions, new_index


def _rows(heads: list[int], dims: list[int], head_dim: int) -> torch.Tensor:
    """Head-major rows of a q/k/v projection for kept heads x kept per-head indices."""
    return torch.tensor([h * head_dim + j for h in heads for j in dims], dtype=torch.long)


def _sliced_state_dict(model: PrunedViTPreTrainedModel, plan: PruningPlan, block_positions, new_index) -> dict:
    config = base_model(model).config
    prefix = "" if isinstance(model, PrunedViTModel) else f"{model.base_model_prefix}."
    embed = torch.tensor(plan.kept("embed", 0), dtype=torch.long)
    state = dict(model.state_dict())

    def take(name: str, index: torch.Tensor, dim: int) -> None:
        state[name] = state[name].index_select(dim, index.to(state[name].device))

    emb = f"{prefix}embeddings."
    for name in ("cls_token", "distillation_token", "position_embeddings"):
        if f"{emb}{name}" in state:
            take(f"{emb}{name}", embed, -1)
    take(f"{emb}patch_embeddings.projection.weight", embed, 0)
    take(f"{emb}patch_embeddings.projection.bias", embed, 0)
    for name in ("layernorm.weight", "layernorm.bias"):
        take(f"{prefix}{name}", embed, 0)
    if f"{prefix}pooler.dense.weight" in state:
        take(f"{prefix}pooler.dense.weight", embed, 1)
    for head in ("classifier", "cls_classifier", "distillation_classifier"):
        if f"{head}.weight" in state:
            take(f"{head}.weight", embed, 1)

    for i in range(config.num_hidden_layers):
        layer = f"{prefix}layers.{i}."
        heads = plan.kept("head", i)
        qk_rows = _rows(heads, plan.kept("qk", i), config.qk_head_dims[i])
        v_rows = _rows(heads, plan.kept("v", i), config.v_head_dims[i])
        mlp = torch.tensor(plan.kept("mlp", i), dtype=torch.long)
        columns = torch.tensor(block_positions[i], dtype=torch.long)
        for norm in ("layernorm_before", "layernorm_after"):
            take(f"{layer}{norm}.weight", embed, 0)
            take(f"{layer}{norm}.bias", embed, 0)
        for proj, rows in (("q_proj", qk_rows), ("k_proj", qk_rows), ("v_proj", v_rows)):
            take(f"{layer}attention.{proj}.weight", rows, 0)
            take(f"{layer}attention.{proj}.weight", columns, 1)
            if f"{layer}attention.{proj}.bias" in state:
                take(f"{layer}attention.{proj}.bias", rows, 0)
        take(f"{layer}attention.o_proj.weight", v_rows, 1)
        take(f"{layer}attention.o_proj.weight", columns, 0)
        take(f"{layer}attention.o_proj.bias", columns, 0)
        take(f"{layer}mlp.fc1.weight", mlp, 0)
        take(f"{layer}mlp.fc1.weight", columns, 1)
        take(f"{layer}mlp.fc1.bias", mlp, 0)
        take(f"{layer}mlp.fc2.weight", mlp, 1)
        take(f"{layer}mlp.fc2.weight", columns, 0)
        take(f"{layer}mlp.fc2.bias", columns, 0)
        state.pop(f"{layer}channel_index", None)
        if len(new_index[i]) < len(embed):
            state[f"{layer}channel_index"] = new_index[i]
    return state


def compact(model: PrunedViTPreTrainedModel, plan: PruningPlan) -> PrunedViTPreTrainedModel:
    """Build the smaller PrunedViT that keeps only the plan's units, with the same class, device and dtype.

    The result computes exactly what `model` computes with `apply_masks(model, plan)` (LayerNorm statistics of
    the masked model are taken over active channels, so no fine-tuning is needed to close a gap). `model` is not
    modified; its gates are ignored.
    """
    vit = base_model(model)
    config, block_positions, new_index = pruned_config(vit.config, plan, _channel_indices(vit.config, vit))
    state = _sliced_state_dict(model, plan, block_positions, new_index)
    kwargs = {"add_pooling_layer": vit.pooler is not None} if isinstance(model, PrunedViTModel) else {}
    with torch.device("meta"):
        pruned = type(model)(config, **kwargs)
    pruned.load_state_dict(state, strict=True, assign=True)
    pruned.config._attn_implementation = model.config._attn_implementation
    for name in ("image_processor",):
        if hasattr(model, name):
            setattr(pruned, name, getattr(model, name))
    return pruned.train(model.training)

"""LPViT's saved mask files on a DeiT or ViT: a block-sparse PrunedViT computing the masked model.

The official pruning script saves only masks (spec §5.1): a `torch.save` dict `"<timm module>.weight_mask"` ->
float {0, 1} tensor of the weight's shape (4-D for the patch convolution), constant on every b0 x b1 tile of the
weight's (out, in * kh * kw) view, for `patch_embed.proj`, `blocks.{i}.attn.qkv` (Q, K, V stacked row-wise),
`blocks.{i}.attn.proj`, `blocks.{i}.mlp.fc1`, `blocks.{i}.mlp.fc2`, `head` and `head_dist`. The weights to mask are
the dense pretrained ones. Keys may also name PrunedViT modules directly (`vit.layers.0.mlp.fc1.weight_mask`).

Files are read with `torch.load(weights_only=True)` (and the restricted placeholder fallback of
`convert.savit.load_checkpoint`), or as safetensors: no pickled code ever runs.
"""

from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..methods.lpvit.config import LPViTConfig, check_block_size
from ..methods.lpvit.masks import apply_block_masks, flat_shape, reblock
from ..modeling_pruned_vit import PrunedViTPreTrainedModel, expand_block_mask
from ..structure import base_model
from .savit import load_checkpoint

SUFFIX = ".weight_mask"


def _load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    masks = load_file(str(path)) if str(path).endswith(".safetensors") else load_checkpoint(path)
    if not isinstance(masks, dict) or not all(isinstance(v, torch.Tensor) for v in masks.values()):
        raise ValueError(f"{str(path)!r} is not an LPViT mask file: expected a dict of '<module>{SUFFIX}' tensors.")
    if masks and all(key.startswith("module.") for key in masks):  # saved from a DDP-wrapped model
        masks = {key[len("module.") :]: value for key, value in masks.items()}
    wrong = [key for key in masks if not key.endswith(SUFFIX)]
    if wrong:
        raise ValueError(f"{str(path)!r} has keys that are not masks (no '{SUFFIX}' suffix): {wrong[:5]}.")
    return {key[: -len(SUFFIX)]: value for key, value in masks.items()}


def _timm_modules(model: PrunedViTPreTrainedModel) -> dict[str, list[nn.Module]]:
    """timm module name -> the PrunedViT modules its weight is made of (q, k, v for the fused qkv, row-wise)."""
    vit = base_model(model)
    modules = {"patch_embed.proj": [vit.embeddings.patch_embeddings.projection]}
    for i, layer in enumerate(vit.layers):
        attn = layer.attention
        modules[f"blocks.{i}.attn.qkv"] = [attn.q_proj, attn.k_proj, attn.v_proj]
        modules[f"blocks.{i}.attn.proj"] = [attn.o_proj]
        modules[f"blocks.{i}.mlp.fc1"] = [layer.mlp.fc1]
        modules[f"blocks.{i}.mlp.fc2"] = [layer.mlp.fc2]
    heads = {"head": ("classifier", "cls_classifier"), "head_dist": ("distillation_classifier",)}
    for timm_name, names in heads.items():
        for name in names:
            if isinstance(getattr(model, name, None), nn.Linear):
                modules[timm_name] = [getattr(model, name)]
    return modules


def _infer_block_size(path: str | os.PathLike, masks: list[torch.Tensor], default: tuple[int, int]) -> tuple[int, int]:
    """The block size in the file name (`..._block32x64_...`), else the coarsest tiling every mask is constant on
    (the gcd of the positions where consecutive rows / columns differ; `default` along a dimension with none)."""
    found = re.search(r"block(\d+)x(\d+)", os.path.basename(str(path)))
    if found:
        return int(found.group(1)), int(found.group(2))
    size = []
    for dim in (0, 1):
        step = 0
        for mask in masks:
            lines = mask if dim == 0 else mask.T
            changes = (lines[1:] != lines[:-1]).any(1).nonzero().flatten() + 1
            for position in changes.tolist():
                step = math.gcd(step, position)
        size.append(step or default[dim])
    return size[0], size[1]


@torch.no_grad()
def from_lpvit_masks(
    mask_path: str | os.PathLike,
    model: nn.Module,
    block_size: int | tuple[int, int] | None = None,
    image_processor: Any = None,
) -> PrunedViTPreTrainedModel:
    """A block-sparse PrunedViT: `model` converted (`to_pruned_vit`) with LPViT's masks as persistent block masks.

    Args:
        mask_path: LPViT's `.pt` mask file (or a `.safetensors` file with the same keys).
        model: the dense model the masks were made for: a timm DeiT/ViT, a transformers ViT/DeiT or a PrunedViT
            (not modified).
        block_size: (rows, cols) or an int; by default read from the file name, else inferred from the masks.
        image_processor: passed to `to_pruned_vit`.

    Raises:
        ValueError: unknown module names, masks of the wrong shape, values other than 0/1, or masks that are not
            constant on the blocks (e.g. a Q/K/V boundary inside a block).
    """
    from . import to_pruned_vit  # the package imports this module

    masks = _load_masks(mask_path)
    if isinstance(model, PrunedViTPreTrainedModel):
        pruned = copy.deepcopy(model)
        if image_processor is not None:
            pruned.image_processor = image_processor
    else:
        pruned = to_pruned_vit(model, image_processor)
    timm_modules = _timm_modules(pruned)
    own_modules = dict(pruned.named_modules())
    targets: dict[str, list[nn.Module]] = {}
    for name in masks:
        if name in timm_modules:
            targets[name] = timm_modules[name]
        elif isinstance(own_modules.get(name), (nn.Linear, nn.Conv2d)):
            targets[name] = [own_modules[name]]
    unknown = sorted(set(masks) - set(targets))
    if unknown:
        raise ValueError(f"masks for modules the model does not have: {unknown[:5]}.")
    flat = {}
    for name, modules in targets.items():
        shape = (sum(m.weight.shape[0] for m in modules), *modules[0].weight.shape[1:])
        mask = masks[name]
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask {name}{SUFFIX} has shape {list(mask.shape)}, the weight {list(shape)}.")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask {name}{SUFFIX} has values other than 0 and 1.")
        flat[name] = mask.reshape(shape[0], -1).bool()
    if block_size is not None:
        size = check_block_size(block_size)
    else:
        default = LPViTConfig().resolved_block_size(base_model(pruned).config.hidden_size)
        size = _infer_block_size(mask_path, list(flat.values()), default)

    names = {id(module): module_name for module_name, module in pruned.named_modules()}
    block_masks = {}
    for name, modules in targets.items():
        start = 0
        for module in modules:
            rows = module.weight.shape[0]
            part = flat[name][start : start + rows]
            start += rows
            blocks = reblock(part, size)
            if not torch.equal(expand_block_mask(blocks, size, flat_shape(module)).bool(), part):
                raise ValueError(
                    f"mask {name}{SUFFIX} is not constant on {size[0]}x{size[1]} blocks of {names[id(module)]} "
                    "(wrong block_size, or a block straddling Q/K/V)."
                )
            block_masks[names[id(module)]] = blocks
    apply_block_masks(pruned, block_masks, size)
    return pruned


__all__ = ["from_lpvit_masks"]

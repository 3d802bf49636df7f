"""Block masks on a PrunedViT: which modules form an LPViT layer, block geometry, and masks that persist.

A mask is the persistent uint8 buffer `weight_block_mask` [ceil(rows / b0), ceil(cols / b1)] of an nn.Linear or
nn.Conv2d (`modeling_pruned_vit.add_block_mask`); the module then computes with `W * M` in every forward, like the
original's masked layers. `config.block_sparsity` records the block size and the masked modules, so the model
rebuilds its mask buffers at construction and `from_pretrained` (native or `trust_remote_code`) restores them.
Applying masks also zeroes the masked weights in place (`W <- W * M`), so the weights on disk are the pruned ones
and any ViT loader that ignores the masks still computes the pruned function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...modeling_pruned_vit import (
    _BLOCK_MASKED_CLASSES,
    BLOCK_MASK_BUFFER,
    PrunedViTModel,
    PrunedViTPreTrainedModel,
    add_block_mask,
    block_masked_weight,
    expand_block_mask,
)
from ...structure import base_model
from .config import LAYER_TYPES, check_block_size


@dataclass
class LPViTLayer:
    """One LPViT layer: the modules whose weight blocks are ranked and allocated together.

    `modules` are (name in the model, module): q_proj, k_proj and v_proj for the fused "qkv" layer (the fused
    weight stacks them row-wise, and each is tiled on its own, so blocks never straddle Q/K/V), else one module.
    `tokens` is how often the layer runs per image (its MACs are kept weights x tokens); `d_in` is the input width
    of the power proxy (for the patch convolution the input height, as the original's hook reads it).
    """

    name: str
    type: str
    modules: list[tuple[str, nn.Module]]
    tokens: int
    d_in: int

    @property
    def numel(self) -> int:
        return sum(module.weight.numel() for _, module in self.modules)

    def num_blocks(self, block_size: tuple[int, int]) -> int:
        return sum(math.prod(grid_shape(flat_shape(module), block_size)) for _, module in self.modules)


def lpvit_layers(model: nn.Module, layer_types: tuple[str, ...] = LAYER_TYPES) -> list[LPViTLayer]:
    """The LPViT layers of a PrunedViT in timm's registration order: patch embedding, then per block qkv, o_proj,
    fc1, fc2, then the classifier(s); only the types in `layer_types`."""
    vit = base_model(model)
    config = vit.config
    names = {id(module): name for name, module in model.named_modules()}
    tokens = config.num_prefix_tokens + config.num_patches

    def layer(name: str, kind: str, modules: list[nn.Module], count: int, d_in: int) -> LPViTLayer:
        return LPViTLayer(name, kind, [(names[id(m)], m) for m in modules], count, d_in)

    layers = []
    if "patch_embed" in layer_types:
        projection = vit.embeddings.patch_embeddings.projection
        layers.append(layer("patch_embed", "patch_embed", [projection], config.num_patches, config.image_size))
    for i, block in enumerate(vit.layers):
        attn, mlp = block.attention, block.mlp
        members = {
            "qkv": [attn.q_proj, attn.k_proj, attn.v_proj],
            "o_proj": [attn.o_proj],
            "fc1": [mlp.fc1],
            "fc2": [mlp.fc2],
        }
        for kind, modules in members.items():
            if kind in layer_types:
                layers.append(layer(f"layers.{i}.{kind}", kind, modules, tokens, modules[0].in_features))
    if "head" in layer_types and not isinstance(model, PrunedViTModel):
        for name in ("classifier", "cls_classifier", "distillation_classifier"):
            head = getattr(model, name, None)
            if isinstance(head, nn.Linear):
                layers.append(layer(name, "head", [head], 1, head.in_features))
    return layers


def flat_shape(module: nn.Module) -> tuple[int, int]:
    """The 2-D (out, in * kh * kw) shape a weight is tiled on."""
    return module.weight.shape[0], module.weight[0].numel()


def grid_shape(shape: tuple[int, int], block_size: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block_size[0]), -(-shape[1] // block_size[1])


def block_sums(matrix: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Sum of a 2-D tensor over each block (zero-padded to whole blocks, so partial blocks sum what they hold)."""
    rows, cols = grid_shape(tuple(matrix.shape), block_size)
    padded = F.pad(matrix, (0, cols * block_size[1] - matrix.shape[1], 0, rows * block_size[0] - matrix.shape[0]))
    return padded.view(rows, block_size[0], cols, block_size[1]).sum((1, 3))


def block_counts(shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """Number of weights in each block of a `shape` matrix (smaller for partial edge blocks)."""
    return block_sums(torch.ones(shape, dtype=torch.float64), block_size)


def reblock(element_mask: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Block mask of an element mask: a block is kept when any of its elements is."""
    return (block_sums(element_mask.double(), block_size) > 0).to(torch.uint8)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules carrying a block mask, by name."""
    return {name: m for name, m in model.named_modules() if getattr(m, BLOCK_MASK_BUFFER, None) is not None}


def block_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The block masks of a model, by module name (uint8 [ceil(rows / b0), ceil(cols / b1)], 1 = kept)."""
    return {name: getattr(m, BLOCK_MASK_BUFFER) for name, m in masked_modules(model).items()}


@torch.no_grad()
def fold_block_masks(model: nn.Module) -> None:
    """Zero the masked weights in place (`W <- W * M`): the function is unchanged, the stored weights are pruned."""
    for module in masked_modules(model).values():
        module.weight.copy_(block_masked_weight(module))


def _target_name(name: str, model: nn.Module) -> str:
    """Module name relative to the base PrunedViTModel for encoder modules ("layers.0.mlp.fc1"), so that the
    suffix match of `config.block_sparsity` finds it in the classification model and in `AutoModel` alike."""
    prefix = f"{model.base_model_prefix}."
    return name[len(prefix) :] if not isinstance(model, PrunedViTModel) and name.startswith(prefix) else name


def record_block_sparsity(model: PrunedViTPreTrainedModel) -> None:
    """Write `config.block_sparsity` (block size, masked modules) from the model's masks; None when it has none."""
    modules = masked_modules(model)
    sizes = {module.block_size for module in modules.values()}
    if len(sizes) > 1:
        raise ValueError(f"all block masks of a model must share one block size, found {sorted(sizes)}.")
    model.config.block_sparsity = (
        {"block_size": list(sizes.pop()), "target_modules": sorted(_target_name(n, model) for n in modules)}
        if modules
        else None
    )


@torch.no_grad()
def apply_block_masks(
    model: PrunedViTPreTrainedModel, masks: dict[str, torch.Tensor], block_size: int | tuple[int, int]
) -> None:
    """Put block masks (module name -> [ceil(rows / b0), ceil(cols / b1)], nonzero = kept) on a PrunedViT in place,
    zero the masked weights and record them in `config.block_sparsity`."""
    block_size = check_block_size(block_size)
    modules = dict(model.named_modules())
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise ValueError(f"masks name modules the model does not have: {unknown[:5]}.")
    for name, mask in masks.items():
        module = modules[name]
        mask = (torch.as_tensor(mask) != 0).to(torch.uint8)
        if getattr(module, BLOCK_MASK_BUFFER, None) is not None:
            if module.block_size != block_size:
                raise ValueError(f"{name} already has {module.block_size} blocks, not {block_size}.")
            if tuple(mask.shape) != grid_shape(flat_shape(module), block_size):
                raise ValueError(f"{name} needs a {grid_shape(flat_shape(module), block_size)} mask.")
            getattr(module, BLOCK_MASK_BUFFER).copy_(mask)
        else:
            add_block_mask(module, block_size, mask)
        module.weight.copy_(block_masked_weight(module))
    record_block_sparsity(model)


@torch.no_grad()
def remove_block_masks(model: PrunedViTPreTrainedModel) -> None:
    """Fold every block mask into its weight and drop it: a plain PrunedViT computing the same function."""
    for module in masked_modules(model).values():
        module.weight.copy_(block_masked_weight(module))
        del module._buffers[BLOCK_MASK_BUFFER]
        del module.block_size
        module.__class__ = next(base for base, masked in _BLOCK_MASKED_CLASSES.items() if type(module) is masked)
    if isinstance(model, PrunedViTPreTrainedModel):
        model.config.block_sparsity = None


def element_mask(module: nn.Module) -> torch.Tensor:
    """Boolean (out, in * kh * kw) mask of a module's weights (all True without a block mask)."""
    mask = getattr(module, BLOCK_MASK_BUFFER, None)
    if mask is None:
        return torch.ones(flat_shape(module), dtype=torch.bool, device=module.weight.device)
    return expand_block_mask(mask, module.block_size, flat_shape(module)).bool()


def masked_fraction(model: nn.Module) -> float:
    """Fraction of the weights of the block-masked modules that their masks zero (0.0 without masks)."""
    total = masked = 0
    for module in masked_modules(model).values():
        mask = element_mask(module)
        total += mask.numel()
        masked += int((~mask).sum())
    return masked / total if total else 0.0


@dataclass
class BlockMaskPlan:
    """What LPViT selected: block masks by module name (uint8, 1 = kept) in `block_size` blocks, and the block
    sparsity allocated to each LPViT layer (`sparsity`, by layer name, e.g. "layers.0.fc1")."""

    block_size: tuple[int, int]
    masks: dict[str, torch.Tensor]
    sparsity: dict[str, float] = field(default_factory=dict)

    def apply(self, model: PrunedViTPreTrainedModel) -> None:
        """Put the masks on `model` (the model they were selected for, or a copy) in place."""
        apply_block_masks(model, self.masks, self.block_size)

"""SAViT's masked checkpoints to compact PrunedViT.

SAViT's pruning run saves `checkpoint_pruned_00.pth` = {"model": state dict of the gated timm-0.4.9 DeiT}: the
original weights, unchanged, plus 0/1 gates (spec §6.2): `blocks.i.attn.attn_gate.weight` [H],
`blocks.i.mlp.hidden_gate1.weight` [4D], and one shared `res_gate.weight` [D] that `state_dict` repeats under
every block. `from_savit_checkpoint` builds the dense PrunedViT from the weights, turns the gates into a
`PruningPlan` and compacts it, which slices exactly as SAViT's `main_deploy.py` does, without its hard-coded
head dim 64, 197 tokens and 1000 classes (all read from the shapes here).

The compact model equals SAViT's deployed model, whose LayerNorms normalise over the kept channels. It differs
from SAViT's *masked* model when embedding channels are pruned: there LayerNorm statistics ran over all channels
(pruned ones at zero) and LayerNorm biases leaked into the pruned channels (spec §1.1, §10.10). Head and MLP
pruning alone convert exactly.

Checkpoints are read with `torch.load(weights_only=True)`. One that pickles more than tensors (a fine-tuning
checkpoint with `args`, optimizer state, numpy scalars) is read again with every such global replaced by an inert
placeholder: nothing from the pickle is executed, and the skipped names are logged.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from typing import Any

import torch
from torch import nn
from transformers import DeiTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..configuration_pruned_vit import PrunedViTConfig
from ..cost import cost_record
from ..modeling_pruned_vit import PrunedViTForImageClassification
from ..structure import PruningPlan, compact
from .common import BlockWeights, blocks_config_kwargs, check_image_processor, encoder_state, label_kwargs, put_linear

logger = logging.getLogger(__name__)

_BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "attn.attn_gate.weight",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.hidden_gate1.weight",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "res_gate.weight",
)
_TOP_KEYS = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
    "res_gate.weight",
)
_OPTIONAL = {"attn.qkv.bias", "head.bias"}


class SkippedObject:
    """Stands in for a pickled class or function that is not loaded: keeps its arguments, runs nothing."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<skipped {self.qualified_name}>"


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a `torch.save` file on CPU without executing pickled code (see the module doc)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    placeholders = [(type(f"Skipped[{name}]", (SkippedObject,), {"qualified_name": name}), name) for name in unsafe]
    logger.warning(
        "%s pickles more than tensors; loading it with inert placeholders (nothing executed) for: %s",
        path,
        ", ".join(unsafe),
    )
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"refusing to load {str(path)!r}: {error}") from None


def _state_dict(checkpoint: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The gated model's state dict: `checkpoint["model"]`, or the checkpoint itself; a DDP `module.` prefix is
    dropped."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a SAViT checkpoint: expected {{'model': state_dict}} or a state dict.")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def _check_keys(state: dict[str, torch.Tensor], depth: int, path: str | os.PathLike) -> None:
    expected = set(_TOP_KEYS) | {f"blocks.{i}.{key}" for i in range(depth) for key in _BLOCK_KEYS}
    optional = {key for key in expected if key in _OPTIONAL or key.split(".", 2)[-1] in _OPTIONAL}
    missing = sorted(expected - optional - set(state))
    unknown = sorted(set(state) - expected)
    if missing or unknown:
        raise ValueError(
            f"{str(path)!r} does not have SAViT's gated DeiT keys (spec §6.2): missing {missing[:8]}, "
            f"unexpected {unknown[:8]} (distilled or other timm variants are not supported)."
        )


def _gate(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A 0/1 gate as a boolean mask."""
    gate = state[key].flatten()
    if not bool(((gate == 0) | (gate == 1)).all()):
        raise ValueError(f"gate {key} must hold only 0 and 1 (SAViT's masks), got values {gate.unique().tolist()[:6]}.")
    return gate == 1


def _layer_norm(state: dict[str, torch.Tensor], name: str, eps: float) -> nn.LayerNorm:
    weight = state[f"{name}.weight"]
    with torch.device("meta"):
        norm = nn.LayerNorm(weight.shape[0], eps=eps)
    norm.weight, norm.bias = nn.Parameter(weight), nn.Parameter(state[f"{name}.bias"])
    return norm


def _block(state: dict[str, torch.Tensor], i: int, eps: float) -> BlockWeights:
    """Block i in PrunedViT's terms: the fused qkv rows are [q; k; v], each head-major; the head count is the
    length of the block's head gate and the head dim is read from the qkv shape."""
    prefix = f"blocks.{i}."
    heads = state[f"{prefix}attn.attn_gate.weight"].numel()
    qkv, qkv_bias = state[f"{prefix}attn.qkv.weight"], state.get(f"{prefix}attn.qkv.bias")
    if qkv.shape[0] % (3 * heads):
        raise ValueError(f"{prefix}attn.qkv has {qkv.shape[0]} rows, which do not split into 3 x {heads} heads.")
    q, k, v = qkv.chunk(3)
    q_bias, k_bias, v_bias = qkv_bias.chunk(3) if qkv_bias is not None else (None, None, None)
    return BlockWeights(
        norm1=_layer_norm(state, f"{prefix}norm1", eps),
        q=(q, q_bias),
        k=(k, k_bias),
        v=(v, v_bias),
        o=(state[f"{prefix}attn.proj.weight"], state[f"{prefix}attn.proj.bias"]),
        norm2=_layer_norm(state, f"{prefix}norm2", eps),
        fc1=(state[f"{prefix}mlp.fc1.weight"], state[f"{prefix}mlp.fc1.bias"]),
        fc2=(state[f"{prefix}mlp.fc2.weight"], state[f"{prefix}mlp.fc2.bias"]),
        num_heads=heads,
        attention_scale=(qkv.shape[0] // (3 * heads)) ** -0.5,
    )


def deit_image_processor(image_size: int) -> DeiTImageProcessor:
    """DeiT's evaluation transform (spec §7.1): bicubic resize of the short side to image_size / 0.875, centre
    crop, ImageNet mean and std."""
    return DeiTImageProcessor(
        size={"shortest_edge": math.floor(image_size / 0.875)},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def from_savit_checkpoint(
    path: str | os.PathLike,
    *,
    layer_norm_eps: float = 1e-6,
    id2label: dict[int, str] | None = None,
    image_processor: Any = None,
    return_plan: bool = False,
) -> PrunedViTForImageClassification | tuple[PrunedViTForImageClassification, PruningPlan]:
    """Convert SAViT's masked checkpoint at `path` into the compact `PrunedViTForImageClassification`.

    Args:
        path: `checkpoint_pruned_00.pth` of SAViT's pruning run (or any state dict with the keys of spec §6.2).
        layer_norm_eps: DeiT's LayerNorm epsilon (timm's 1e-6; the checkpoint does not record it).
        id2label: class names (default: numbered labels, as many as the classifier has outputs).
        image_processor: attached to the model; default DeiT's evaluation transform at the checkpoint's size.
        return_plan: also return the `PruningPlan` of the gates (kept indices of the dense model).

    Raises:
        ValueError: the file is not such a checkpoint (missing or unexpected keys, gates other than 0/1, a block
            with every head or neuron gated off, a pickle that cannot be read safely).
    """
    check_image_processor(image_processor)
    state = _state_dict(load_checkpoint(path), path)
    depth = 1 + max((int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, state) if m), default=-1)
    if depth == 0:
        raise ValueError(f"{str(path)!r} has no transformer blocks (`blocks.i.*` keys).")
    _check_keys(state, depth, path)
    shared = state["res_gate.weight"]
    if not all(torch.equal(state[f"blocks.{i}.res_gate.weight"], shared) for i in range(depth)):
        raise ValueError(f"{str(path)!r}: the copies of the shared res_gate differ; SAViT writes one gate.")

    projection = state["patch_embed.proj.weight"]
    hidden, channels, patch = projection.shape[0], projection.shape[1], projection.shape[-1]
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    if side * side != state["pos_embed"].shape[1] - 1:
        raise ValueError(f"pos_embed has {state['pos_embed'].shape[1]} tokens: not a CLS token plus a square grid.")
    blocks = [_block(state, i, layer_norm_eps) for i in range(depth)]
    block_kwargs = blocks_config_kwargs(blocks)
    num_labels = state["head.weight"].shape[0]
    labels = label_kwargs(id2label) if id2label is not None else {"num_labels": num_labels}
    config = PrunedViTConfig(
        hidden_size=hidden,
        layer_norm_eps=layer_norm_eps,
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
        pruning={"source": os.fspath(path), "source_class": "SAViT masked checkpoint"},
        **block_kwargs,
        **labels,
    )
    if config.num_labels != num_labels:
        raise ValueError(f"id2label has {config.num_labels} classes, the checkpoint's head has {num_labels}.")
    with torch.device("meta"):
        conv = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)
    conv.weight, conv.bias = nn.Parameter(projection), nn.Parameter(state["patch_embed.proj.bias"])
    weights = encoder_state(
        cls_token=state["cls_token"],
        distillation_token=None,
        position_embeddings=state["pos_embed"],
        patch_projection=conv,
        blocks=blocks,
        final_norm=_layer_norm(state, "norm", layer_norm_eps),
        qkv_bias=block_kwargs["qkv_bias"],
        prefix="vit.",
    )
    put_linear(weights, "classifier", (state["head.weight"], state.get("head.bias")))
    with torch.device("meta"):
        dense = PrunedViTForImageClassification(config)
    dense.load_state_dict(weights, strict=True, assign=True)
    dense.eval()
    dense.image_processor = image_processor or deit_image_processor(config.image_size)

    masks = {
        "head": [_gate(state, f"blocks.{i}.attn.attn_gate.weight") for i in range(depth)],
        "mlp": [_gate(state, f"blocks.{i}.mlp.hidden_gate1.weight") for i in range(depth)],
        "embed": [_gate(state, "res_gate.weight")],
    }
    plan = PruningPlan.from_masks(config, masks)
    pruned = compact(dense, plan)
    record = cost_record(pruned, dense)
    pruned.config.pruning = {
        "method": "savit",
        "source": os.fspath(path),
        "source_class": "SAViT masked checkpoint",
        **record,
        "kinds": ["head", "mlp", "embed"],
    }
    logger.info(
        "SAViT checkpoint %s: heads %s, mlp %s, embed %d of %d kept (%.1f%% of dense MACs)",
        path,
        plan.num_kept("head"),
        plan.num_kept("mlp"),
        plan.num_kept("embed")[0],
        hidden,
        100 * record["macs_ratio"],
    )
    return (pruned, plan) if return_plan else pruned


__all__ = ["SkippedObject", "deit_image_processor", "from_savit_checkpoint", "load_checkpoint"]

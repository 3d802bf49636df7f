"""NViT's checkpoints (NVlabs/NViT, spec §11) to PrunedViT.

Both formats hold a DeiT-B-distilled-like model under `"model"`:

- `pruned_checkpoint.pth` (`main_full_global_latency.py`): the full-size *masked* model. Q/K/V weights are
  [d, E, H] with biases [d, H], the output projection [E, d_v, H], a learned `head_mask` [H, 1] per block scales
  each head's q, k and v, pruned units are exact zeros (spec §1.3), and there is no `dim` entry.
- `ft_checkpoint.pth` (`finetune_dense.py`, the released NViT-B/H/S/T): the compact model, Q/K/V as [H·d, E]
  head-major linears, `attn.proj.proj`, and the dims in `checkpoint["dim"]` (they cannot be read off the shapes:
  H·d is a product).

What the conversion takes care of:
- the patch embedding is a 1x1 conv on patches flattened in (p1, p2, c) order; its weight [E, p·p·C, 1, 1] becomes
  the standard [E, C, p, p] conv weight;
- the masked format's `head_mask` is folded into Q, K and V (it scales linear outputs; q·k sees it squared), the
  kept units are read from the zero patterns (a head, Q/K index, V index, MLP neuron or embedding channel stays
  when any of its Q/K/V, Q/K, V, fc1 or patch-embedding weights or biases is non-zero; NViT's `finetune_dense.py`
  reads Q only, which is the same on its checkpoints) and the model is compacted;
- `token_mask` [tokens, 1], a learned per-token multiplier of q, k and v after their biases that training moves away
  from 1, becomes PrunedViT's `token_scale` (`config.qkv_token_scale`); when every block's mask is all ones it is
  dropped and the model is a plain PrunedViT;
- the softmax scale: the masked model uses timm's (E / H)^-0.5, the dense model a fixed 64^-0.5 whatever its Q/K
  dim (spec §5.2); both are kept per block (`attention_scale`);
- `head` and `head_dist` become `cls_classifier` and `distillation_classifier` of
  `PrunedViTForImageClassificationWithTeacher`, whose logits are their mean, as NViT predicts.

The masked model's LayerNorms average over all channels, pruned ones included, so like NViT's own conversion the
result differs from the masked model when embedding channels were pruned (spec §5.3) and equals the dense model
`finetune_dense.py` builds from it. `model_ema` is ignored (in `pruned_checkpoint.pth` it is the unpruned model).
Files are read without running pickled code (`convert.savit.load_checkpoint`: `args` and other non-tensor entries
are replaced by inert placeholders, and what was skipped is logged).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import torch
from torch import nn

from ..configuration_pruned_vit import PrunedViTConfig
from ..modeling_pruned_vit import PrunedViTForImageClassificationWithTeacher
from ..structure import PruningPlan, compact
from .common import BlockWeights, blocks_config_kwargs, check_image_processor, encoder_state, label_kwargs, put_linear
from .savit import _layer_norm, deit_image_processor, load_checkpoint

logger = logging.getLogger(__name__)

_TOP_KEYS = {"cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
_TOP_KEYS |= {"norm.weight", "norm.bias", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
_BLOCK_KEYS = {f"{norm}.{p}" for norm in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
_BLOCK_KEYS |= {f"attn.qkv.{proj}.{p}" for proj in "QKV" for p in ("weight", "bias")} | {"attn.qkv.token_mask"}
_MASKED_BLOCK_KEYS = _BLOCK_KEYS | {"attn.qkv.head_mask.weight", "attn.proj.weight", "attn.proj.bias"}
_DENSE_BLOCK_KEYS = _BLOCK_KEYS | {"attn.proj.proj.weight", "attn.proj.proj.bias"}
_DIM_KEYS = ("EMB", "head", "QK", "V", "MLP")


def _model_state(checkpoint: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`checkpoint["model"]` (or a bare state dict) without a DDP `module.` prefix."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not an NViT checkpoint: expected {{'model': state_dict, ...}}.")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return {key: value.float() for key, value in state.items()}


def _check_keys(state: dict[str, torch.Tensor], block_keys: set[str], depth: int, fmt: str, path) -> None:
    expected = _TOP_KEYS | {f"blocks.{i}.{key}" for i in range(depth) for key in block_keys}
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        raise ValueError(
            f"{str(path)!r} does not have the keys of NViT's {fmt} (spec §11): missing {missing[:8]}, "
            f"unexpected {unknown[:8]}."
        )


def _patch_projection(state: dict[str, torch.Tensor], num_channels: int) -> nn.Conv2d:
    """The 1x1 conv on (p1 p2 c)-ordered patches as a standard p x p conv with stride p."""
    weight = state["patch_embed.proj.weight"]
    hidden, inputs = weight.shape[0], weight.shape[1]
    patch = math.isqrt(inputs // num_channels)
    if weight.shape[2:] != (1, 1) or patch * patch * num_channels != inputs:
        raise ValueError(
            f"patch_embed.proj.weight {list(weight.shape)} is not a 1x1 conv on p*p*{num_channels} inputs "
            f"(num_channels={num_channels})."
        )
    with torch.device("meta"):
        conv = nn.Conv2d(num_channels, hidden, kernel_size=patch, stride=patch)
    conv.weight = nn.Parameter(weight.reshape(hidden, patch, patch, num_channels).permute(0, 3, 1, 2).contiguous())
    conv.bias = nn.Parameter(state["patch_embed.proj.bias"])
    return conv


def _masked_block(state: dict[str, torch.Tensor], i: int, eps: float, scale: float | None) -> BlockWeights:
    """Block i of the masked model: head mask folded into Q, K and V; [d, E, H] -> [(h d), E]."""
    prefix = f"blocks.{i}."
    mask = state[f"{prefix}attn.qkv.head_mask.weight"].reshape(-1)

    def head_major(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = state[f"{prefix}attn.qkv.{name}.weight"], state[f"{prefix}attn.qkv.{name}.bias"]
        if weight.dim() != 3 or weight.shape[2] != mask.numel() or bias.shape != (weight.shape[0], mask.numel()):
            raise ValueError(f"{prefix}attn.qkv.{name} must be [d, E, {mask.numel()}] with bias [d, H].")
        weight, bias = weight * mask, bias * mask
        return weight.permute(2, 0, 1).reshape(-1, weight.shape[1]), bias.t().reshape(-1)

    q, k, v = head_major("Q"), head_major("K"), head_major("V")
    proj = state[f"{prefix}attn.proj.weight"]
    return BlockWeights(
        norm1=_layer_norm(state, f"{prefix}norm1", eps),
        q=q,
        k=k,
        v=v,
        o=(proj.permute(0, 2, 1).reshape(proj.shape[0], -1), state[f"{prefix}attn.proj.bias"]),
        norm2=_layer_norm(state, f"{prefix}norm2", eps),
        fc1=(state[f"{prefix}mlp.fc1.weight"], state[f"{prefix}mlp.fc1.bias"]),
        fc2=(state[f"{prefix}mlp.fc2.weight"], state[f"{prefix}mlp.fc2.bias"]),
        num_heads=mask.numel(),
        attention_scale=scale if scale is not None else state[f"{prefix}attn.qkv.Q.weight"].shape[0] ** -0.5,
    )


def _dense_block(state: dict[str, torch.Tensor], i: int, heads: int, eps: float, scale: float) -> BlockWeights:
    prefix = f"blocks.{i}."

    def affine(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"]

    return BlockWeights(
        norm1=_layer_norm(state, f"{prefix}norm1", eps),
        q=affine("attn.qkv.Q"),
        k=affine("attn.qkv.K"),
        v=affine("attn.qkv.V"),
        o=affine("attn.proj.proj"),
        norm2=_layer_norm(state, f"{prefix}norm2", eps),
        fc1=affine("mlp.fc1"),
        fc2=affine("mlp.fc2"),
        num_heads=heads,
        attention_scale=scale,
    )


def _check_dims(dim: Any, depth: int, blocks: list[BlockWeights], hidden: int, path) -> None:
    """`checkpoint["dim"]` must describe the tensors (eval_nvit.py loads them with strict=True)."""
    if not isinstance(dim, dict) or set(dim) != set(_DIM_KEYS):
        raise ValueError(f"{str(path)!r}: 'dim' must be a dict with keys {_DIM_KEYS}, got {dim!r}.")
    if any(not isinstance(dim[key], (list, tuple)) or len(dim[key]) != depth for key in _DIM_KEYS[1:]):
        raise ValueError(f"{str(path)!r}: dim['head'/'QK'/'V'/'MLP'] must be lists of {depth} ints, got {dim!r}.")
    if dim["EMB"] != hidden:
        raise ValueError(f"{str(path)!r}: dim['EMB'] = {dim['EMB']}, but the patch embedding has {hidden} outputs.")
    for i, block in enumerate(blocks):
        expected = {
            "num_attention_heads": dim["head"][i],
            "qk_head_dim": dim["QK"][i],
            "v_head_dim": dim["V"][i],
            "intermediate_size": dim["MLP"][i],
        }
        found = block.geometry()
        if any(found[name] != value for name, value in expected.items()):
            raise ValueError(f"{str(path)!r}: block {i} tensors do not match dim: expected {expected}, got {found}.")


def _nonzero_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """Rows (dim 0) where any of `tensors` (same length) has a non-zero entry."""
    return torch.stack([t.reshape(t.shape[0], -1).ne(0).any(1) for t in tensors]).any(0)


def _kept_units(state: dict[str, torch.Tensor], blocks: list[BlockWeights]) -> dict[str, list[torch.Tensor]]:
    """Masks of the masked model's kept units, read from its zero patterns (see the module doc)."""
    masks: dict[str, list[torch.Tensor]] = {"head": [], "qk": [], "v": [], "mlp": []}
    for block in blocks:
        heads, qk, v = block.num_heads, block.q[0].shape[0] // block.num_heads, block.v[0].shape[0] // block.num_heads
        q = _nonzero_rows(block.q[0], block.q[1]).view(heads, qk)
        k = _nonzero_rows(block.k[0], block.k[1]).view(heads, qk)
        values = _nonzero_rows(block.v[0], block.v[1]).view(heads, v)
        masks["head"].append((q | k).any(1) | values.any(1))
        masks["qk"].append((q | k).any(0))
        masks["v"].append(values.any(0))
        masks["mlp"].append(_nonzero_rows(block.fc1[0], block.fc1[1]))
    masks["embed"] = [_nonzero_rows(state["patch_embed.proj.weight"], state["patch_embed.proj.bias"])]
    return masks


def from_nvit_checkpoint(
    path: str | os.PathLike,
    *,
    num_channels: int = 3,
    attention_scale: float | None = None,
    layer_norm_eps: float = 1e-6,
    id2label: dict[int, str] | None = None,
    image_processor: Any = None,
) -> PrunedViTForImageClassificationWithTeacher:
    """Convert an NViT checkpoint (`pruned_checkpoint.pth` or `ft_checkpoint.pth`, see the module doc) into the
    compact `PrunedViTForImageClassificationWithTeacher`.

    Args:
        path: the `.pth` file; the format is recognised by its `dim` entry (dense) or `head_mask` keys (masked).
        num_channels: image channels, to undo the (p1 p2 c) order of the patch embedding (3 for RGB).
        attention_scale: softmax scale of every block; default (E / H)^-0.5 for the masked format (timm's, 1/8 on
            DeiT-B) and 64^-0.5 for the dense format (hard-coded in NViT's dense attention).
        layer_norm_eps: NViT/timm's 1e-6 (not in the checkpoint).
        id2label: class names (default: numbered, as many as the heads have outputs).
        image_processor: attached to the model; default DeiT's evaluation transform at the checkpoint's size.

    Raises:
        ValueError: not an NViT checkpoint (keys, shapes or `dim` inconsistent), or a pickle that cannot be read
            safely.
    """
    check_image_processor(image_processor)
    checkpoint = load_checkpoint(path)
    state = _model_state(checkpoint, path)
    depth = 1 + max((int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, state) if m), default=-1)
    if depth == 0:
        raise ValueError(f"{str(path)!r} has no transformer blocks (`blocks.i.*` keys).")
    dense = isinstance(checkpoint, dict) and "dim" in checkpoint
    fmt = "ft_checkpoint.pth (dense, with 'dim')" if dense else "pruned_checkpoint.pth (masked)"
    _check_keys(state, _DENSE_BLOCK_KEYS if dense else _MASKED_BLOCK_KEYS, depth, fmt, path)

    conv = _patch_projection(state, num_channels)
    hidden, patch = conv.out_channels, conv.kernel_size[0]
    tokens = state["pos_embed"].shape[1]
    side = math.isqrt(tokens - 2)
    if side * side != tokens - 2:
        raise ValueError(f"pos_embed has {tokens} tokens: not CLS + distillation token + a square grid of patches.")
    if dense:
        heads = checkpoint["dim"]["head"] if isinstance(checkpoint["dim"], dict) else None
        if not isinstance(heads, (list, tuple)) or len(heads) != depth:
            raise ValueError(f"{str(path)!r}: dim['head'] must list the heads of the {depth} blocks.")
        scale = 64**-0.5 if attention_scale is None else attention_scale
        blocks = [_dense_block(state, i, heads[i], layer_norm_eps, scale) for i in range(depth)]
        _check_dims(checkpoint["dim"], depth, blocks, hidden, path)
    else:
        blocks = [_masked_block(state, i, layer_norm_eps, attention_scale) for i in range(depth)]
    token_masks = [state[f"blocks.{i}.attn.qkv.token_mask"] for i in range(depth)]
    if any(mask.shape != (tokens, 1) for mask in token_masks):
        raise ValueError(f"attn.qkv.token_mask must be [{tokens}, 1] (one value per token).")
    token_scale = not all(bool((mask == 1).all()) for mask in token_masks)

    block_kwargs = blocks_config_kwargs(blocks)
    num_labels = state["head.weight"].shape[0]
    labels = label_kwargs(id2label) if id2label is not None else {"num_labels": num_labels}
    source = {"source": os.fspath(path), "source_class": f"NViT {fmt}"}
    config = PrunedViTConfig(
        hidden_size=hidden,
        layer_norm_eps=layer_norm_eps,
        image_size=side * patch,
        patch_size=patch,
        num_channels=num_channels,
        use_distillation_token=True,
        pruning=source,
        **({"qkv_token_scale": True} if token_scale else {}),
        **block_kwargs,
        **labels,
    )
    if config.num_labels != num_labels:
        raise ValueError(f"id2label has {config.num_labels} classes, the checkpoint's heads have {num_labels}.")
    weights = encoder_state(
        cls_token=state["cls_token"],
        distillation_token=state["dist_token"],
        position_embeddings=state["pos_embed"],
        patch_projection=conv,
        blocks=blocks,
        final_norm=_layer_norm(state, "norm", layer_norm_eps),
        qkv_bias=True,
        prefix="vit.",
    )
    if token_scale:
        for i, mask in enumerate(token_masks):
            weights[f"vit.layers.{i}.attention.token_scale"] = mask.clone()
    put_linear(weights, "cls_classifier", (state["head.weight"], state["head.bias"]))
    put_linear(weights, "distillation_classifier", (state["head_dist.weight"], state["head_dist.bias"]))
    with torch.device("meta"):
        model = PrunedViTForImageClassificationWithTeacher(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval()
    model.image_processor = image_processor or deit_image_processor(config.image_size)
    if not dense:
        plan = PruningPlan.from_masks(config, _kept_units(state, blocks))
        model = compact(model, plan)
        model.config.pruning = {**source, "method": "nvit", "kinds": ["embed", "head", "qk", "v", "mlp"]}
    config = model.config
    logger.info(
        "NViT %s: embed %d, heads %s, qk %s, v %s, mlp %s%s",
        fmt,
        config.hidden_size,
        config.heads_per_layer,
        config.qk_head_dims,
        config.v_head_dims,
        config.intermediate_sizes,
        ", per-token q/k/v scales kept" if token_scale else "",
    )
    return model


__all__ = ["from_nvit_checkpoint"]

"""Exact conversion of timm `VisionTransformer` (and DeiT's `VisionTransformerDistilled`) to PrunedViT.

Only the classic ViT/DeiT architecture has a PrunedViT equivalent; every timm option that changes the function
(register tokens, QK norm, layer scale, pre-norm, attention pooling, ...) is rejected with the reason, rather
than converted approximately. Per-block heads are read from the fused qkv shape, so timm models pruned
physically (e.g. with Torch-Pruning) convert too.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_model_data_config
from timm.layers import Attention, Mlp, PatchEmbed
from timm.layers.activations import GELU, GELUTanh
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from transformers import DeiTImageProcessor
from transformers.image_utils import PILImageResampling

from ..configuration_pruned_vit import PrunedViTConfig
from ..modeling_pruned_vit import (
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
    PrunedViTPreTrainedModel,
)
from .common import (
    BlockWeights,
    blocks_config_kwargs,
    build_pruned_model,
    common_layer_norm_eps,
    encoder_state,
    head_num_labels,
    label_kwargs,
    linear_params,
    put_heads,
    source_record,
    square_size,
)

logger = logging.getLogger(__name__)

TIMM_SOURCES = (VisionTransformer, VisionTransformerDistilled)
#: timm global_pool -> PrunedViTConfig.pooling
_POOLING = {"token": "cls", "avg": "avg"}
_INTERPOLATION = {
    "nearest": PILImageResampling.NEAREST,
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
}


def convert_timm(model: nn.Module, image_processor: Any = None) -> PrunedViTPreTrainedModel:
    """Convert a timm `VisionTransformer` / `VisionTransformerDistilled` into the equivalent PrunedViT.

    A distilled DeiT becomes `PrunedViTForImageClassificationWithTeacher` (`head` -> `cls_classifier`,
    `head_dist` -> `distillation_classifier`), anything else `PrunedViTForImageClassification`.
    `image_processor` defaults to one built from timm's data config (see `default_image_processor`).

    Raises:
        TypeError: `model` is not one of `TIMM_SOURCES`, or uses layers PrunedViT does not have.
        ValueError: `model` uses an option PrunedViT cannot reproduce exactly.
    """
    if type(model) not in TIMM_SOURCES:
        raise TypeError(f"convert_timm supports {[cls.__name__ for cls in TIMM_SOURCES]}, got {type(model).__name__}.")
    distilled = type(model) is VisionTransformerDistilled
    pooling = check_supported(model)
    final_norm = model.fc_norm if pooling == "avg" else model.norm
    blocks = [_block_weights(i, block) for i, block in enumerate(model.blocks)]
    if distilled:
        heads = {"cls_classifier": model.head, "distillation_classifier": model.head_dist}
    else:
        heads = {"classifier": model.head}
    norms = [norm for block in model.blocks for norm in (block.norm1, block.norm2)]

    block_kwargs = blocks_config_kwargs(blocks)
    num_labels = head_num_labels(model.head)
    label_names = _label_names(model, num_labels)
    labels = {"num_labels": num_labels} if label_names is None else label_kwargs(dict(enumerate(label_names)))
    block = model.blocks[0]
    pruned_config = PrunedViTConfig(
        hidden_size=model.patch_embed.proj.out_channels,
        hidden_act=_hidden_act(block.mlp.act),
        hidden_dropout_prob=block.attn.proj_drop.p,
        attention_probs_dropout_prob=block.attn.attn_drop.p,
        layer_norm_eps=common_layer_norm_eps([*norms, final_norm]),
        image_size=square_size("img_size", model.patch_embed.img_size),
        patch_size=square_size("patch_size", model.patch_embed.patch_size),
        num_channels=model.patch_embed.proj.in_channels,
        use_distillation_token=distilled,
        pooling=pooling,
        pruning=source_record(_source_id(model), model),
        **block_kwargs,
        **labels,
    )

    state = encoder_state(
        cls_token=model.cls_token,
        distillation_token=model.dist_token if distilled else None,
        position_embeddings=model.pos_embed,
        patch_projection=model.patch_embed.proj,
        blocks=blocks,
        final_norm=final_norm,
        qkv_bias=block_kwargs["qkv_bias"],
        prefix="vit.",
    )
    put_heads(state, heads)
    if image_processor is None:
        image_processor = default_image_processor(model)
    target = PrunedViTForImageClassificationWithTeacher if distilled else PrunedViTForImageClassification
    return build_pruned_model(target, pruned_config, state, model, image_processor)


def check_supported(model: VisionTransformer) -> str:
    """Reject timm options without an exact PrunedViT equivalent; return the PrunedViT pooling."""
    if model.global_pool not in _POOLING:
        raise ValueError(
            f"global_pool={model.global_pool!r} is not supported; PrunedViT pools with {sorted(_POOLING)}."
        )
    pooling = _POOLING[model.global_pool]
    if model.cls_token is None:
        raise ValueError("class_token=False is not supported: PrunedViT always has a class token.")
    if model.num_reg_tokens:
        raise ValueError(f"reg_tokens={model.num_reg_tokens} is not supported: PrunedViT has no register tokens.")
    if model.no_embed_class:
        raise ValueError("no_embed_class=True is not supported: PrunedViT adds position embeddings to the class token.")
    if model.pos_embed is None:
        raise ValueError("pos_embed='none' is not supported: PrunedViT has learned position embeddings.")
    if not isinstance(model.norm_pre, nn.Identity):
        raise ValueError("pre_norm=True is not supported: PrunedViT has no LayerNorm before the blocks.")
    if model.attn_pool is not None:
        raise ValueError("attention pooling is not supported.")
    if pooling == "avg" and model.pool_include_prefix:
        raise ValueError("pool_include_prefix=True is not supported: PrunedViT averages patch tokens only.")
    used, unused = (model.fc_norm, model.norm) if pooling == "avg" else (model.norm, model.fc_norm)
    if not isinstance(used, nn.LayerNorm) or not isinstance(unused, nn.Identity):
        raise ValueError(
            f"global_pool={model.global_pool!r} needs the final LayerNorm "
            f"{'after' if pooling == 'avg' else 'before'} pooling (timm's default fc_norm); final_norm=False or "
            "an explicit fc_norm are not supported."
        )
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity):
        raise TypeError(f"patch_embed must be a plain timm PatchEmbed (no norm), found {type(embed).__name__}.")
    proj = embed.proj
    if proj.kernel_size != proj.stride or proj.kernel_size != tuple(embed.patch_size) or proj.padding != (0, 0):
        raise ValueError("patch_embed.proj must be a non-overlapping patch convolution.")
    if model.dynamic_img_size or embed.dynamic_img_pad:
        logger.warning(
            "dynamic_img_size/dynamic_img_pad: the converted model is exact at %s px; at other sizes pass "
            "interpolate_pos_encoding=True (bicubic resize, close to but not identical to timm's resampling).",
            embed.img_size,
        )
    return pooling


def _block_weights(index: int, block: nn.Module) -> BlockWeights:
    """A timm `Block` in PrunedViT's terms; the fused qkv rows are [q; k; v], each head-major."""
    where = f"blocks.{index}"
    if type(block) is not Block:
        raise TypeError(f"{where} is a {type(block).__name__}; only timm's pre-norm Block is supported.")
    if not isinstance(block.ls1, nn.Identity) or not isinstance(block.ls2, nn.Identity):
        raise ValueError(f"{where}: layer scale (init_values) is not supported.")
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        raise TypeError(f"{where}.attn is a {type(attn).__name__}; only timm's Attention is supported.")
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        raise ValueError(f"{where}: qk_norm is not supported.")
    if not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
        raise ValueError(f"{where}: attention output norm (scale_attn_norm) and gated attention are not supported.")
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
        raise TypeError(f"{where}.mlp is a {type(mlp).__name__}; only timm's Mlp with linear layers is supported.")
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError(f"{where}: MLP norm (scale_mlp_norm) is not supported.")
    _hidden_act(mlp.act)

    rows, head_dim = attn.qkv.out_features, attn.head_dim
    if rows % (3 * head_dim):
        raise ValueError(f"{where}.attn.qkv has {rows} outputs, not a multiple of 3 * head_dim = {3 * head_dim}.")
    num_heads = rows // (3 * head_dim)
    if num_heads != attn.num_heads:
        logger.warning(
            "%s.attn: num_heads=%d but qkv holds %d heads; using %d.", where, attn.num_heads, num_heads, num_heads
        )
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q, k, v = weight.chunk(3, dim=0)
    q_bias, k_bias, v_bias = bias.chunk(3, dim=0) if bias is not None else (None, None, None)
    # fused attention (F.scaled_dot_product_attention) uses head_dim ** -0.5, the manual path `attn.scale`
    scale = head_dim**-0.5 if attn.fused_attn else attn.scale
    return BlockWeights(
        norm1=block.norm1,
        q=(q, q_bias),
        k=(k, k_bias),
        v=(v, v_bias),
        o=linear_params(attn.proj),
        norm2=block.norm2,
        fc1=linear_params(mlp.fc1),
        fc2=linear_params(mlp.fc2),
        num_heads=num_heads,
        attention_scale=scale,
    )


def _hidden_act(act: nn.Module) -> str:
    """The transformers activation name computing exactly what timm's MLP activation computes."""
    if isinstance(act, GELU) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    if isinstance(act, GELUTanh) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_pytorch_tanh"
    raise ValueError(f"MLP activation {type(act).__name__} is not supported; PrunedViT converts GELU (exact or tanh).")


def _source_id(model: VisionTransformer) -> str:
    """The Hub id of the timm weights (e.g. `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`), else the name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("hf_hub_id") or cfg.get("architecture") or ""


def _label_names(model: VisionTransformer, num_labels: int) -> list[str] | None:
    """Class names as transformers' TimmWrapper gives them: the pretrained config's, else ImageNet's by size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    descriptions = cfg.get("label_descriptions") or {}
    if names is None:
        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            names, descriptions = info.label_names(), info.label_descriptions(as_dict=True)
    if names is None or len(names) != num_labels:
        return None
    return [descriptions.get(name, name) for name in names]


def default_image_processor(model: VisionTransformer) -> DeiTImageProcessor:
    """timm's eval transform (resize by 1/crop_pct, centre crop, normalise) as a transformers processor.

    The data config comes from `timm.data.resolve_model_data_config`; the crop is the model's own input size,
    since a model created with another `img_size` keeps its architecture's default data config.
    """
    data = resolve_model_data_config(model)
    size = square_size("img_size", model.patch_embed.img_size)
    crop_pct = data.get("crop_pct") or 0.875
    crop_mode = data.get("crop_mode") or "center"
    interpolation = data.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATION:
        raise ValueError(
            f"timm interpolation {interpolation!r} has no transformers equivalent here "
            f"({sorted(_INTERPOLATION)}); pass image_processor explicitly."
        )
    resize = math.floor(size / crop_pct)
    if crop_mode == "center":
        resize_to = {"shortest_edge": resize}
    elif crop_mode == "squash":
        resize_to = {"height": resize, "width": resize}
    else:
        raise ValueError(f"timm crop_mode {crop_mode!r} is not supported; pass image_processor explicitly.")
    return DeiTImageProcessor(
        size=resize_to,
        crop_size={"height": size, "width": size},
        resample=_INTERPOLATION[interpolation],
        image_mean=[float(x) for x in data["mean"]],
        image_std=[float(x) for x in data["std"]],
    )


__all__ = ["TIMM_SOURCES", "convert_timm", "default_image_processor"]

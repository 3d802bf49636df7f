"""Exact conversion of transformers ViT and DeiT models to PrunedViT.

transformers 5's ViT/DeiT already use PrunedViT's layout (separate q/k/v projections, `layers`, `mlp.fc1/fc2`), so
the conversion is a copy; the per-block geometry is read from tensor shapes, so physically pruned HF models
convert too.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTImageProcessor,
    DeiTModel,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..configuration_pruned_vit import PrunedViTConfig
from ..modeling_pruned_vit import (
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
    PrunedViTModel,
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
    put_linear,
    source_record,
    square_size,
)

#: Supported transformers class -> (PrunedViT class, names of its classification heads, shared by both models).
HF_SOURCES: dict[type[nn.Module], tuple[type[PrunedViTPreTrainedModel], tuple[str, ...]]] = {
    ViTForImageClassification: (PrunedViTForImageClassification, ("classifier",)),
    ViTModel: (PrunedViTModel, ()),
    DeiTForImageClassification: (PrunedViTForImageClassification, ("classifier",)),
    DeiTForImageClassificationWithTeacher: (
        PrunedViTForImageClassificationWithTeacher,
        ("cls_classifier", "distillation_classifier"),
    ),
    DeiTModel: (PrunedViTModel, ()),
}
_DEIT_SOURCES = (DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTModel)


def convert_hf(model: nn.Module, image_processor: Any = None) -> PrunedViTPreTrainedModel:
    """Convert a transformers ViT/DeiT (a class of `HF_SOURCES`) into the equivalent PrunedViT.

    `image_processor` is attached to the result (saved by `save_pretrained`); by default it is the processor
    of the source family at the source's image size (see `default_image_processor`).
    """
    if type(model) not in HF_SOURCES:
        raise TypeError(f"convert_hf supports {[cls.__name__ for cls in HF_SOURCES]}, got {type(model).__name__}.")
    target, head_names = HF_SOURCES[type(model)]
    config = model.config
    base = model.base_model
    embeddings = base.embeddings
    blocks = [_block_weights(layer) for layer in base.layers]
    pooler = base.pooler if target is PrunedViTModel else None
    heads = {name: getattr(model, name) for name in head_names}
    norms = [norm for layer in base.layers for norm in (layer.layernorm_before, layer.layernorm_after)]

    block_kwargs = blocks_config_kwargs(blocks)
    labels: dict[str, Any] = label_kwargs(config.id2label, config.label2id)
    if heads:
        num_labels = head_num_labels(next(iter(heads.values())))
        if num_labels != len(config.id2label):
            labels = {"num_labels": num_labels}
    pruned_config = PrunedViTConfig(
        hidden_size=embeddings.cls_token.shape[-1],
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        initializer_range=config.initializer_range,
        layer_norm_eps=common_layer_norm_eps([*norms, base.layernorm]),
        image_size=square_size("image_size", config.image_size),
        patch_size=square_size("patch_size", config.patch_size),
        num_channels=config.num_channels,
        use_distillation_token=getattr(embeddings, "distillation_token", None) is not None,
        pooling="cls",
        pooler_output_size=pooler.dense.out_features if pooler is not None else None,
        pooler_act=config.pooler_act,
        pruning=source_record(config.name_or_path, model),
        problem_type=config.problem_type,
        **block_kwargs,
        **labels,
    )

    prefix = "" if target is PrunedViTModel else "vit."
    state = encoder_state(
        cls_token=embeddings.cls_token,
        distillation_token=getattr(embeddings, "distillation_token", None),
        position_embeddings=embeddings.position_embeddings,
        patch_projection=embeddings.patch_embeddings.projection,
        blocks=blocks,
        final_norm=base.layernorm,
        qkv_bias=block_kwargs["qkv_bias"],
        prefix=prefix,
    )
    if pooler is not None:
        put_linear(state, f"{prefix}pooler.dense", linear_params(pooler.dense))
    put_heads(state, heads)
    if image_processor is None:
        image_processor = default_image_processor(model)
    return build_pruned_model(target, pruned_config, state, model, image_processor)


def _block_weights(layer: nn.Module) -> BlockWeights:
    attention = layer.attention
    rows = attention.q_proj.out_features
    if rows % attention.head_dim:
        raise ValueError(f"q_proj has {rows} outputs, not a multiple of head_dim = {attention.head_dim}.")
    return BlockWeights(
        norm1=layer.layernorm_before,
        q=linear_params(attention.q_proj),
        k=linear_params(attention.k_proj),
        v=linear_params(attention.v_proj),
        o=linear_params(attention.o_proj),
        norm2=layer.layernorm_after,
        fc1=linear_params(layer.mlp.fc1),
        fc2=linear_params(layer.mlp.fc2),
        num_heads=rows // attention.head_dim,
        attention_scale=attention.scaling,
    )


def default_image_processor(model: nn.Module) -> ViTImageProcessor | DeiTImageProcessor:
    """The preprocessing of the source family's Hub checkpoints, at the model's image size.

    ViT (google/vit-*): resize to the image size, mean/std 0.5. DeiT (facebook/deit-*): bicubic resize to
    256/224 of the image size, centre crop, ImageNet mean/std.
    """
    size = square_size("image_size", model.config.image_size)
    if isinstance(model, _DEIT_SOURCES):
        resize = round(size * 256 / 224)
        return DeiTImageProcessor(
            size={"height": resize, "width": resize},
            crop_size={"height": size, "width": size},
            resample=PILImageResampling.BICUBIC,
            image_mean=list(IMAGENET_DEFAULT_MEAN),
            image_std=list(IMAGENET_DEFAULT_STD),
        )
    return ViTImageProcessor(size={"height": size, "width": size})


__all__ = ["HF_SOURCES", "convert_hf", "default_image_processor"]

"""Exact converters from transformers and timm Vision Transformers to PrunedViT.

`to_pruned_vit` is the entry point: it dispatches on the source's class. The converted model computes the
source's outputs (to float rounding), carries its labels and an image processor, and records its origin in
`config.pruning`. timm is imported only when a timm model is given.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modeling_pruned_vit import PrunedViTPreTrainedModel
from .common import check_image_processor
from .hf import HF_SOURCES, convert_hf
from .lpvit import from_lpvit_masks
from .nvit import from_nvit_checkpoint
from .savit import from_savit_checkpoint

#: What `to_pruned_vit` accepts, for error messages and docs.
SUPPORTED_SOURCES = (
    *(f"transformers.{cls.__name__}" for cls in HF_SOURCES),
    "timm.models.vision_transformer.VisionTransformer",
    "timm.models.deit.VisionTransformerDistilled",
    "hf_vitprune PrunedViT models (returned unchanged)",
)


def to_pruned_vit(model: nn.Module, image_processor: Any = None) -> PrunedViTPreTrainedModel:
    """Convert `model` into the PrunedViT computing the same function.

    Args:
        model: one of `SUPPORTED_SOURCES`. transformers `ViTModel`/`DeiTModel` give a `PrunedViTModel` (with the
            source's pooler, if any); classifiers give `PrunedViTForImageClassification`; DeiT with teacher and
            timm distilled DeiT give `PrunedViTForImageClassificationWithTeacher`. A PrunedViT is returned as
            is (with `image_processor` attached when given).
        image_processor: attached as `pruned.image_processor` and written by `save_pretrained`; by default one
            matching the source's preprocessing is built.

    Raises:
        TypeError: `model` is not a supported class (the message lists them).
        ValueError: the source uses a feature PrunedViT cannot reproduce exactly (the message says which).
    """
    check_image_processor(image_processor)
    if isinstance(model, PrunedViTPreTrainedModel):
        if image_processor is not None:
            model.image_processor = image_processor
        return model
    if type(model) in HF_SOURCES:
        return convert_hf(model, image_processor)
    if type(model).__module__.startswith("timm."):
        from .timm import TIMM_SOURCES, convert_timm

        if type(model) in TIMM_SOURCES:
            return convert_timm(model, image_processor)
    raise TypeError(
        f"to_pruned_vit does not support {type(model).__module__}.{type(model).__qualname__}; "
        f"supported: {', '.join(SUPPORTED_SOURCES)}."
    )


__all__ = ["SUPPORTED_SOURCES", "from_lpvit_masks", "from_nvit_checkpoint", "from_savit_checkpoint", "to_pruned_vit"]

"""hf_vitprune: structured pruning of Vision Transformers for the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_pruned_vit import PrunedViTConfig
from .convert import to_pruned_vit
from .cost import count_macs, count_params
from .modeling_pruned_vit import (
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
    PrunedViTModel,
    PrunedViTPreTrainedModel,
)
from .pruner import prune
from .structure import PruningPlan

__version__ = "0.1.0"

AutoConfig.register(PrunedViTConfig.model_type, PrunedViTConfig, exist_ok=True)
AutoModel.register(PrunedViTConfig, PrunedViTModel, exist_ok=True)
# Both classifiers: the Auto class picks the one named in `config.architectures` (DeiT-style models have two heads).
AutoModelForImageClassification.register(
    PrunedViTConfig,
    (PrunedViTForImageClassification, PrunedViTForImageClassificationWithTeacher),
    exist_ok=True,
)
# `save_pretrained` then copies the two flat modeling files and writes `auto_map` for trust_remote_code users.
PrunedViTConfig.register_for_auto_class()
PrunedViTModel.register_for_auto_class("AutoModel")
PrunedViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
PrunedViTForImageClassificationWithTeacher.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "PrunedViTConfig",
    "PrunedViTForImageClassification",
    "PrunedViTForImageClassificationWithTeacher",
    "PrunedViTModel",
    "PrunedViTPreTrainedModel",
    "PruningPlan",
    "count_macs",
    "count_params",
    "prune",
    "to_pruned_vit",
]

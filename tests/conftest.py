"""Shared fixtures: tiny models built from configs; nothing here touches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_vitprune import PrunedViTConfig, PrunedViTForImageClassification  # noqa: E402


def tiny_config(**overrides) -> PrunedViTConfig:
    """A 3-block, 64-wide PrunedViT config on 32x32 images (17 tokens)."""
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
        layer_norm_eps=1e-6,
    )
    kwargs.update(overrides)
    return PrunedViTConfig(**kwargs)


@pytest.fixture
def tiny_model() -> PrunedViTForImageClassification:
    torch.manual_seed(0)
    return PrunedViTForImageClassification(tiny_config()).eval()


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

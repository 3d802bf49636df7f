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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread, and do not stall when other processes hold the cores; a module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RandomImages(torch.utils.data.Dataset):
    """`n` seeded random 32x32 images with labels, as dict examples (plus an `index` column with `extra_column`,
    as a `with_transform` dataset under `remove_unused_columns=False` has)."""

    def __init__(self, n: int = 8, extra_column: bool = False):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=generator)
        self.y = torch.randint(0, 10, (n,), generator=generator)
        self.extra_column = extra_column

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        example = {"pixel_values": self.x[i], "labels": self.y[i]}
        return {**example, "index": i} if self.extra_column else example

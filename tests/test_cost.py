"""The analytic cost model against torch's FLOP counter (MACs) and the models' parameters (exact)."""

import pytest
import torch
from conftest import tiny_config
from test_modeling import IRREGULAR
from torch.utils.flop_counter import FlopCounterMode

from hf_vitprune import (
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
    PrunedViTModel,
    count_macs,
    count_params,
)
from hf_vitprune.cost import CostBreakdown, block_cost

# heads, Q/K vs V dims, MLP widths and block dims all differ per block; DeiT token and average pooling
IRREGULAR_DISTILLED = dict(IRREGULAR, use_distillation_token=True, pooling="avg")


def build(cls, **overrides):
    torch.manual_seed(0)
    model = cls(tiny_config(**overrides)).eval()
    model.set_attn_implementation("eager")  # FlopCounterMode does not see CPU SDPA's matmuls
    return model


MODELS = {
    "dense": lambda: build(PrunedViTForImageClassification),
    "irregular": lambda: build(PrunedViTForImageClassification, **IRREGULAR_DISTILLED),
    "teacher": lambda: build(PrunedViTForImageClassificationWithTeacher, **IRREGULAR_DISTILLED),
    "model_with_pooler": lambda: build(PrunedViTModel, **IRREGULAR, pooler_output_size=48),
}


def measured_macs(model, batch_size: int) -> CostBreakdown:
    """FLOPs / 2 counted by torch while running the model, split like `count_macs(by_block=True)`."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(batch_size, 3, 32, 32))
    per_module = {name: sum(counts.values()) // 2 for name, counts in counter.get_flop_counts().items()}
    prefix = type(model).__name__ + (".vit" if hasattr(model, "vit") else "")
    embeddings = per_module[f"{prefix}.embeddings"]
    blocks = [per_module[f"{prefix}.layers.{i}"] for i in range(model.config.num_hidden_layers)]
    return CostBreakdown(embeddings, blocks, per_module["Global"] - embeddings - sum(blocks))


@pytest.mark.parametrize("name", MODELS)
def test_macs_match_flop_counter(name):
    model = MODELS[name]()
    analytic, measured = count_macs(model, by_block=True, batch_size=2), measured_macs(model, batch_size=2)
    assert analytic.total == pytest.approx(measured.total, rel=0.01)
    # part by part too: the head (pooler, classifiers) is too small to show in the total
    assert analytic.embeddings == pytest.approx(measured.embeddings, rel=0.01)
    assert analytic.blocks == pytest.approx(measured.blocks, rel=0.01)
    assert analytic.head == pytest.approx(measured.head, rel=0.01) and analytic.head > 0
    assert count_macs(model, batch_size=2) == 2 * count_macs(model)


@pytest.mark.parametrize("name", MODELS)
def test_params_are_exact(name):
    model = MODELS[name]()
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_config_counts_the_classification_heads():
    dense = tiny_config()
    assert count_params(dense) == count_params(MODELS["dense"]())
    assert count_macs(dense) == count_macs(MODELS["dense"]())
    distilled = tiny_config(**IRREGULAR_DISTILLED)  # a config with a DeiT token is counted as the WithTeacher model
    assert count_params(distilled) == count_params(MODELS["teacher"]())
    assert count_macs(distilled) == count_macs(MODELS["teacher"]())


def test_by_block_sums_to_total():
    config = tiny_config(**IRREGULAR)
    macs, params = count_macs(config, by_block=True, batch_size=3), count_params(config, by_block=True)
    for breakdown, total in ((macs, count_macs(config, batch_size=3)), (params, count_params(config))):
        assert isinstance(breakdown, CostBreakdown) and len(breakdown.blocks) == config.num_hidden_layers
        assert breakdown.embeddings + sum(breakdown.blocks) + breakdown.head == breakdown.total == total
    # block 1 is the narrow one (block_dim 40, 2 heads, MLP 64): it must cost least
    assert min(macs.blocks) == macs.blocks[1] and min(params.blocks) == params.blocks[1]


def test_block_cost_matches_one_layer():
    config = tiny_config(**IRREGULAR)
    layer = PrunedViTForImageClassification(config).vit.layers[1]
    cost = block_cost(17, 40, 2, 16, 8, 64, hidden_size=64)
    assert cost.params == sum(p.numel() for p in layer.parameters())
    tokens, width_qk, width_v = 17, 2 * 16, 2 * 8
    linears = tokens * (40 * (2 * width_qk + width_v) + width_v * 40 + 2 * 40 * 64)
    assert cost.macs == linears + tokens * tokens * (width_qk + width_v)
    assert (
        block_cost(17, 40, 2, 16, 8, 64, hidden_size=64, qkv_bias=False).params == cost.params - 2 * width_qk - width_v
    )


@pytest.mark.parametrize("value", [torch.nn.Linear(2, 2), "vit", None])
def test_bad_input_raises_type_error(value):
    with pytest.raises(TypeError, match="PrunedViTConfig"):
        count_macs(value)
    with pytest.raises(TypeError, match="PrunedViTForImageClassification"):
        count_params(value)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size_raises_value_error(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        count_macs(tiny_config(), batch_size=batch_size)

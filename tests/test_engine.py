"""The pruning engine: scorers, budgets, selection and `prune()`."""

import pytest
import torch
from conftest import tiny_config
from test_modeling import IRREGULAR, randomize

from hf_vitprune import PrunedViTForImageClassification, prune
from hf_vitprune.budget import Selector, make_budget
from hf_vitprune.cost import count_macs, count_params
from hf_vitprune.importance import fisher_scores, magnitude_scores, taylor_scores
from hf_vitprune.structure import enable_gates, remove_gates


def batches(n: int = 3, size: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
            "labels": torch.randint(0, 10, (size,), generator=generator),
        }
        for _ in range(n)
    ]


class Exploding:
    """A dataloader that fails if anything iterates it: proves checks happen before scoring."""

    def __iter__(self):
        raise AssertionError("the data was read before the arguments were checked")


def test_magnitude_scores_match_a_hand_computation():
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    attn = model.vit.layers[1].attention
    mlp = model.vit.layers[1].mlp
    scores = magnitude_scores(model, ("head", "qk", "v", "mlp", "channel"), p=2)
    d = 16
    head2 = torch.cat(
        [
            attn.q_proj.weight[2 * d : 3 * d].flatten(),
            attn.k_proj.weight[2 * d : 3 * d].flatten(),
            attn.v_proj.weight[2 * d : 3 * d].flatten(),
            attn.o_proj.weight[:, 2 * d : 3 * d].flatten(),
        ]
    )
    torch.testing.assert_close(scores["head"][1][2], head2.norm(), rtol=1e-5, atol=0)
    qk5 = torch.cat(
        [attn.q_proj.weight[h * d + 5] for h in range(4)] + [attn.k_proj.weight[h * d + 5] for h in range(4)]
    )
    torch.testing.assert_close(scores["qk"][1][5], qk5.norm(), rtol=1e-5, atol=0)
    neuron = torch.cat([mlp.fc1.weight[7], mlp.fc2.weight[:, 7]])
    torch.testing.assert_close(scores["mlp"][1][7], neuron.norm(), rtol=1e-5, atol=0)
    assert [s.shape[0] for s in scores["channel"]] == [64, 64, 64]


def test_taylor_is_the_mean_of_squared_gate_gradients():
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)))
    data = batches()
    scores = taylor_scores(model, data, ("head", "mlp", "embed"))
    expected_head, expected_embed = torch.zeros(2), torch.zeros(64)
    for batch in data:
        gates = enable_gates(model, ("head", "embed"))
        loss = model(**batch).loss
        head_grad, embed_grad = torch.autograd.grad(loss, [gates["head"][1], gates["embed"][0]])
        expected_head += head_grad.square() / len(data)
        expected_embed += embed_grad.square() / len(data)
        remove_gates(model)
    torch.testing.assert_close(scores["head"][1], expected_head, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(scores["embed"][0], expected_embed, rtol=1e-4, atol=1e-10)
    assert model.vit.embed_gate is None  # gates are removed after scoring


def test_fisher_uses_per_sample_gradients():
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    data = batches(n=1, size=3)
    fisher = fisher_scores(model, data, ("mlp",), micro_batch_size=1)
    expected = torch.zeros(128)
    for i in range(3):
        gates = enable_gates(model, ("mlp",))
        loss = model(pixel_values=data[0]["pixel_values"][i : i + 1], labels=data[0]["labels"][i : i + 1]).loss
        (grad,) = torch.autograd.grad(loss, [gates["mlp"][0]])
        expected += grad.square() / 3
        remove_gates(model)
    torch.testing.assert_close(fisher["mlp"][0], expected, rtol=1e-4, atol=1e-10)
    taylor = taylor_scores(model, data, ("mlp",))
    assert not torch.allclose(taylor["mlp"][0], fisher["mlp"][0])


@pytest.mark.parametrize("scope", ["global", "uniform"])
@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.3])
def test_selection_meets_the_target_with_aligned_dims(scope, ratio):
    model = randomize(PrunedViTForImageClassification(tiny_config(num_attention_heads=8, qk_head_dim=8, v_head_dim=8)))
    scores = magnitude_scores(model, ("embed", "head", "qk", "v", "mlp"))
    budget = make_budget(target_macs_ratio=ratio)
    round_to = {"embed": 8, "head": 2, "qk": 4, "v": 4, "mlp": 16}
    selector = Selector(model, budget, ("embed", "head", "qk", "v", "mlp"), round_to)
    plan = selector.select(scores, scope=scope)
    dense = count_macs(model.config)
    achieved = selector.cost(plan)
    assert achieved <= ratio * dense
    assert achieved >= (ratio - 0.15) * dense  # not wildly over-pruned
    for kind, g in round_to.items():
        for kept, size in zip(plan.num_kept(kind), plan.sizes[kind]):
            assert kept >= 1 and (size - kept) % g == 0
    if scope == "global":  # minimal: the kept units of each layer are its highest-scoring ones
        for kind in round_to:
            for layer, size in enumerate(plan.sizes[kind]):
                kept = plan.kept(kind, layer)
                removed = sorted(set(range(size)) - set(kept))
                if removed:
                    assert scores[kind][layer][removed].max() <= scores[kind][layer][kept].min() + 1e-12


def test_unreachable_target_fails_before_scoring():
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    with pytest.raises(ValueError, match="unreachable"):
        prune(model, "taylor", target_macs_ratio=0.02, dataloader=Exploding(), kinds=("mlp",))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="obd", target_macs_ratio=0.5), ValueError, "method must be one of"),
        (
            dict(method="magnitude", target_macs_ratio=1.5),
            ValueError,
            r"target_macs_ratio must be a number in \(0, 1\)",
        ),
        (dict(method="magnitude", target_macs_ratio=0.0), ValueError, r"\(0, 1\)"),
        (dict(method="magnitude"), ValueError, "give exactly one of"),
        (dict(method="taylor", target_macs_ratio=0.5), ValueError, "data-driven: pass a dataloader"),
        (dict(method="magnitude", target_macs_ratio=0.5, kinds=("heads",)), ValueError, "kinds must be"),
        (dict(method="magnitude", target_macs_ratio=0.5, colour="red"), TypeError, "unknown options"),
        (dict(method="magnitude", target_macs_ratio=0.5, scope="local"), ValueError, "scope must be one of"),
    ],
)
def test_prune_rejects_bad_input_clearly(kwargs, error, match):
    model = PrunedViTForImageClassification(tiny_config())
    with pytest.raises(error, match=match):
        prune(model, **kwargs)


def test_prune_hf_vit_with_taylor_returns_a_compact_model(pixel_values):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    source = ViTForImageClassification(
        ViTConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            num_labels=10,
        )
    ).eval()
    pruned, plan = prune(source, "taylor", target_macs_ratio=0.5, dataloader=batches(), return_plan=True)
    record = pruned.config.pruning
    assert record["method"] == "taylor" and record["macs"] == count_macs(pruned.config)
    assert record["macs"] <= 0.5 * record["dense_macs"] and record["params"] == count_params(pruned)
    assert isinstance(pruned, PrunedViTForImageClassification)
    assert pruned(pixel_values).logits.shape == (2, 10)
    assert plan.num_kept("head") == pruned.config.heads_per_layer


def test_prune_by_params_ratio():
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    pruned = prune(model, "magnitude", target_params_ratio=0.6, kinds=("head", "mlp"))
    assert count_params(pruned) <= 0.6 * count_params(model)


def test_default_round_to_keeps_widths_aligned():
    """Methods keep every pruned width a multiple of 8 unless told otherwise (heads go one by one)."""
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    kinds = ("embed", "head", "qk", "v", "mlp")
    pruned = prune(model, "magnitude", target_macs_ratio=0.4, kinds=kinds)
    config = pruned.config
    widths = [config.hidden_size, *config.qk_head_dims, *config.v_head_dims, *config.intermediate_sizes]
    assert all(w % 8 == 0 for w in widths) and count_macs(pruned) <= 0.4 * count_macs(model)
    unaligned = prune(model, "magnitude", target_macs_ratio=0.4, kinds=kinds, round_to=1).config
    assert [unaligned.hidden_size, *unaligned.intermediate_sizes] != [config.hidden_size, *config.intermediate_sizes]


def test_uniform_scope_steps_kind_by_kind():
    """At f = 1/4 the embedding's second group of 8 and the first of 4 heads are due together: a target that the
    embedding step meets keeps every head (a fraction for all kinds at once would take a head per block too)."""
    model = randomize(PrunedViTForImageClassification(tiny_config()))  # embed 64, 4 heads, MLP 128, 3 blocks
    geometry = tiny_config(hidden_size=48, intermediate_size=104, qk_head_dim=16, v_head_dim=16)
    reachable = count_macs(geometry) / count_macs(model)
    pruned = prune(model, "magnitude", target_macs_ratio=reachable + 1e-6).config
    assert (pruned.hidden_size, pruned.heads_per_layer, pruned.intermediate_sizes) == (48, [4] * 3, [104] * 3)

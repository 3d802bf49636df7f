"""NViT: saliency, grouping, one-shot and Trainer schedules, latency tables, checkpoint conversion, ReViT."""

import argparse
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import RandomImages, tiny_config
from helpers import run_one_and_two_processes
from test_modeling import IRREGULAR, randomize

from hf_vitprune import PrunedViTForImageClassification, PrunedViTForImageClassificationWithTeacher, prune
from hf_vitprune.budget import make_budget
from hf_vitprune.convert import from_nvit_checkpoint
from hf_vitprune.cost import count_macs, count_params
from hf_vitprune.latency import AXES, LatencyTable
from hf_vitprune.methods import get_method
from hf_vitprune.methods.nvit import (
    NVIT_CRITERION_SCALE,
    NViTCallback,
    NViTConfig,
    criterion_sums,
    nvit_group_sizes,
    revit_config,
    zero_pruned_units,
)
from hf_vitprune.methods.nvit.grouping import layer_groups, pruning_step
from hf_vitprune.structure import PruningPlan, apply_masks, enable_gates, remove_gates

KINDS = ("embed", "head", "qk", "v", "mlp")


def batches(n: int, size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
            "labels": torch.randint(0, 10, (size,), generator=generator),
        }
        for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------------------- saliency


def hand_sums(model, grads: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """NViT's criterion sums written out unit by unit with explicit loops over named parameters (spec §2.2)."""
    params = dict(model.named_parameters())
    config = model.config

    def wg(name: str, index=...) -> float:
        return float((params[name][index] * grads[name][index]).detach().sum())

    out = {kind: [] for kind in KINDS}
    embed = [wg("vit.embeddings.patch_embeddings.projection.weight", c) for c in range(64)]
    embed = [e + wg("vit.embeddings.patch_embeddings.projection.bias", c) for c, e in enumerate(embed)]
    for i in range(config.num_hidden_layers):
        p = f"vit.layers.{i}."
        heads, qk, v = config.heads_per_layer[i], config.qk_head_dims[i], config.v_head_dims[i]
        head = []
        for h in range(heads):
            total = 0.0
            for proj, d in (("q_proj", qk), ("k_proj", qk), ("v_proj", v)):
                rows = slice(h * d, (h + 1) * d)
                total += wg(f"{p}attention.{proj}.weight", rows) + wg(f"{p}attention.{proj}.bias", rows)
            head.append(total / 12)
        out["head"].append(torch.tensor(head))
        qk_sums = []
        for j in range(qk):
            rows = [h * qk + j for h in range(heads)]
            qk_sums.append((wg(f"{p}attention.q_proj.weight", rows) + wg(f"{p}attention.q_proj.bias", rows)) / 2)
        out["qk"].append(torch.tensor(qk_sums))
        v_sums = []
        for j in range(v):
            rows = [h * v + j for h in range(heads)]
            v_sums.append((wg(f"{p}attention.v_proj.weight", rows) + wg(f"{p}attention.v_proj.bias", rows)) / 2)
        out["v"].append(torch.tensor(v_sums))
        size = config.intermediate_sizes[i]
        out["mlp"].append(torch.tensor([wg(f"{p}mlp.fc1.weight", m) + wg(f"{p}mlp.fc1.bias", m) for m in range(size)]))
        index = model.vit.layers[i].channel_index
        for position in range(config.block_dims[i]):
            c = int(index[position]) if index is not None else position
            column = (slice(None), position)
            for proj in ("q_proj", "k_proj", "v_proj"):
                embed[c] += wg(f"{p}attention.{proj}.weight", column)
            embed[c] += wg(f"{p}mlp.fc1.weight", column)
            for linear in ("attention.o_proj", "mlp.fc2"):
                embed[c] += wg(f"{p}{linear}.weight", position) + wg(f"{p}{linear}.bias", position)
    out["embed"].append(torch.tensor(embed) / 12)
    return out


def test_criterion_sums_match_a_hand_computation_and_qk_v_gate_gradients():
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)), seed=3)
    gates = enable_gates(model, ("qk", "v"))
    model(**batches(1)[0]).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    sums = criterion_sums(model, lambda p: p.grad, KINDS, NVIT_CRITERION_SCALE)
    expected = hand_sums(model, grads)
    for kind in KINDS:
        for got, want in zip(sums[kind], expected[kind]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # Q/K and V criteria (Q only, V only, with biases) are exactly the gradients of the gates on q and v
    for kind, scale in (("qk", 0.5), ("v", 0.5)):
        for gate, got in zip(gates[kind], sums[kind]):
            torch.testing.assert_close(got, scale * gate.grad, atol=1e-7, rtol=1e-4)
    remove_gates(model)


def test_one_shot_saliency_is_the_mean_of_per_batch_squares():
    model = randomize(PrunedViTForImageClassification(tiny_config()), seed=1)
    data = batches(2)
    method = get_method("nvit")
    scores = method.score(model, data)
    assert all(p.grad is None for p in model.parameters())  # scoring leaves the model's gradients alone
    per_batch = []
    for batch in data:
        model.zero_grad()
        model(**batch).loss.backward()
        per_batch.append(criterion_sums(model, lambda p: p.grad, KINDS, NVIT_CRITERION_SCALE))
    for kind in KINDS:
        for layer, score in enumerate(scores[kind]):
            want = (per_batch[0][kind][layer].square() + per_batch[1][kind][layer].square()) / 2
            torch.testing.assert_close(score, want, atol=1e-10, rtol=1e-4)
            assert not torch.allclose(score, ((per_batch[0][kind][layer] + per_batch[1][kind][layer]) / 2).square())


# ---------------------------------------------------------------------------------------------------- grouping


def test_group_sizes_are_nvit_on_deit_b_and_scaled_for_small_models():
    deit_b = tiny_config(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072)
    assert nvit_group_sizes(deit_b) == {"embed": 16, "head": 2, "qk": 8, "v": 8, "mlp": 16}
    digits = tiny_config(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512)
    assert nvit_group_sizes(digits) == {"embed": 8, "head": 1, "qk": 8, "v": 8, "mlp": 8}
    assert NViTConfig(round_to={"mlp": 8}).group_sizes(digits)["mlp"] == 8
    assert NViTConfig(round_to=4).group_sizes(digits) == dict.fromkeys(KINDS, 4)


def test_layer_groups_sort_units_pruned_first_and_sum_groups():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 6.0])
    order, sums = layer_groups(scores, torch.ones(7, dtype=torch.bool), 2)
    assert order.tolist()[:6] == [3, 1, 5, 2, 4, 0] and sums.tolist() == [1.0, 5.0, 9.0]  # last group (+ rest) kept
    mask = torch.tensor([True, True, True, True, True, False, False])
    order, sums = layer_groups(scores * mask, mask, 2)
    assert set(order[:2].tolist()) == {5, 6} and sums.tolist()[0] == 0.0


def test_pruning_step_cumulative_threshold_and_exact_count():
    saliency = {"mlp": [torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0, 9.0]), torch.tensor([0.5, 8.0, 8.0, 8.0])]}
    masks = {"mlp": [torch.ones(6, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]}
    credits = {("mlp", 0): 0.0, ("mlp", 1): 0.1}
    # groups: layer 0: {0,1}=3, {2,3}=7; layer 1: {0,1}=8.5-0.2=8.3. NViT's first step: one group (the lowest).
    masks, new = pruning_step(saliency, masks, credits, {"mlp": 2}, 0, cumulative=True)
    assert new == 1 and masks["mlp"][0].tolist() == [False, False, True, True, True, True]
    # step 1: threshold = 2nd lowest of all groups, the pruned one included (0 then 7): one new group
    masks, new = pruning_step(saliency, masks, credits, {"mlp": 2}, 2, cumulative=True)
    assert new == 1 and masks["mlp"][0].tolist() == [False] * 4 + [True, True] and masks["mlp"][1].all()
    # a large credit pushes a layer's groups down the ranking (latency-aware)
    fresh = {"mlp": [torch.ones(6, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]}
    masks, new = pruning_step(saliency, fresh, {("mlp", 0): 0.0, ("mlp", 1): 5.0}, {"mlp": 2}, 0, True)
    assert new == 1 and not masks["mlp"][1][:2].any() and masks["mlp"][0].all()
    # exact mode: exactly `count` active groups
    masks, new = pruning_step(saliency, fresh, credits, {"mlp": 2}, 3, cumulative=False)
    assert new == 3 and int((~masks["mlp"][0]).sum()) == 4 and int((~masks["mlp"][1]).sum()) == 2


# ---------------------------------------------------------------------------------------------------- one-shot


def test_one_shot_prune_meets_the_macs_target_with_aligned_groups_and_exact_compaction(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config()), seed=2)
    pruned, plan = prune(model, "nvit", target_macs_ratio=0.5, dataloader=batches(2), return_plan=True)
    ratio = pruned.config.pruning["macs_ratio"]
    assert 0.4 < ratio <= 0.5
    sizes = nvit_group_sizes(model.config)
    for kind in KINDS:
        for kept, total in zip(plan.num_kept(kind), plan.sizes[kind]):
            assert (total - kept) % sizes[kind] == 0 and kept >= sizes[kind]
    apply_masks(model, plan)
    torch.testing.assert_close(pruned(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)


def test_the_plan_is_the_first_meeting_the_target():
    """NViT stops at the first model at or below the target: it overshoots by less than one group."""
    model = randomize(PrunedViTForImageClassification(tiny_config()), seed=4)
    method = get_method("nvit", round_to=2)
    budget = make_budget(target_macs_ratio=0.6)
    plan = method.select(model, method.score(model, batches(1)), budget)
    selector = method.selector(model, budget)
    largest_group = max(selector.group_costs().values())
    assert selector.target_cost - largest_group < selector.cost(plan) <= selector.target_cost


def test_config_validation():
    with pytest.raises(ValueError, match="kinds"):
        NViTConfig(kinds=("channel",))
    with pytest.raises(ValueError, match="scope"):
        NViTConfig(scope="uniform")
    with pytest.raises(ValueError, match="round_to"):
        NViTConfig(round_to={"mlp": 0})
    with pytest.raises(ValueError, match="latency_regularization"):
        NViTConfig(latency_regularization=-1)
    with pytest.raises(ValueError, match="criterion_scale"):
        NViTConfig(criterion_scale={"mlp": 0})
    with pytest.raises(ValueError, match="data-driven"):
        prune(PrunedViTForImageClassification(tiny_config()), "nvit", target_macs_ratio=0.5)
    with pytest.raises(ValueError, match="prune_every"):
        NViTCallback(target_macs_ratio=0.5, prune_every=0)


# ---------------------------------------------------------------------------------------------------- latency


def synthetic_table(tokens: int = 17) -> LatencyTable:
    """A table of the multilinear function 1e-3 + 1e-6 e (2 h qk + 2 h v + 2 m), so interpolation is exact."""
    axes = {"embed": [1, 32, 64], "heads": [1, 4], "qk": [1, 16], "v": [1, 32], "mlp": [1, 64, 128]}
    e, h, qk, v, m = torch.meshgrid(*(torch.tensor(axes[a], dtype=torch.float64) for a in AXES), indexing="ij")
    return LatencyTable(axes, (1e-3 + 1e-6 * e * (2 * h * qk + 2 * h * v + 2 * m)).numpy(), tokens=tokens, batch_size=1)


def test_latency_table_interpolates_saves_and_loads(tmp_path):
    table = synthetic_table()
    assert table.block(40, 3, 10, 7, 100) == pytest.approx(1e-3 + 1e-6 * 40 * (2 * 3 * 10 + 2 * 3 * 7 + 200))
    config = tiny_config(**IRREGULAR)  # block dims 64, 40, 64: each block is priced at the width it reads
    expected = sum(
        1e-3 + 1e-6 * e * (2 * h * q + 2 * h * v + 2 * m)
        for e, h, q, v, m in zip([64, 40, 64], [4, 2, 3], [8, 16, 8], [16, 8, 24], [128, 64, 96])
    )
    assert table(config) == pytest.approx(expected)
    with pytest.raises(ValueError, match="outside"):
        table.block(64, 5, 16, 16, 128)  # more heads than measured, as NViT's bounds_error
    with pytest.raises(ValueError, match="tokens"):
        table(tiny_config(image_size=16))
    table.save(tmp_path / "table.json")
    loaded = LatencyTable.load(tmp_path / "table.json")
    assert loaded.axes == table.axes and loaded.tokens == 17 and (loaded.seconds == table.seconds).all()
    assert loaded(config) == pytest.approx(expected)
    table.overhead = 2e-3  # the model outside its blocks: added once per model, kept by save/load
    table.save(tmp_path / "table.json")
    assert LatencyTable.load(tmp_path / "table.json")(config) == pytest.approx(expected + 2e-3)
    with pytest.raises(ValueError, match="overhead"):
        LatencyTable(table.axes, table.seconds, tokens=17, batch_size=1, overhead=-1.0)


def test_latency_table_measures_real_blocks():
    config = tiny_config()
    grid = {"embed": [8, 64], "heads": [1, 4], "qk": [1, 16], "v": [1, 16], "mlp": [1, 128]}
    table = LatencyTable.measure(config, batch_size=2, grid=grid, repeats=1, warmup=0)
    assert table.seconds.shape == (2, 2, 2, 2, 2) and (table.seconds > 0).all()
    assert table.tokens == 17 and table.metadata["device"] == "cpu" and table(config) > 0
    blocks = table(config) - table.overhead
    assert 0 <= table.overhead <= 9 * blocks  # a measured share of the dense model's time, at most 90 %
    with pytest.raises(ValueError, match="does not cover the config's mlp=128"):
        LatencyTable.measure(config, batch_size=2, grid={**grid, "mlp": [1, 64]}, repeats=1, warmup=0)
    assert LatencyTable.measure(config, batch_size=1, grid=2, repeats=1, warmup=0).axes["mlp"] == [1, 128]


def test_latency_table_reads_nvit_json(tmp_path):
    data = {
        f"EMB_{e}": {
            f"QK_{h}_{q}": {f"V_{v}": {f"MLP_{m}": e * (h * (q + v) + m) * 1e-9 for m in (1, 128)} for v in (1, 64)}
            for h in (1, 12)
            for q in (1, 64)
        }
        for e in (256, 768)
    }
    (tmp_path / "latency_head.json").write_text(json.dumps(data))
    table = LatencyTable.from_nvit_json(tmp_path / "latency_head.json")
    assert table.axes == {"embed": [0, 256, 768], "heads": [1, 12], "qk": [1, 64], "v": [1, 64], "mlp": [0, 128]}
    assert table.block(768, 12, 64, 64, 128) == pytest.approx(768 * (12 * 128 + 128) * 1e-9)
    assert table.block(0, 12, 64, 64, 128) == 0.0  # NViT's synthetic EMB = 0 slice
    # MLP = 0 reads the MLP_1 measurement
    assert table.block(256, 1, 1, 1, 0) == pytest.approx(256 * (1 * (1 + 1) + 1) * 1e-9)
    assert table.tokens == 198


def test_latency_target_with_a_table():
    model = randomize(PrunedViTForImageClassification(tiny_config(num_attention_heads=4)), seed=5)
    table = synthetic_table()
    pruned = prune(model, "nvit", target_latency_ratio=0.6, latency_model=table, dataloader=batches(1))
    assert table(pruned.config) <= 0.6 * table(model.config)
    assert pruned.config.pruning["target"] == {"latency": 0.6}


# ---------------------------------------------------------------------------------------------------- Trainer


def train(model, callback, tmp_path, max_steps: int):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        per_device_train_batch_size=8,
        max_steps=max_steps,
        learning_rate=1e-3,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(32), callbacks=[callback])
    trainer.train()
    return trainer


def test_callback_prunes_to_the_target_in_trainer_and_compacts_exactly(tmp_path, pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config()), seed=6).train()
    callback = NViTCallback(target_macs_ratio=0.6, prune_every=2, groups_per_step=2, stop_training_at_target=True)
    trainer = train(model, callback, tmp_path, max_steps=60)
    assert callback.reached and callback.pruning_steps >= 2
    assert trainer.state.global_step == 2 * callback.pruning_steps < 60  # stopped at the step reaching the target
    model = trainer.model.eval()
    pruned = callback.compact(model)
    assert pruned.config.pruning["macs_ratio"] <= 0.6 and pruned.config.pruning["method"] == "nvit"
    torch.testing.assert_close(pruned(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)
    # pruned weights were re-zeroed after the optimizer steps
    for i, layer in enumerate(model.vit.layers):
        gone = ~callback.plan.mask("mlp", i)
        assert layer.mlp.fc1.weight[gone].abs().sum() == 0 and layer.mlp.fc2.weight[:, gone].abs().sum() == 0
    assert model.vit.embeddings.position_embeddings[..., ~callback.plan.mask("embed", 0)].abs().sum() == 0


def test_callback_keeps_training_with_masks_after_the_target(tmp_path):
    model = randomize(PrunedViTForImageClassification(tiny_config()), seed=7).train()
    callback = NViTCallback(target_macs_ratio=0.8, prune_every=1, groups_per_step=8, cumulative_ranking=False)
    trainer = train(model, callback, tmp_path, max_steps=8)
    assert callback.reached and trainer.state.global_step == 8
    assert count_macs(callback.compact(trainer.model)) <= 0.8 * count_macs(model)


def test_saliency_momentum_code_and_bias_corrected():
    model = PrunedViTForImageClassification(tiny_config())
    for correction, expected in ((False, [1.0, 0.2, 0.9 * 0.2 + 0.1 * 3]), (True, [1.0, (0.09 + 0.2) / 0.19, None])):
        callback = NViTCallback(target_macs_ratio=0.9, kinds=("mlp",), bias_correction=correction)
        callback.on_train_begin(None, None, None, model=model)
        for step, value in enumerate([1.0, 2.0, 3.0]):
            callback.accumulator.add({"mlp": [torch.full((128,), math.sqrt(value))] * 3})
            average = callback._saliency_average()
            callback.pruning_steps += 1
            if expected[step] is not None:
                assert average["mlp"][0][0].item() == pytest.approx(expected[step])


def test_zero_pruned_units_keeps_the_masked_function(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)), seed=8)
    plan = PruningPlan.full(model.config)
    plan.keep["embed"] = [list(range(0, 64, 2))]
    plan.keep["head"] = [[0, 2], [1], [0, 1, 2]]
    plan.keep["v"] = [list(range(8)), list(range(4)), list(range(24))]
    plan.keep["mlp"] = [list(range(100)), list(range(64)), list(range(10))]
    apply_masks(model, plan)
    before = model(pixel_values).logits
    zero_pruned_units(model, plan)
    torch.testing.assert_close(model(pixel_values).logits, before, atol=1e-5, rtol=0)
    assert model.vit.layers[0].attention.o_proj.weight[:, 16:32].abs().sum() == 0  # pruned head 1's columns
    assert model.classifier.weight[:, 1::2].abs().sum() == 0


# ---------------------------------------------------------------------------------------------------- 2 processes

BODY = """
from test_modeling import randomize
from test_nvit import batches
from conftest import tiny_config
from hf_vitprune import PrunedViTForImageClassification
from hf_vitprune.budget import make_budget
from hf_vitprune.methods import get_method
from hf_vitprune.methods.nvit import NViTCallback

shard = batches(4)[rank::world]
model = randomize(PrunedViTForImageClassification(tiny_config()), seed=9)
method = get_method("nvit")
scores = method.score(model, shard)
plan = method.select(model, scores, make_budget(target_macs_ratio=0.5))
# the callback's step: gradients of this rank's batches, saliency all-reduced before ranking
callback = NViTCallback(target_macs_ratio=0.5, groups_per_step=5, cumulative_ranking=False)
callback.on_train_begin(None, None, None, model=model)
for batch in shard:
    model.zero_grad()
    model(**batch).loss.backward()
    callback.on_optimizer_step(None, None, None, model=model)
callback.prune_step(model)
result = {"plan": plan.to_dict(), "step": callback.plan.to_dict(), "head": scores["head"][1].tolist()}
"""


@pytest.mark.distributed
def test_two_processes_choose_the_groups_of_one_process_on_all_data(tmp_path):
    one, a, b = run_one_and_two_processes(BODY, tmp_path)
    assert a["plan"] == b["plan"] == one["plan"] and a["step"] == b["step"] == one["step"]
    assert a["step"] != PruningPlan.full(tiny_config()).to_dict()
    for x, y in zip(a["head"], one["head"]):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-12)


# ---------------------------------------------------------------------------------------------------- checkpoints

E, H, D, M, DEPTH, P, C, CLASSES = 32, 4, 8, 48, 2, 4, 3, 5  # tiny NViT: 8x8 images, 4 patches, 6 tokens
TOKENS = (8 // P) ** 2 + 2


def masked_state(seed: int, prune_embed: bool) -> dict[str, torch.Tensor]:
    """A `pruned_checkpoint.pth` 'model' in NViT's masked layout (spec §11.1), pruned units zeroed as §1.3."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    s = {
        "cls_token": r(1, 1, E),
        "dist_token": r(1, 1, E),
        "pos_embed": r(1, TOKENS, E),
        "patch_embed.proj.weight": r(E, P * P * C, 1, 1),
        "patch_embed.proj.bias": r(E),
        "norm.weight": 1 + r(E),
        "norm.bias": r(E),
        "head.weight": r(CLASSES, E),
        "head.bias": r(CLASSES),
        "head_dist.weight": r(CLASSES, E),
        "head_dist.bias": r(CLASSES),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        s.update({f"{b}norm1.weight": 1 + r(E), f"{b}norm1.bias": r(E), f"{b}norm2.weight": 1 + r(E)})
        s.update({f"{b}norm2.bias": r(E), f"{b}attn.qkv.token_mask": 1 + r(TOKENS, 1)})
        s[f"{b}attn.qkv.head_mask.weight"] = 1 + r(H, 1)
        for proj in "QKV":
            s[f"{b}attn.qkv.{proj}.weight"], s[f"{b}attn.qkv.{proj}.bias"] = r(D, E, H), r(D, H)
        s.update({f"{b}attn.proj.weight": r(E, D, H), f"{b}attn.proj.bias": r(E)})
        s.update({f"{b}mlp.fc1.weight": r(M, E), f"{b}mlp.fc1.bias": r(M)})
        s.update({f"{b}mlp.fc2.weight": r(E, M), f"{b}mlp.fc2.bias": r(E)})
    # prune: block 0 head 1, QK index 3, V index 5, 16 MLP neurons; block 1 head 2 and 3; embed channels 0-7
    for i, heads, qk, v in ((0, [1], [3], [5]), (1, [2, 3], [0, 7], [])):
        b = f"blocks.{i}.attn."
        for h in heads:
            s[f"{b}qkv.head_mask.weight"][h] = 0
            for proj in "QKV":
                s[f"{b}qkv.{proj}.weight"][:, :, h] = 0
                s[f"{b}qkv.{proj}.bias"][:, h] = 0
            s[f"{b}proj.weight"][:, :, h] = 0
        for j in qk:
            for proj in "QK":
                s[f"{b}qkv.{proj}.weight"][j] = 0
                s[f"{b}qkv.{proj}.bias"][j] = 0
        for j in v:
            s[f"{b}qkv.V.weight"][j] = 0
            s[f"{b}qkv.V.bias"][j] = 0
            s[f"{b}proj.weight"][:, j] = 0
    s["blocks.0.mlp.fc1.weight"][:16] = 0
    s["blocks.0.mlp.fc1.bias"][:16] = 0
    s["blocks.0.mlp.fc2.weight"][:, :16] = 0
    if prune_embed:
        c = slice(0, 8)
        for key in ("cls_token", "dist_token", "pos_embed"):
            s[key][..., c] = 0
        for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
            s[key][c] = 0
        for key in ("head.weight", "head_dist.weight"):
            s[key][:, c] = 0
        for i in range(DEPTH):
            b = f"blocks.{i}."
            for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"):
                s[b + key][c] = 0
            for proj in "QKV":
                s[f"{b}attn.qkv.{proj}.weight"][:, c] = 0
            s[f"{b}attn.proj.weight"][c] = 0
            s[f"{b}mlp.fc1.weight"][:, c] = 0
            s[f"{b}mlp.fc2.weight"][c] = 0
    return s


def reference_forward(state: dict, x: torch.Tensor, dim: dict | None, scale: float) -> torch.Tensor:
    """NViT's DistilledVisionTransformer (dim None: masked, spec §5.1) or _small (dense, §5.2), written from the spec
    with einsum and einops-style reshapes; returns the mean of the two heads' logits."""
    b, c, height, width = x.shape
    w = state["patch_embed.proj.weight"]
    p = math.isqrt(w.shape[1] // c)
    # b c (h p1) (w p2) -> b (p1 p2 c) h w, then the 1x1 conv
    patches = (
        x.reshape(b, c, height // p, p, width // p, p).permute(0, 3, 5, 1, 2, 4).reshape(b, -1, height // p, width // p)
    )
    tokens = F.conv2d(patches, w, state["patch_embed.proj.bias"]).flatten(2).transpose(1, 2)
    emb = w.shape[0]
    h = torch.cat([state["cls_token"].expand(b, -1, -1), state["dist_token"].expand(b, -1, -1), tokens], 1)
    h = h + state["pos_embed"]

    def ln(t, name):
        return F.layer_norm(t, (emb,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    for i in range(sum(k.endswith("norm1.weight") for k in state)):
        blk = f"blocks.{i}."
        t = ln(h, blk + "norm1")
        token_mask = state[blk + "attn.qkv.token_mask"]  # [N, 1]
        if dim is None:
            mask = state[blk + "attn.qkv.head_mask.weight"].reshape(-1)  # [H]
            qkv = [
                (
                    torch.einsum("bne,deh->bnhd", t, state[f"{blk}attn.qkv.{n}.weight"])
                    + state[f"{blk}attn.qkv.{n}.bias"].t()
                )
                * mask[:, None]
                * token_mask[:, :, None]
                for n in "QKV"
            ]
        else:
            heads = dim["head"][i]
            qkv = [
                ((t @ state[f"{blk}attn.qkv.{n}.weight"].t() + state[f"{blk}attn.qkv.{n}.bias"]) * token_mask).reshape(
                    b, t.shape[1], heads, -1
                )
                for n in "QKV"
            ]
        q, k, v = (z.transpose(1, 2) for z in qkv)  # [B, H, N, d]
        attn = (q @ k.transpose(-2, -1) * scale).softmax(-1)
        out = (attn @ v).transpose(1, 2)  # [B, N, H, dv]
        if dim is None:
            out = torch.einsum("bnhv,evh->bne", out, state[blk + "attn.proj.weight"]) + state[blk + "attn.proj.bias"]
        else:
            out = (
                out.reshape(b, t.shape[1], -1) @ state[blk + "attn.proj.proj.weight"].t()
                + state[blk + "attn.proj.proj.bias"]
            )
        h = h + out
        t = F.gelu(ln(h, blk + "norm2") @ state[blk + "mlp.fc1.weight"].t() + state[blk + "mlp.fc1.bias"])
        h = h + t @ state[blk + "mlp.fc2.weight"].t() + state[blk + "mlp.fc2.bias"]
    h = ln(h, "norm")
    cls = h[:, 0] @ state["head.weight"].t() + state["head.bias"]
    dist = h[:, 1] @ state["head_dist.weight"].t() + state["head_dist.bias"]
    return (cls + dist) / 2


def nvit_finetune_dense(state: dict) -> tuple[dict, dict]:
    """NViT's finetune_dense.py conversion (spec §5.3): index-select by the zero patterns, head mask folded."""
    emb = state["patch_embed.proj.weight"].reshape(E, -1).ne(0).any(1)
    out = {k: v[..., emb] for k, v in state.items() if k in ("cls_token", "dist_token", "pos_embed")}
    for k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
        out[k] = state[k][emb]
    for k in ("head", "head_dist"):
        out[f"{k}.weight"], out[f"{k}.bias"] = state[f"{k}.weight"][:, emb], state[f"{k}.bias"]
    dim = {"EMB": int(emb.sum()), "head": [], "QK": [], "V": [], "MLP": []}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc2.bias", "attn.qkv.token_mask"):
            out[b + k] = state[b + k][emb] if "token" not in k else state[b + k]
        mlp = state[b + "mlp.fc1.weight"].ne(0).any(1)
        out[b + "mlp.fc1.weight"] = state[b + "mlp.fc1.weight"][mlp][:, emb]
        out[b + "mlp.fc1.bias"] = state[b + "mlp.fc1.bias"][mlp]
        out[b + "mlp.fc2.weight"] = state[b + "mlp.fc2.weight"][emb][:, mlp]
        mask = state[b + "attn.qkv.head_mask.weight"].reshape(-1)
        folded = {}
        for n in "QKV":  # fold, then (h d) e rows
            weight = state[f"{b}attn.qkv.{n}.weight"] * mask
            bias = state[f"{b}attn.qkv.{n}.bias"] * mask
            folded[n] = (
                torch.stack([weight[:, :, h] for h in range(H)]).reshape(H * D, E),
                torch.stack([bias[:, h] for h in range(H)]).reshape(H * D),
            )
        qk_rows = folded["Q"][0].ne(0).any(1)
        v_rows = folded["V"][0].ne(0).any(1)
        heads = int(folded["Q"][0].reshape(H, D, E).ne(0).any(2).any(1).sum())
        dim["head"].append(heads)
        dim["QK"].append(int(qk_rows.sum()) // heads)
        dim["V"].append(int(v_rows.sum()) // heads)
        dim["MLP"].append(int(mlp.sum()))
        for n, rows in (("Q", qk_rows), ("K", qk_rows), ("V", v_rows)):
            out[f"{b}attn.qkv.{n}.weight"] = folded[n][0][rows][:, emb]
            out[f"{b}attn.qkv.{n}.bias"] = folded[n][1][rows]
        proj = torch.stack([state[b + "attn.proj.weight"][:, :, h] for h in range(H)], 1).reshape(E, H * D)
        out[b + "attn.proj.proj.weight"] = proj[emb][:, v_rows]
        out[b + "attn.proj.proj.bias"] = state[b + "attn.proj.bias"][emb]
    return out, dim


def save_checkpoint(path, state: dict, dim: dict | None = None) -> None:
    """NViT's training-script checkpoint: model, EMA, optimizer, scheduler, epoch, scaler, argparse args."""
    checkpoint = {
        "model": state,
        "model_ema": {k: v.clone() for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="deit_base_distilled_patch16_224", lr=1e-4, latency_target=0.54),
    }
    if dim is not None:
        checkpoint["dim"] = dim
    torch.save(checkpoint, path)


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, C, 8, 8, generator=torch.Generator().manual_seed(11))


def test_masked_checkpoint_converts_exactly_when_no_embedding_channel_is_pruned(tmp_path, caplog):
    state = masked_state(0, prune_embed=False)
    save_checkpoint(tmp_path / "pruned_checkpoint.pth", state)
    with caplog.at_level(logging.WARNING):
        model = from_nvit_checkpoint(tmp_path / "pruned_checkpoint.pth")
    assert "argparse.Namespace" in caplog.text  # the pickled args were skipped, not executed
    assert isinstance(model, PrunedViTForImageClassificationWithTeacher)
    config = model.config
    assert config.heads_per_layer == [3, 2] and config.qk_head_dims == [7, 6] and config.v_head_dims == [7, 8]
    assert (
        config.intermediate_sizes == [32, 48] and config.hidden_size == E and config.attention_scales == [D**-0.5] * 2
    )
    assert config.qkv_token_scale and config.use_distillation_token and config.layer_norm_eps == 1e-6
    x = images()
    want = reference_forward(state, x, None, D**-0.5)
    torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=1e-5)


def test_masked_checkpoint_with_embedding_pruning_equals_nvits_dense_conversion(tmp_path):
    state = masked_state(1, prune_embed=True)
    save_checkpoint(tmp_path / "pruned_checkpoint.pth", state)
    model = from_nvit_checkpoint(tmp_path / "pruned_checkpoint.pth")
    dense, dim = nvit_finetune_dense(state)
    assert model.config.hidden_size == dim["EMB"] == E - 8
    assert model.config.heads_per_layer == dim["head"] and model.config.qk_head_dims == dim["QK"]
    assert model.config.v_head_dims == dim["V"] and model.config.intermediate_sizes == dim["MLP"]
    x = images()
    torch.testing.assert_close(model(x).logits, reference_forward(dense, x, dim, D**-0.5), atol=1e-5, rtol=1e-5)
    # NViT's masked model normalises over all channels, so it differs (spec §5.3); ours is the dense conversion
    assert not torch.allclose(model(x).logits, reference_forward(state, x, None, D**-0.5), atol=1e-3)


def test_dense_ft_checkpoint_converts_exactly_and_round_trips(tmp_path):
    dense, dim = nvit_finetune_dense(masked_state(2, prune_embed=True))
    save_checkpoint(tmp_path / "ft_checkpoint.pth", dense, dim)
    model = from_nvit_checkpoint(tmp_path / "ft_checkpoint.pth")
    assert model.config.attention_scales == [0.125, 0.125]  # NViT's dense attention: fixed 64^-0.5
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    x = images()
    logits = model(x).logits
    torch.testing.assert_close(logits, reference_forward(dense, x, dim, 0.125), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "hf")
    reloaded = PrunedViTForImageClassificationWithTeacher.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(reloaded(x).logits, logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(1, C, 16, 16), interpolate_pos_encoding=True)


def test_all_ones_token_masks_are_dropped_and_bad_files_rejected(tmp_path):
    state = masked_state(3, prune_embed=False)
    for i in range(DEPTH):
        state[f"blocks.{i}.attn.qkv.token_mask"] = torch.ones(TOKENS, 1)
    save_checkpoint(tmp_path / "ones.pth", state)
    model = from_nvit_checkpoint(tmp_path / "ones.pth")
    assert not getattr(model.config, "qkv_token_scale", False)
    assert model.vit.layers[0].attention.token_scale is None
    x = images()
    torch.testing.assert_close(model(x).logits, reference_forward(state, x, None, D**-0.5), atol=1e-5, rtol=1e-5)
    del state["blocks.1.attn.qkv.head_mask.weight"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        from_nvit_checkpoint(tmp_path / "bad.pth")
    dense, dim = nvit_finetune_dense(masked_state(4, prune_embed=False))
    save_checkpoint(tmp_path / "bad_dim.pth", dense, {**dim, "QK": [d + 1 for d in dim["QK"]]})
    with pytest.raises(ValueError, match="do not match dim"):
        from_nvit_checkpoint(tmp_path / "bad_dim.pth")


# ---------------------------------------------------------------------------------------------------- ReViT


def test_revit_config_code_and_paper_rules():
    small = revit_config(384, num_labels=1000)
    assert small.heads_per_layer == [10, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 10]
    assert small.qk_head_dims == [32, 16, 16, 32, 32, 32, 32, 32, 32, 16, 16, 32]
    assert small.v_head_dims == [64] * 12 and small.intermediate_sizes == [1152] * 3 + [2304] * 6 + [1152] * 3
    assert small.attention_scales == [0.125] * 12 and small.use_distillation_token and small.num_labels == 1000
    tiny = revit_config(176)
    assert tiny.heads_per_layer == [10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10]
    assert tiny.qk_head_dims == [16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16]
    assert tiny.intermediate_sizes == [528] * 3 + [1056] * 6 + [528] * 3
    paper = revit_config(384, rule="paper")
    assert paper.heads_per_layer == [4] * 3 + [8] * 6 + [4] * 3
    assert paper.qk_head_dims == [16] * 3 + [40] * 6 + [16] * 3
    assert revit_config(384, depth=8).intermediate_sizes == [1152] * 2 + [2304] * 4 + [1152] * 2
    with pytest.raises(ValueError, match="rule"):
        revit_config(384, rule="other")
    with pytest.raises(ValueError, match="embed_dim"):
        revit_config(0)

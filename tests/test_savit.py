"""SAViT: Hessian-vector products, ratio allocation, the method, its Trainer callback and the checkpoint converter."""

import argparse
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_engine import Exploding, batches
from test_modeling import randomize

from hf_vitprune import PrunedViTForImageClassification, prune
from hf_vitprune.budget import make_budget
from hf_vitprune.convert import from_savit_checkpoint
from hf_vitprune.cost import count_macs, count_params
from hf_vitprune.methods import METHODS, get_method
from hf_vitprune.methods.savit import (
    RatioProblem,
    SAViTCallback,
    SAViTImportance,
    collaborative_hessian,
    evolution_search,
    grid_search,
    hessian_cost_ratio,
)
from hf_vitprune.methods.savit.allocation import protected_count
from hf_vitprune.methods.savit.hessian import double_backward_mode, hessian_block_sums, sample_layers
from hf_vitprune.structure import apply_masks, enable_gates, gate_owners, pruned_config, remove_gates, unit_counts

KINDS = ("head", "mlp", "embed")
# heterogeneous head geometry (the allocation prices heads per block); every block reads the whole stream
MIXED = dict(num_attention_heads=[4, 2, 3], qk_head_dim=[8, 16, 8], v_head_dim=[16, 8, 24], intermediate_size=128)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def micro_model() -> PrunedViTForImageClassification:
    """2 blocks, 16 wide, 2 heads, 24 neurons, 5 tokens: small enough for an explicit Hessian."""
    config = tiny_config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, image_size=16, patch_size=8
    )
    return randomize(PrunedViTForImageClassification(config), seed=3)


def micro_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(3, 3, 16, 16, generator=generator), "labels": torch.tensor([1, 4, 7])}


def explicit_hessian(model, batch) -> tuple[torch.Tensor, dict]:
    """torch.autograd.functional.hessian of the loss over all head, MLP and embedding gates, and where each
    (kind, layer) gate sits in the flat vector."""
    sizes = unit_counts(model.config)
    offsets, start = {}, 0
    for kind in KINDS:
        for layer, size in enumerate(sizes[kind]):
            offsets[kind, layer] = slice(start, start + size)
            start += size

    def loss(flat: torch.Tensor) -> torch.Tensor:
        for kind in KINDS:
            for layer, (owner, name) in enumerate(gate_owners(model, kind)):
                setattr(owner, name, flat[offsets[kind, layer]])
        return model(**batch).loss

    with double_backward_mode(model):
        hessian = torch.autograd.functional.hessian(loss, torch.ones(start, dtype=torch.float64))
    remove_gates(model)
    return hessian, offsets


def test_hvp_block_sums_equal_sums_of_the_explicit_hessian():
    model = micro_model().double()
    batch = {"pixel_values": micro_batch()["pixel_values"].double(), "labels": micro_batch()["labels"]}
    hessian, offsets = explicit_hessian(model, batch)
    with double_backward_mode(model):
        gates = enable_gates(model, KINDS)
        flat = [gate for kind in KINDS for gate in gates[kind]]
        grads_iter = iter(torch.autograd.grad(model(**batch).loss, flat, create_graph=True))
        grads = {kind: [next(grads_iter) for _ in gates[kind]] for kind in KINDS}
        for row_block in (0, 1):
            for column_block in range(row_block + 1):
                pairs = {
                    (p, q): (0 if p == "embed" else row_block, 0 if q == "embed" else column_block)
                    for p in KINDS
                    for q in KINDS
                }
                sums = hessian_block_sums(gates, grads, pairs)
                for i, p in enumerate(KINDS):
                    for j, q in enumerate(KINDS):
                        rows, columns = offsets[p, pairs[p, q][0]], offsets[q, pairs[p, q][1]]
                        expected = hessian[columns, rows].sum()
                        assert abs(expected) > 1e-8  # a block that could be wrong
                        torch.testing.assert_close(sums[i, j], expected, rtol=1e-5, atol=1e-9)
        remove_gates(model)


def test_estimator_normalises_the_sampled_blocks_and_averages_batches():
    model = micro_model().double()
    data = [{k: (v.double() if k == "pixel_values" else v) for k, v in micro_batch(s).items()} for s in (0, 1)]
    estimate, count = collaborative_hessian(model, data, seed=5, hessian_embed_factor=6.0)
    assert count == 2 and model.vit.embed_gate is None and model.config._attn_implementation == "sdpa"
    generator = torch.Generator().manual_seed(5)
    size = {"head": 16, "mlp": 24, "embed": 16 * 2 * 6.0}  # hidden_size for heads (the original's D, not H)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for batch in data:
        hessian, offsets = explicit_hessian(model, batch)
        pairs = sample_layers(generator, 2)
        for i, p in enumerate(KINDS):
            for j, q in enumerate(KINDS):
                rows, columns = offsets[p, pairs[p, q][0]], offsets[q, pairs[p, q][1]]
                expected[i, j] += hessian[columns, rows].sum() / (size[p] * size[q]) / len(data)
    torch.testing.assert_close(estimate, expected, rtol=1e-6, atol=1e-14)


def test_sampling_follows_the_original_rules():
    generator = torch.Generator().manual_seed(0)
    seen_rows = set()
    for _ in range(200):
        pairs = sample_layers(generator, 4)
        block = pairs["head", "head"][0]
        seen_rows.add(block)
        for q in KINDS:
            assert pairs["head", q][0] == pairs["mlp", q][0] == block  # one block per batch for both rows
            assert pairs["embed", q] == (0, 0)  # the embedding row pairs with block 0
            for p in ("head", "mlp"):
                assert pairs[p, q][1] <= block and (q != "embed" or pairs[p, q][1] == 0)
    assert seen_rows == {0, 1, 2, 3}


def problem_for(model, ratio, hessian, tolerance=1e-3, metric="macs", seed=0, kinds=KINDS):
    generator = torch.Generator().manual_seed(seed)
    counts = {"head": model.config.heads_per_layer, "mlp": model.config.intermediate_sizes, "embed": [64]}
    scores = {k: [torch.rand(n, generator=generator) for n in counts[k]] for k in KINDS}
    budget = make_budget(**{f"target_{metric}_ratio": ratio})
    return RatioProblem(model.config, scores, torch.tensor(hessian), budget, kinds, tolerance, 0.05), scores, budget


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.3])
@pytest.mark.parametrize("search", [grid_search, evolution_search])
def test_allocation_meets_the_target_within_tolerance_and_never_above(search, ratio, metric):
    model = PrunedViTForImageClassification(tiny_config(**MIXED))
    hessian = [[1.0, 0.2, 0.3], [0.1, 0.5, 0.2], [0.4, 0.0, 2.0]]
    problem, scores, budget = problem_for(model, ratio, hessian, metric=metric)
    allocation = search(problem)
    plan = problem.plan(allocation)
    cost = budget.cost(pruned_config(model.config, plan)[0]) / budget.cost(model.config)
    assert ratio - 1e-3 <= cost <= ratio
    assert cost == pytest.approx(allocation.cost_ratio, abs=1e-12)  # the cost model is exact
    for kind in KINDS:  # exactly k units go (no off-by-one), the protected best ones never
        assert sum(plan.sizes[kind]) - sum(plan.num_kept(kind)) == allocation.removed[kind]
        for layer, score in enumerate(scores[kind]):
            best = torch.argsort(-score, stable=True)[: protected_count(score.numel(), 0.05)]
            assert set(best.tolist()) <= set(plan.kept(kind, layer))


def test_pruned_units_are_the_lowest_scored_with_ties_broken_by_index():
    model = PrunedViTForImageClassification(tiny_config())
    problem, scores, _ = problem_for(model, 0.5, [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    tied = {k: [torch.zeros_like(s) for s in layers] for k, layers in scores.items()}
    for layer in tied["mlp"]:
        layer[:8] = 1.0  # 8 clear winners, the rest tie at zero
    problem = RatioProblem(model.config, tied, torch.eye(3), make_budget(target_macs_ratio=0.5), KINDS, 1e-3, 0.05)
    allocation = grid_search(problem)
    plan = problem.plan(allocation)
    removed = [sorted(set(range(128)) - set(plan.kept("mlp", layer))) for layer in range(3)]
    flat = [layer * 128 + unit for layer in range(3) for unit in removed[layer]]
    # ties at zero are removed in index order (block-major), the scored ones never before them
    assert len(flat) == allocation.removed["mlp"] and flat == sorted(flat)
    zero_units = [layer * 128 + u for layer in range(3) for u in range(8, 128)]
    assert flat == zero_units[: len(flat)]


def test_evolution_and_grid_agree():
    model = PrunedViTForImageClassification(tiny_config(**MIXED))
    # MLP pruning is cheap and the target is reachable by MLP alone: the optimum prunes no head and no channel
    problem, _, _ = problem_for(model, 0.7, [[1.0, 0.0, 0.0], [0.0, 1e-3, 0.0], [0.0, 0.0, 1.0]])
    for allocation in (grid_search(problem), evolution_search(problem, seed=1)):
        assert allocation.removed["head"] == allocation.removed["embed"] == 0
    # an interior optimum: the exhaustive grid is the reference, the evolution strategy must reach it
    problem, _, _ = problem_for(model, 0.5, [[0.3, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    grid, evolution = grid_search(problem), evolution_search(problem, seed=0)
    assert 0 < grid.removed["head"] < problem.prunable["head"] and 0 < grid.removed["embed"] < problem.prunable["embed"]
    assert evolution.objective >= grid.objective - 1e-12
    assert evolution.objective == pytest.approx(grid.objective, rel=1e-3)
    assert evolution.removed == pytest.approx(grid.removed, abs=2)
    # seeded: the same seed gives the same answer
    assert evolution_search(problem, seed=0) == evolution


def test_prune_savit_end_to_end_logs_the_ratios_and_compacts_exactly(caplog, pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(**MIXED)))
    with caplog.at_level(logging.INFO, logger="hf_vitprune.methods.savit"):
        pruned, plan = prune(model, "savit", target_macs_ratio=0.5, dataloader=batches(), return_plan=True)
    assert "savit" in METHODS
    record = pruned.config.pruning
    assert record["method"] == "savit" and 0.5 - 1e-3 <= record["macs_ratio"] <= 0.5
    assert any("savit allocation (evolution): heads" in message for message in caplog.messages)
    apply_masks(model, plan)
    torch.testing.assert_close(pruned(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_importance_save_and_load_roundtrip(tmp_path, suffix):
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    path = tmp_path / f"importance{suffix}"
    method = get_method("savit", importance_to=str(path), search="grid")
    scores = method.score(model, batches())
    loaded = SAViTImportance.load(path)
    for kind in KINDS:
        for saved, original in zip(loaded.scores[kind], scores[kind]):
            torch.testing.assert_close(saved, original)
    torch.testing.assert_close(loaded.hessian, method.importance.hessian)
    assert loaded.metadata["hessian_batches"] == "3"
    budget = make_budget(target_macs_ratio=0.5)
    plan = method.select(model, scores, budget)
    # statistics from the file: no data is read at all
    options = dict(importance_from=str(path), need_hessian=False, search="grid", return_plan=True)
    assert prune(model, "savit", 0.5, None, **options)[1] == plan


def test_importance_from_with_need_hessian_reestimates_the_hessian(tmp_path):
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    path = tmp_path / "scores.safetensors"
    counts = unit_counts(model.config)
    SAViTImportance({kind: [torch.rand(n) for n in counts[kind]] for kind in KINDS}).save(path)
    method = get_method("savit", importance_from=str(path))
    with pytest.raises(ValueError, match="needs data"):
        method.score(model, None)
    method.score(model, batches(n=1))
    assert method.importance.hessian.shape == (3, 3) and method.importance.metadata["hessian_batches"] == 1
    with pytest.raises(ValueError, match="no Hessian"):
        get_method("savit", importance_from=str(path), need_hessian=False).score(model, None)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(colour="red"), TypeError, "unknown options"),
        (dict(tolerance=0), ValueError, r"tolerance must be in \(0, 1\)"),
        (dict(tolerance=1.5), ValueError, r"tolerance must be in \(0, 1\)"),
        (dict(tolerance="1e-3"), ValueError, "tolerance must be a number"),
        (dict(kinds=("head", "embed")), ValueError, "containing 'mlp'"),
        (dict(kinds=("head", "mlp", "qk")), ValueError, "subset of"),
        (dict(search="random"), ValueError, "search must be one of"),
        (dict(calibration_fraction=0), ValueError, "calibration_fraction"),
        (dict(need_hessian=False), ValueError, "need_hessian=False needs importance_from"),
        (dict(importance_from="/nonexistent/importance.safetensors"), ValueError, "is not a file"),
        (dict(scope="uniform"), ValueError, "scope does not apply"),
        (dict(round_to=8), ValueError, "round_to does not apply"),
        (dict(num_generations=0), ValueError, "num_generations"),
        (dict(dataloader=None), ValueError, "data-driven: pass a dataloader"),
        (dict(target_macs_ratio=0.01), ValueError, "unreachable"),
        (dict(target_macs_ratio=None, target_latency_ratio=0.5, latency_model=len), ValueError, "MACs or params"),
    ],
)
def test_bad_input_fails_clearly_before_reading_data(kwargs, error, match):
    model = PrunedViTForImageClassification(tiny_config())
    arguments = {"target_macs_ratio": 0.5, "dataloader": Exploding(), **kwargs}
    with pytest.raises(error, match=match):
        prune(model, "savit", **arguments)


def test_bad_files_and_impossible_tolerances(tmp_path):
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a SAViT statistics file"):
        prune(model, "savit", 0.5, None, importance_from=str(garbage), need_hessian=False)
    wrong = tmp_path / "wrong.json"
    scores = {"head": [torch.rand(2)] * 3, "mlp": [torch.rand(128)] * 3, "embed": [torch.rand(64)]}
    SAViTImportance(scores, torch.eye(3)).save(wrong)
    with pytest.raises(ValueError, match="'head' scores for"):
        prune(model, "savit", 0.5, None, importance_from=str(wrong), need_hessian=False)
    with pytest.raises(ValueError, match="within tolerance"):
        prune(model, "savit", 0.7, batches(n=1), search="grid", tolerance=1e-9, kinds=("mlp",))


def tiny_dataset(n: int = 16):
    generator = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": torch.tensor(i % 10)} for i in range(n)
    ]


@pytest.mark.parametrize("prune_step", [0, 2])
def test_callback_prunes_inside_a_real_trainer_and_compacts_after(tmp_path, pixel_values, prune_step):
    from transformers import Trainer, TrainingArguments

    model = randomize(PrunedViTForImageClassification(tiny_config())).train()
    dense_macs = count_macs(model)
    callback = SAViTCallback(target_macs_ratio=0.5, prune_step=prune_step, search="grid")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[callback])
    trainer.train()
    assert callback.plan is not None  # the masks stay during fine-tuning
    for layer, kept in zip(model.vit.layers, callback.plan.num_kept("mlp")):
        assert kept < 128 and int(layer.mlp.neuron_gate.sum()) == kept
    small = callback.compact(trainer.model.eval())
    assert 0.5 - 1e-3 <= count_macs(small) / dense_macs <= 0.5
    assert count_params(small) < count_params(model)
    torch.testing.assert_close(small(pixel_values).logits, trainer.model(pixel_values).logits, atol=1e-5, rtol=0)


def test_callback_rejects_bad_steps():
    with pytest.raises(ValueError, match="prune_step"):
        SAViTCallback(target_macs_ratio=0.5, prune_step=-1)
    with pytest.raises(TypeError, match="unknown options"):
        SAViTCallback(target_macs_ratio=0.5, populaton_size=10)


def test_hessian_cost_ratio_is_measured():
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    ratio = hessian_cost_ratio(model, batches(n=1, size=8)[0], repeats=2)
    assert math.isfinite(ratio) and ratio > 1
    assert model.vit.embed_gate is None and all(p.requires_grad for p in model.parameters())


# --- SAViT's masked checkpoints ---------------------------------------------------------------------------------

DEPTH, WIDTH, HEADS, HEAD_DIM, HIDDEN, PATCH, SIZE, CLASSES = 2, 24, 3, 8, 40, 8, 32, 5


def savit_state(seed: int, prune_embedding: bool) -> dict[str, torch.Tensor]:
    """A gated DeiT state dict in SAViT's layout (spec §6.2), random weights, 0/1 gates, the shared res_gate
    repeated under every block."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    tokens = (SIZE // PATCH) ** 2 + 1
    state = {
        "cls_token": rand(1, 1, WIDTH),
        "pos_embed": rand(1, tokens, WIDTH),
        "patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rand(WIDTH),
    }
    res_gate = torch.ones(WIDTH)
    if prune_embedding:
        res_gate[torch.randperm(WIDTH, generator=generator)[:7]] = 0
    for i in range(DEPTH):
        block = f"blocks.{i}."
        head_gate, hidden_gate = torch.ones(HEADS), torch.ones(HIDDEN)
        head_gate[i] = 0
        hidden_gate[torch.randperm(HIDDEN, generator=generator)[: 10 + 5 * i]] = 0
        state.update(
            {
                f"{block}norm1.weight": 1 + rand(WIDTH),
                f"{block}norm1.bias": rand(WIDTH),
                f"{block}attn.qkv.weight": rand(3 * HEADS * HEAD_DIM, WIDTH),
                f"{block}attn.qkv.bias": rand(3 * HEADS * HEAD_DIM),
                f"{block}attn.proj.weight": rand(WIDTH, HEADS * HEAD_DIM),
                f"{block}attn.proj.bias": rand(WIDTH),
                f"{block}attn.attn_gate.weight": head_gate,
                f"{block}norm2.weight": 1 + rand(WIDTH),
                f"{block}norm2.bias": rand(WIDTH),
                f"{block}mlp.fc1.weight": rand(HIDDEN, WIDTH),
                f"{block}mlp.fc1.bias": rand(HIDDEN),
                f"{block}mlp.hidden_gate1.weight": hidden_gate,
                f"{block}mlp.fc2.weight": rand(WIDTH, HIDDEN),
                f"{block}mlp.fc2.bias": rand(WIDTH),
                f"{block}res_gate.weight": res_gate.clone(),
            }
        )
    state.update(
        {
            "norm.weight": 1 + rand(WIDTH),
            "norm.bias": rand(WIDTH),
            "head.weight": rand(CLASSES, WIDTH),
            "head.bias": rand(CLASSES),
            "res_gate.weight": res_gate.clone(),
        }
    )
    return state


def savit_masked_forward(state: dict, x: torch.Tensor, exact_layer_norm: bool) -> torch.Tensor:
    """SAViT's gated DeiT written from the spec (§1.1): head gates on the per-head context before `proj`, hidden
    gates on fc1's output before GELU, one residual gate after the embeddings and after every residual add.

    `exact_layer_norm=False` is SAViT's own LayerNorm (statistics over all channels); True takes them over the
    active channels and re-gates the output, as hf_vitprune's masked model (and SAViT's deployed compact model)."""
    gate = state["res_gate.weight"]

    def norm(h, name):
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        if not exact_layer_norm:
            return F.layer_norm(h, (WIDTH,), weight, bias, eps=1e-6)
        mean = (h * gate).sum(-1, keepdim=True) / gate.sum()
        var = ((h - mean).square() * gate).sum(-1, keepdim=True) / gate.sum()
        return ((h - mean) / torch.sqrt(var + 1e-6) * weight + bias) * gate

    batch = x.shape[0]
    h = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    h = torch.cat([state["cls_token"].expand(batch, -1, -1), h.flatten(2).transpose(1, 2)], 1) + state["pos_embed"]
    h = h * gate
    tokens = h.shape[1]
    for i in range(DEPTH):
        block = f"blocks.{i}."
        qkv = F.linear(norm(h, f"{block}norm1"), state[f"{block}attn.qkv.weight"], state[f"{block}attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        context = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(-1) @ v
        context = context * state[f"{block}attn.attn_gate.weight"].view(1, HEADS, 1, 1)
        context = context.transpose(1, 2).reshape(batch, tokens, HEADS * HEAD_DIM)
        h = gate * (h + F.linear(context, state[f"{block}attn.proj.weight"], state[f"{block}attn.proj.bias"]))
        hidden = F.linear(norm(h, f"{block}norm2"), state[f"{block}mlp.fc1.weight"], state[f"{block}mlp.fc1.bias"])
        hidden = F.gelu(hidden * state[f"{block}mlp.hidden_gate1.weight"])
        h = gate * (h + F.linear(hidden, state[f"{block}mlp.fc2.weight"], state[f"{block}mlp.fc2.bias"]))
    return F.linear(norm(h, "norm")[:, 0], state["head.weight"], state["head.bias"])


def test_converter_matches_savit_exactly_for_heads_and_mlp(tmp_path, pixel_values):
    state = savit_state(0, prune_embedding=False)
    torch.save({"model": state}, tmp_path / "checkpoint_pruned_00.pth")
    model, plan = from_savit_checkpoint(tmp_path / "checkpoint_pruned_00.pth", return_plan=True)
    assert model.config.heads_per_layer == [2, 2] and model.config.intermediate_sizes == [30, 25]
    assert plan.kept("head", 1) == [0, 2] and model.config.qk_head_dims == [HEAD_DIM, HEAD_DIM]
    reference = savit_masked_forward(state, pixel_values, exact_layer_norm=False)
    torch.testing.assert_close(model(pixel_values).logits, reference, atol=1e-5, rtol=0)
    assert model.config.pruning["macs"] == count_macs(model) < model.config.pruning["dense_macs"]
    assert model.image_processor.crop_size == {"height": SIZE, "width": SIZE}


def test_converter_with_embedding_pruning_is_exact_for_active_channel_layer_norm(tmp_path, pixel_values):
    state = savit_state(1, prune_embedding=True)
    torch.save({"model": state}, tmp_path / "masked.pth")
    model = from_savit_checkpoint(tmp_path / "masked.pth")
    assert model.config.hidden_size == WIDTH - 7
    logits = model(pixel_values).logits
    exact = savit_masked_forward(state, pixel_values, exact_layer_norm=True)
    torch.testing.assert_close(logits, exact, atol=1e-5, rtol=0)
    # SAViT's own masked model normalises over all channels: not function-preserving (spec §10.10)
    original = savit_masked_forward(state, pixel_values, exact_layer_norm=False)
    assert (logits - original).abs().max() > 1e-3


class RunsCode:
    """Pickles as a call to `exec`: loading it unsafely would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_converter_reads_richer_pickles_without_running_them(tmp_path, caplog, pixel_values):
    marker = tmp_path / "executed"
    checkpoint = {
        "model": savit_state(0, prune_embedding=True),
        "args": argparse.Namespace(model="deit_tiny_patch16_224", lr=np.float64(1e-3)),
        "payload": RunsCode(str(marker)),
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with caplog.at_level(logging.WARNING, logger="hf_vitprune.convert.savit"):
        model = from_savit_checkpoint(tmp_path / "checkpoint.pth")
    assert not marker.exists()
    assert any("argparse.Namespace" in m and "builtins.exec" in m for m in caplog.messages)
    assert model.config.hidden_size == WIDTH - 7


def test_converter_rejects_what_is_not_a_savit_checkpoint(tmp_path):
    state = savit_state(0, prune_embedding=False)
    state["blocks.0.attn.attn_gate.weight"] = torch.tensor([1.0, 0.5, 1.0])
    torch.save({"model": state}, tmp_path / "soft.pth")
    with pytest.raises(ValueError, match="only 0 and 1"):
        from_savit_checkpoint(tmp_path / "soft.pth")
    state = savit_state(0, prune_embedding=False)
    state["dist_token"] = torch.zeros(1, 1, WIDTH)
    del state["blocks.1.mlp.hidden_gate1.weight"]
    torch.save(state, tmp_path / "distilled.pth")
    with pytest.raises(
        ValueError, match=r"missing \['blocks.1.mlp.hidden_gate1.weight'\], unexpected \['dist_token'\]"
    ):
        from_savit_checkpoint(tmp_path / "distilled.pth")
    state = savit_state(0, prune_embedding=False)
    state["blocks.0.attn.attn_gate.weight"] = torch.zeros(HEADS)
    torch.save({"model": state}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="at least one must stay"):
        from_savit_checkpoint(tmp_path / "empty.pth")

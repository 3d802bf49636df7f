"""LPViT: block scores, distortion curves, allocation to a MACs target, masks through fine-tuning and save/load,
exact compaction, BSR export, LPViT mask files, and bad input."""

import copy
import json

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from test_modeling import IRREGULAR, randomize
from transformers import AutoModelForImageClassification, Trainer, TrainerCallback, TrainingArguments
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_vitprune import PrunedViTForImageClassification, prune
from hf_vitprune.budget import make_budget
from hf_vitprune.convert import from_lpvit_masks
from hf_vitprune.cost import count_macs, count_params
from hf_vitprune.methods.lpvit import (
    BSRLinear,
    LPViTCallback,
    LPViTConfig,
    LPViTMethod,
    apply_block_masks,
    block_masks,
    compact_block_sparse,
    lpvit_layers,
    masked_fraction,
    to_block_sparse,
)
from hf_vitprune.methods.lpvit.allocation import (
    allocate,
    block_stats,
    distortion_curve,
    kept_blocks,
    numerical_derivative,
    prune_order,
    smooth_curve,
)
from hf_vitprune.methods.lpvit.compaction import compacted_cost
from hf_vitprune.methods.lpvit.masks import grid_shape
from hf_vitprune.modeling_pruned_vit import BlockMaskedLinear, add_block_mask, expand_block_mask

W = torch.tensor([[1.0, -2, 3, 0, 1], [0, 1, -1, 2, 2], [4, 0, 1, -3, 1]])
G = torch.tensor([[1.0, 1, 0, 2, 1], [1, -1, 1, 1, 0], [0, 2, 1, 1, -1]])


def calibration(batches: int = 2, size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
            "labels": torch.randint(0, 10, (size,), generator=generator),
        }
        for _ in range(batches)
    ]


def random_block_masks(model, block_size, density: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in lpvit_layers(model):
        for name, module in layer.modules:
            shape = grid_shape((module.weight.shape[0], module.weight[0].numel()), block_size)
            masks[name] = (torch.rand(shape, generator=generator) < density).to(torch.uint8)
    return masks


def test_block_scores_and_masks_match_a_hand_computation():
    # 3x5 weight in 2x2 blocks: a 2x3 grid whose last row and column are partial
    stats = block_stats([W], [G], (2, 2))
    assert stats.count.tolist() == [4, 4, 2, 2, 2, 1]
    assert stats.scores("taylor").tolist() == [1.0, 0.75, 0.5, 0.0, 2.0, 1.0]  # mean |W * G| per block
    assert stats.scores("l1").tolist() == [1.0, 1.5, 1.5, 2.0, 2.0, 1.0]  # mean |W|
    order = prune_order(stats, "taylor")
    assert order.tolist() == [3, 2, 1, 0, 5, 4]  # ascending, ties in index order
    assert kept_blocks(6, 0.5) == 3 and kept_blocks(100, 0.07) == 93 and kept_blocks(6, 0.0) == 6
    # p = 0.5 prunes blocks 3, 2, 1: T1 = sum (W G)^2 / 15 = 6 / 15; a = -sum W G = -2, exact T2 = a^2 / 2;
    # p = 1 prunes all: T1 = 23 / 15, a = 3
    curve = distortion_curve(stats, order, num_points=2, second_order=True, mode="exact", damping=0.0)
    torch.testing.assert_close(curve, torch.tensor([0.0, 6 / 15 + 2.0, 23 / 15 + 4.5], dtype=torch.float64))
    first_order = distortion_curve(stats, order, num_points=2, second_order=False)
    torch.testing.assert_close(first_order, torch.tensor([0.0, 6 / 15, 23 / 15], dtype=torch.float64))


def test_code_second_order_term_equals_the_original_recurrence():
    """The closed form of the original's incremental second-order update, on random W and g."""
    generator = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(12, 20, generator=generator), torch.randn(12, 20, generator=generator)
    damping, points = 1e-2, 10
    stats = block_stats([weight], [grad], (4, 5))
    order = prune_order(stats, "taylor")
    curve = distortion_curve(stats, order, points, second_order=True, mode="code", damping=damping)
    first = distortion_curve(stats, order, points, second_order=False)

    w, g = weight.double().flatten(), grad.double().flatten()
    block_of = (torch.arange(12)[:, None] // 4 * 4 + torch.arange(20)[None, :] // 5).flatten()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    previous, total, expected = w.clone(), 0.0, [0.0]
    for d in range(1, points + 1):
        pruned = stats.num_blocks - kept_blocks(stats.num_blocks, d / points)
        current = torch.where(rank[block_of] < pruned, 0.0, w)
        delta, step = current - w, current - previous
        h = g * (g @ step)
        h[step != 0] += damping
        total += float(0.5 * (step + 2 * delta) @ h)
        expected.append(total)
        previous = current
    torch.testing.assert_close(curve - first, torch.tensor(expected, dtype=torch.float64))


def test_derivative_stencils_and_smoothing():
    x = torch.linspace(0, 1, 11, dtype=torch.float64)
    slope = numerical_derivative(3 * x**2, x, 4)
    torch.testing.assert_close(slope[4:7], 6 * x[4:7])  # even half-width: exact 5-point stencil
    linear = numerical_derivative(x, x, 4)
    assert linear[3].item() == pytest.approx(10 / 18)  # half-width 3: the original's biased stencil
    assert linear[0].item() == pytest.approx(1.0) and linear[9].item() == pytest.approx(1.0)
    curve = torch.tensor([2.0, 4.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(smooth_curve(curve, 0.5), torch.tensor([2.0, 10 / 3, 26 / 7], dtype=torch.float64))


def test_equal_slope_allocation_meets_the_target():
    """Convex curves p^k: a layer's slope k p^(k-1) = lambda; bisection finds the least pruning within target."""
    grid = torch.arange(100, dtype=torch.float64) / 100
    x = torch.arange(101, dtype=torch.float64) / 100
    slopes = [numerical_derivative(a * x**k, x, 4) for a, k in ((1, 2), (3, 3), (0.5, 4))]
    weights = [0.5, 0.3, 0.2]

    def cost(sparsities):
        return 1 - sum(w * p for w, p in zip(weights, sparsities))

    allocation = allocate(slopes, grid, cap=0.95, cost_ratio=cost, target=0.6)
    assert 0.58 <= allocation.ratio <= 0.6 and allocation.ratio == pytest.approx(cost(allocation.sparsity))
    assert all(p <= 0.95 for p in allocation.sparsity)
    with pytest.raises(ValueError, match="unreachable"):
        allocate(slopes, grid, cap=0.5, cost_ratio=cost, target=0.3)


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_prune_meets_the_macs_target_and_keeps_masks(target, pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    pruned, plan = prune(model, "lpvit", target_macs_ratio=target, dataloader=calibration(), return_plan=True)
    ratio = count_macs(pruned) / count_macs(model)
    assert ratio <= target and pruned.config.pruning["macs_ratio"] == pytest.approx(ratio)
    assert isinstance(pruned, PrunedViTForImageClassification) and block_masks(pruned)
    assert pruned.config.block_sparsity["block_size"] == [16, 16]
    masked = copy.deepcopy(model)
    plan.apply(masked)
    cap = 1 - min(0.05, (1 - target) / 2)
    for layer in lpvit_layers(masked, ("qkv", "o_proj", "fc1", "fc2")):
        kept = sum(int(block_masks(masked)[name].sum()) for name, _ in layer.modules)
        blocks = sum(block_masks(masked)[name].numel() for name, _ in layer.modules)
        assert kept == kept_blocks(blocks, plan.sparsity[layer.name]) and plan.sparsity[layer.name] <= cap
    # the returned model is the masked source, compacted exactly
    torch.testing.assert_close(pruned(pixel_values).logits, masked(pixel_values).logits, atol=1e-5, rtol=0)


def test_count_macs_counts_only_kept_blocks():
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    dense_macs, dense_params = count_macs(model), count_params(model)
    fc1 = model.vit.layers[0].mlp.fc1  # 128 x 64 in 16 x 16 blocks: 8 x 4
    mask = torch.ones(8, 4, dtype=torch.uint8)
    mask[:4] = 0
    head_mask = torch.tensor([[1, 0, 1, 1]], dtype=torch.uint8)  # 10 x 64 classifier: one partial block row
    apply_block_masks(model, {"vit.layers.0.mlp.fc1": mask, "classifier": head_mask}, 16)
    tokens = model.config.num_patches + 1
    assert count_macs(model) == dense_macs - tokens * 64 * 64 - 10 * 16
    assert count_params(model) == dense_params - 64 * 64 - 10 * 16
    dense_block = count_macs(model.config, by_block=True).blocks[0]
    assert count_macs(model, by_block=True).blocks[0] == dense_block - tokens * 4096
    assert bool((fc1.weight[:64] == 0).all()) and bool((fc1.weight[64:] != 0).all())


class InMemory(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.items = [{"pixel_values": x, "labels": y} for b in batches for x, y in zip(b["pixel_values"], b["labels"])]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.history = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.history.append(dict(logs))


def test_masks_persist_through_trainer_fine_tuning(tmp_path):
    model = randomize(PrunedViTForImageClassification(tiny_config())).train()
    apply_block_masks(model, random_block_masks(model, (16, 16)), 16)
    before = {name: mask.clone() for name, mask in block_masks(model).items()}
    with torch.no_grad():  # stale values under the masks: the callback must zero them
        model.vit.layers[0].mlp.fc1.weight += 1.0
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_steps=1,
        save_strategy="no",
    )
    logs = LogRecorder()
    trainer = Trainer(model, args, train_dataset=InMemory(calibration(3)), callbacks=[LPViTCallback(), logs])
    trainer.train()
    assert all(torch.equal(block_masks(model)[name], mask) for name, mask in before.items())
    for name, module in model.named_modules():
        if isinstance(module, BlockMaskedLinear):
            kept = expand_block_mask(module.weight_block_mask, (16, 16), tuple(module.weight.shape)).bool()
            assert bool((module.weight[~kept] == 0).all()), name
            assert not torch.equal(module.weight[kept], weights[f"{name}.weight"][kept]), name  # it trained
    assert logs.history and all(entry["block_sparsity"] == masked_fraction(model) for entry in logs.history)
    with pytest.raises(ValueError, match="block-masked model"):
        Trainer(model=randomize(PrunedViTForImageClassification(tiny_config())), args=args,
                train_dataset=InMemory(calibration(1)), callbacks=[LPViTCallback()]).train()  # fmt: skip


def test_masks_survive_save_and_from_pretrained(tmp_path, pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    masks = {n: m for n, m in random_block_masks(model, (16, 16)).items() if not n.endswith(("o_proj", "fc2"))}
    apply_block_masks(model, masks, 16)  # q/k/v, fc1, the patch convolution and the (partial-block) classifier
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["block_sparsity"]["block_size"] == [16, 16]
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:  # HF ViT's on-disk names
        assert "vit.encoder.layer.0.intermediate.dense.weight_block_mask" in weights.keys()
    expected = {name: mask.tolist() for name, mask in block_masks(model).items()}
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.vit.layers[0].mlp.fc1, BlockMaskedLinear)
    assert {name: mask.tolist() for name, mask in block_masks(reloaded).items()} == expected
    assert count_macs(reloaded) == count_macs(model) < count_macs(reloaded.config)
    torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=0)

    # trust_remote_code: the modeling file copied next to the weights rebuilds the masks on its own
    remote_class = get_class_from_dynamic_module(
        "modeling_pruned_vit.PrunedViTForImageClassification", str(tmp_path), local_files_only=True
    )
    assert remote_class.__module__.startswith("transformers_modules")
    remote = remote_class.from_pretrained(tmp_path).eval()
    assert {name: mask.tolist() for name, mask in block_masks(remote).items()} == expected
    torch.testing.assert_close(remote(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=0)


def dead_units_masks(model) -> dict[str, torch.Tensor]:
    """8x8 block masks that empty fc1 rows, fc2 columns, v rows of a head, o_proj columns and k rows."""
    masks = random_block_masks(model, (8, 8), density=0.7, seed=3)
    layers = model.vit.layers
    masks["vit.layers.0.mlp.fc1"][2:5] = 0  # neurons 16..39 emptied in fc1 (bias folded into fc2)
    masks["vit.layers.0.mlp.fc2"][:, 10:12] = 0  # neurons 80..95 emptied in fc2
    v_dim = model.config.v_head_dims[0]
    masks["vit.layers.0.attention.v_proj"][v_dim // 8 : 2 * v_dim // 8] = 0  # all values of head 1 (folded)
    masks["vit.layers.2.attention.o_proj"][:, : model.config.v_head_dims[2] // 8] = 0  # head 0 of block 2
    heads, qk = model.config.heads_per_layer[1], model.config.qk_head_dims[1]
    for h in range(heads):  # Q/K index 0..7 of every head of block 1, through k_proj
        masks["vit.layers.1.attention.k_proj"][h * qk // 8] = 0
    assert layers[1].attention.k_proj.weight.shape[0] == heads * qk
    return masks


def test_compaction_of_emptied_rows_and_columns_is_exact(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)))
    masks = dead_units_masks(model)
    apply_block_masks(model, masks, 8)
    small, plan = compact_block_sparse(model)
    assert plan.num_kept("mlp")[0] <= model.config.intermediate_sizes[0] - 40
    assert plan.num_kept("head")[0] < 4 and plan.num_kept("head")[2] < 3 and plan.num_kept("qk")[1] <= 8
    torch.testing.assert_close(small(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)
    assert block_masks(small) and masked_fraction(small) > 0
    assert count_macs(small) < count_macs(model)
    predicted = compacted_cost(model, masks, (8, 8), ("head", "qk", "v", "mlp"), count_macs, "macs")
    assert predicted == count_macs(small)


def test_block_sparse_export_is_exact(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    apply_block_masks(model, random_block_masks(model, (16, 16)), 16)
    sparse = to_block_sparse(model)  # the 10 x 64 classifier has partial 16 x 16 blocks: it stays masked dense
    assert isinstance(sparse.vit.layers[0].mlp.fc1, BSRLinear) and not isinstance(sparse.classifier, BSRLinear)
    assert sparse.vit.layers[0].mlp.fc1.weight.layout == torch.sparse_bsr
    assert isinstance(model.vit.layers[0].mlp.fc1, BlockMaskedLinear)  # the input is not modified
    with torch.inference_mode():
        torch.testing.assert_close(sparse(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)
    timed = to_block_sparse(model, benchmark_tokens=17, repeats=1)  # converts only what is faster here
    torch.testing.assert_close(timed(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)


def timm_deit():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    return randomize_timm(model)


def randomize_timm(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def lpvit_mask_file(model, path, block=16, seed=0) -> dict[str, torch.Tensor]:
    """A mask file as LPViT saves it: float 0/1, the weights' shapes, timm names, constant on block tiles."""
    generator = torch.Generator().manual_seed(seed)
    names = ["patch_embed.proj", "head", "head_dist"]
    names += [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    masks = {}
    for name in names:
        weight = model.get_submodule(name).weight
        rows, cols = weight.shape[0], weight[0].numel()
        blocks = (torch.rand(grid_shape((rows, cols), (block, block)), generator=generator) < 0.6).to(torch.uint8)
        masks[f"{name}.weight_mask"] = expand_block_mask(blocks, (block, block), (rows, cols)).float().view_as(weight)
    torch.save(masks, path)
    return masks


def test_lpvit_mask_file_on_timm_deit(tmp_path, pixel_values):
    timm_model = timm_deit()
    path = tmp_path / "sp0.50_deit_ndz_0100_rdcurves_block16x16_ranking_taylor_secondorderapprox_opt_dist_mask_.pt"
    masks = lpvit_mask_file(timm_model, path)
    pruned = from_lpvit_masks(path, timm_model)
    assert pruned.config.block_sparsity["block_size"] == [16, 16]
    reference = copy.deepcopy(timm_model)
    with torch.no_grad():
        for key, mask in masks.items():
            reference.get_submodule(key[: -len(".weight_mask")]).weight.mul_(mask)
    torch.testing.assert_close(pruned(pixel_values).logits, reference(pixel_values), atol=1e-5, rtol=0)
    unnamed = tmp_path / "masks.pt"  # no block size in the name: inferred from the masks
    unnamed.write_bytes(path.read_bytes())
    assert from_lpvit_masks(unnamed, timm_model).config.block_sparsity["block_size"][0] % 16 == 0
    assert masked_fraction(pruned) > 0.2


def test_lpvit_mask_file_on_hf_deit(tmp_path, pixel_values):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    config = DeiTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=10, layer_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = randomize_timm(DeiTForImageClassificationWithTeacher(config))
    generator = torch.Generator().manual_seed(0)
    layer = hf_model.deit.encoder.layer[0] if hasattr(hf_model.deit, "encoder") else hf_model.deit.layers[0]
    qkv = [layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj]
    blocks = (torch.rand(12, 4, generator=generator) < 0.5).to(torch.uint8)
    mask = expand_block_mask(blocks, (16, 16), (192, 64)).float()
    torch.save({"blocks.0.attn.qkv.weight_mask": mask}, tmp_path / "m.pt")
    pruned = from_lpvit_masks(tmp_path / "m.pt", hf_model, block_size=16)
    with torch.no_grad():
        for i, proj in enumerate(qkv):
            proj.weight.mul_(mask[64 * i : 64 * (i + 1)])
    torch.testing.assert_close(pruned(pixel_values).logits, hf_model(pixel_values).logits, atol=1e-5, rtol=0)


class Exploit:
    def __reduce__(self):
        return (open, ("/tmp/lpvit_pickle_was_executed", "w"))


def test_lpvit_mask_files_are_loaded_safely_and_checked(tmp_path):
    timm_model = timm_deit()
    masks = lpvit_mask_file(timm_model, tmp_path / "good.pt")
    torch.save({"head.weight_mask": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError):
        from_lpvit_masks(tmp_path / "evil.pt", timm_model)
    assert not __import__("os").path.exists("/tmp/lpvit_pickle_was_executed")
    bad = {
        "unknown": {"blocks.9.mlp.fc1.weight_mask": masks["blocks.0.mlp.fc1.weight_mask"]},
        "shape": {"head.weight_mask": torch.ones(3, 3)},
        "values": {"head.weight_mask": masks["head.weight_mask"] * 0.5},
        "not a mask": {"head.weight": masks["head.weight_mask"]},
    }
    for name, content in bad.items():
        torch.save(content, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError):
            from_lpvit_masks(tmp_path / f"{name}.pt", timm_model)
    with pytest.raises(ValueError, match="not constant"):
        from_lpvit_masks(tmp_path / "good.pt", timm_model, block_size=32)


def test_partial_blocks_are_tiled_from_the_top_left(pixel_values):
    """24x24 blocks do not divide 64 or 128: edge blocks are partial, scored by their mean, costed by their size."""
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    pruned, plan = prune(model, "lpvit", 0.6, calibration(), block_size=24, return_plan=True)
    assert plan.masks["vit.layers.0.mlp.fc1"].shape == (6, 3)  # ceil(128 / 24) x ceil(64 / 24)
    assert count_macs(pruned) / count_macs(model) <= 0.6
    assert pruned.config.block_sparsity["block_size"] == [24, 24]


class Untouchable:
    def __iter__(self):
        raise AssertionError("the data must not be read before the checks")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=(16,)), "block_size"),
        (dict(block_size="16"), "block_size"),
        (dict(layers=("attention",)), "layers"),
        (dict(ranking="random"), "ranking"),
        (dict(kinds=("embed",)), "kinds"),
        (dict(scope="uniform"), "scope"),
        (dict(smooth=1.5), "smooth"),
        (dict(min_density=0), "min_density"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        LPViTConfig(**options)


def test_bad_targets_and_inputs_fail_before_scoring():
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    with pytest.raises(ValueError, match="unreachable"):
        prune(model, "lpvit", 0.1, Untouchable(), layers=("fc2",))
    with pytest.raises(ValueError, match="latency"):
        prune(model, "lpvit", None, Untouchable(), target_latency_ratio=0.5, latency_model=lambda config: 1.0)
    with pytest.raises(ValueError, match="dataloader"):
        prune(model, "lpvit", 0.5)
    method = LPViTMethod()
    with pytest.raises(ValueError, match="scores lack"):
        method.select(model, {}, make_budget(0.5))
    with pytest.raises(ValueError, match="mask"):
        add_block_mask(model.vit.layers[0].mlp.fc1, (16, 16), torch.ones(2, 2))
    with pytest.raises(ValueError, match="no block masks"):
        to_block_sparse(model)
    with pytest.raises(ValueError, match="no block masks"):
        compact_block_sparse(model)

"""The accelerate recipes end to end on a tiny digits imagefolder: one process, two processes (gloo), a crash after
the first checkpoint and the resumed run, the NViT, SAViT and LPViT recipes on the shipped digits ViT, the shared
argument parsing and the shipped configs."""

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, ViTImageProcessor

from hf_vitprune import PrunedViTForImageClassification, data, recipes
from hf_vitprune.hub import check_hub_folder
from hf_vitprune.recipes import STOP_EXIT_CODE, add_common_args, load_student, parse_args
from hf_vitprune.structure import PruningPlan

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SAMPLE_MODEL = REPO / "hf_vitprune" / "sample_model"
STEPS = 4


def recipe_args(root: Path, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(root / "model"),
        "--train_dir", str(root / "digits"),
        "--output_dir", str(output_dir),
        "--use_cpu",
        "--max_train_steps", str(STEPS),
        "--checkpointing_steps", "2",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32",
        "--num_score_batches", "4",
        "--max_eval_samples", "64",
        "--num_workers", "0",
        "--learning_rate", "0.05",
        "--mixup", "0",
        "--cutmix", "0",
        "--no_augmentation",
        "--seed", "0",
    ]  # fmt: skip


def subprocess_env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def load_recipe(name: str):
    """recipes/<name>.py as a module, to run in this process."""
    sys.path.insert(0, str(RECIPES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(RECIPES))


def prune_taylor(argv: list[str]) -> dict:
    return load_recipe("prune_taylor").main(argv)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The digits imagefolder and a tiny PrunedViT folder (10 digit classes, 32x32) to start from."""
    root = tmp_path_factory.mktemp("recipes")
    data.write_digits_imagefolder(root / "digits", image_size=32)
    torch.manual_seed(0)
    names = sorted(p.name for p in (root / "digits" / "train").iterdir())
    model = PrunedViTForImageClassification(
        tiny_config(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    )
    model.save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def reference(digits) -> tuple[Path, dict]:
    """One uninterrupted single-process run of recipes/prune_taylor.py."""
    output_dir = digits / "single"
    return output_dir, prune_taylor(recipe_args(digits, output_dir))


def test_single_process_recipe_prunes_finetunes_and_writes_a_hub_folder(digits, reference):
    output_dir, results = reference
    assert results["world_size"] == 1 and results["train_steps"] == STEPS and results["first_step"] == 1
    assert results["macs"] <= 0.5 * results["dense_macs"] and results["num_samples"] == 64
    assert 0 <= results["top_1_accuracy"] <= results["top_5_accuracy"] <= 1
    model_dir = output_dir / "model"
    assert "all_results.json" in check_hub_folder(model_dir)
    assert json.loads((model_dir / "all_results.json").read_text()) == results
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]
    plan = PruningPlan.load(output_dir / "pruned" / "pruning_plan.json")
    assert PruningPlan.load(output_dir / "checkpoints" / "step_4" / "pruning_plan.json") == plan
    # the fine-tuned compact model reloads through the Auto class and has the plan's shape
    reloaded = AutoModelForImageClassification.from_pretrained(model_dir)
    assert reloaded.config.hidden_size == len(plan.kept("embed", 0))
    assert reloaded.config.intermediate_sizes == plan.num_kept("mlp")
    pruned = AutoModelForImageClassification.from_pretrained(output_dir / "pruned")
    moved = max((a - b).abs().max().item() for a, b in zip(reloaded.parameters(), pruned.parameters()))
    assert moved > 1e-3  # fine-tuning changed the weights


def test_crash_after_first_checkpoint_then_resume_finishes_with_the_same_state(digits, reference, tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, str(RECIPES / "prune_taylor.py"), *recipe_args(digits, output_dir)]
    crashed = subprocess.run(
        [*command, "--stop_after_step", "3"], env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert crashed.returncode == STOP_EXIT_CODE, crashed.stderr[-3000:]
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step_2"]
    assert not (output_dir / "model").exists()

    results = prune_taylor(recipe_args(digits, output_dir))  # the same command again resumes automatically
    assert results["resumed_from"] == str(output_dir / "checkpoints" / "step_2")
    assert results["first_step"] == 3 and results["train_steps"] == STEPS
    assert results["plan_hash"] == reference[1]["plan_hash"]
    # model, optimizer, scheduler and data position restored: the weights of the uninterrupted run
    resumed = load_file(output_dir / "model" / "model.safetensors")
    uninterrupted = load_file(reference[0] / "model" / "model.safetensors")
    for name, value in resumed.items():
        torch.testing.assert_close(value, uninterrupted[name], atol=2e-4, rtol=0, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_choose_the_single_process_plan(digits, reference, tmp_path):
    output_dir = tmp_path / "two"
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command = [sys.executable, *launch, "--main_process_port", str(free_port()), str(RECIPES / "prune_taylor.py")]
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="1")
    done = subprocess.run([*command, *recipe_args(digits, output_dir)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((output_dir / "model" / "all_results.json").read_text())
    assert results["world_size"] == 2
    assert results["plan_hashes"] == [results["plan_hash"]] * 2  # both ranks chose the same plan
    assert results["plan_hash"] == reference[1]["plan_hash"]  # ... the plan of one process on the same data
    single = PruningPlan.load(reference[0] / "pruned" / "pruning_plan.json")
    assert PruningPlan.load(output_dir / "pruned" / "pruning_plan.json") == single
    assert results["num_samples"] == 64  # gather_for_metrics: every validation image once
    model = AutoModelForImageClassification.from_pretrained(output_dir / "model")
    logits = model(torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_finetune_recipe_on_a_pruned_folder(digits, reference, tmp_path):
    recipe = load_recipe("finetune")
    argv = recipe_args(digits, tmp_path / "ft")
    argv[argv.index("--model_name_or_path") + 1] = str(reference[0] / "model")
    with pytest.raises(ValueError, match="--teacher_name_or_path"):
        recipe.main(argv)
    results = recipe.main([*argv, "--teacher_name_or_path", str(digits / "model"), "--distillation_type", "hard"])
    assert results["macs"] == reference[1]["macs"] and results["plan_hashes"] == [results["plan_hash"]]
    assert (tmp_path / "ft" / "model" / "README.md").is_file()


def method_recipe_args(digits: Path, output_dir: Path) -> list[str]:
    """recipes/configs/digits.yaml on the shipped digits ViT, cut down to a few images and steps."""
    return [
        "--config", str(RECIPES / "configs" / "digits.yaml"),
        "--model_name_or_path", str(SAMPLE_MODEL),
        "--train_dir", str(digits / "digits"),
        "--output_dir", str(output_dir),
        "--use_cpu",
        "--num_workers", "0",
        "--max_train_steps", "2",
        "--num_score_batches", "2",
        "--per_device_score_batch_size", "8",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "32",
        "--max_eval_samples", "32",
    ]  # fmt: skip


METHOD_FLAGS = {
    "nvit": ["--kinds", "head", "mlp", "embed"],
    "savit": ["--search", "grid"],
    "lpvit": ["--block_size", "32"],
}


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_method_recipe_prunes_to_the_target_and_writes_the_fine_tuned_model(method, digits, tmp_path, monkeypatch):
    saved = {}

    def keep_model(model, folder, *args, **kwargs):
        saved["model"] = model
        return save_model_folder(model, folder, *args, **kwargs)

    save_model_folder = recipes.save_model_folder
    monkeypatch.setattr(recipes, "save_model_folder", keep_model)
    output_dir = tmp_path / method
    results = load_recipe(f"prune_{method}").main([*method_recipe_args(digits, output_dir), *METHOD_FLAGS[method]])
    assert results["train_steps"] == 2 and results["num_samples"] == 32
    assert 0.48 <= results["macs"] / results["dense_macs"] <= 0.5  # digits.yaml: 50 % of the MACs
    model_dir = output_dir / "model"
    check_hub_folder(model_dir)
    reloaded = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    assert reloaded.config.pruning["method"] == method
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = saved["model"].eval()(pixel_values).logits
        torch.testing.assert_close(reloaded(pixel_values).logits, expected, atol=1e-5, rtol=0)
    if method == "nvit":  # --kinds: Q/K and V dims stay
        assert reloaded.config.qk_head_dims == reloaded.config.v_head_dims == [32] * 6
    if method == "lpvit":  # the masks stay through fine-tuning and saving
        from hf_vitprune.methods.lpvit import masked_fraction

        assert reloaded.config.block_sparsity and masked_fraction(reloaded) > 0
    if method == "savit":  # the saved statistics give the same plan again without data
        recipe = load_recipe("prune_savit")
        from hf_vitprune.methods.savit import SAViTImportance

        statistics = output_dir / "savit_importance.safetensors"
        assert SAViTImportance.load(statistics).hessian is not None
        argv = ["--output_dir", str(tmp_path / "again"), "--search", "grid", "--seed", "0"]
        args = parse_args(recipe.build_parser(), [*argv, "--importance_from", str(statistics), "--no-need_hessian"])
        _, plan = recipe.savit_prune_fn(args)(load_student(SAMPLE_MODEL), None, None)
        assert plan == PruningPlan.load(output_dir / "pruned" / "pruning_plan.json")
        assert not (tmp_path / "again").exists()  # statistics only read: nothing written
        with pytest.raises(ValueError, match="tolerance"):
            recipe.savit_prune_fn(parse_args(recipe.build_parser(), [*argv, "--tolerance", "2"]))


def test_nvit_recipe_prunes_to_a_latency_target_with_a_table_measured_here(tmp_path, monkeypatch):
    from accelerate import PartialState

    from hf_vitprune.latency import AXES, LatencyTable, default_grid

    calls = []

    def measure_macs(config, device, batch_size, grid):  # a table of block MACs: deterministic, unlike timings
        calls.append({"batch_size": batch_size, "grid": grid})
        axes, tokens = default_grid(config, grid), config.num_prefix_tokens + config.num_patches
        e, h, q, v, m = np.meshgrid(*(np.array(axes[axis], dtype=float) for axis in AXES), indexing="ij")
        seconds = tokens * (e * h * (2 * q + 2 * v) + 2 * e * m) + tokens**2 * h * (q + v)
        return LatencyTable(axes, seconds, tokens=tokens, batch_size=batch_size)

    monkeypatch.setattr(LatencyTable, "measure", measure_macs)
    recipe = load_recipe("prune_nvit")
    build = recipe.build_parser
    argv = ["--output_dir", str(tmp_path), "--target_latency_ratio", "0.6", "--measure_latency"]
    args = parse_args(build(), [*argv, "--latency_grid", "2", "--latency_batch_size", "2"])
    dense = load_student(SAMPLE_MODEL)
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=generator), "labels": torch.arange(4)}] * 2
    pruned, _ = recipe.nvit_prune_fn(args)(dense, batches, PartialState(cpu=True))
    assert calls == [{"batch_size": 2, "grid": 2}]
    table = LatencyTable.load(tmp_path / "latency_table.json")  # "measured" and saved by the recipe
    assert 0.55 <= table(pruned.config) / table(dense.config) <= 0.6
    assert pruned.config.pruning["target"] == {"latency": 0.6}
    with pytest.raises(ValueError, match="no latency table"):
        recipe.nvit_prune_fn(
            parse_args(build(), ["--output_dir", str(tmp_path / "x"), "--target_latency_ratio", "0.5"])
        )
    with pytest.raises(ValueError, match="need --target_latency_ratio"):
        recipe.nvit_prune_fn(parse_args(build(), ["--latency_table", str(tmp_path / "latency_table.json")]))


def test_lpvit_recipe_applies_an_official_mask_file_and_compacts_it(tmp_path):
    from safetensors.torch import save_file

    from hf_vitprune.convert import from_lpvit_masks

    dense = load_student(SAMPLE_MODEL)
    masks = {}
    for i in range(dense.config.num_hidden_layers):  # the first half of every MLP's hidden neurons: fc1 rows
        mask = torch.ones(512, 128)
        mask[:256] = 0
        masks[f"blocks.{i}.mlp.fc1.weight_mask"] = mask
    path = tmp_path / "sp0.50_digits_block16x16_mask_.safetensors"
    save_file(masks, path)
    recipe = load_recipe("prune_lpvit")
    args = parse_args(recipe.build_parser(), ["--lpvit_masks", str(path), "--output_dir", str(tmp_path)])
    pruned, plan = recipe.lpvit_prune_fn(args)(dense, None, None)
    assert plan is None and pruned.config.intermediate_sizes == [256] * 6
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = from_lpvit_masks(path, dense).eval()(pixel_values).logits
        torch.testing.assert_close(pruned.eval()(pixel_values).logits, expected, atol=1e-5, rtol=0)


def parser() -> argparse.ArgumentParser:
    return add_common_args(argparse.ArgumentParser())


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 2e-4, "num_train_epochs": 300, "paper": {"expected_top1": 83}}))
    args = parse_args(parser(), ["--config", str(config), "--num_train_epochs", "3"])
    assert args.learning_rate == 2e-4 and args.num_train_epochs == 3 and args.paper == {"expected_top1": 83}
    config.write_text(yaml.safe_dump({"learning_rat": 1.0}))
    with pytest.raises(ValueError, match="unknown arguments"):
        parse_args(parser(), ["--config", str(config)])
    with pytest.raises(ValueError, match="--streaming needs --max_train_steps"):
        parse_args(parser(), ["--streaming"])
    with pytest.raises(ValueError, match="--target_macs_ratio"):
        parse_args(parser(), ["--target_macs_ratio", "1.5"])


#: The recipes a shipped config is written for (digits.yaml: every one).
CONFIG_RECIPES = {"nvit": ["prune_nvit"], "savit": ["prune_savit"], "lpvit": ["prune_lpvit"]}
ALL_RECIPES = ["prune_taylor", "prune_nvit", "prune_savit", "prune_lpvit", "finetune"]


@pytest.mark.parametrize("name", sorted(p.name for p in (RECIPES / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    path = RECIPES / "configs" / name
    if name.startswith("accelerate_"):
        from accelerate.commands.config.config_args import load_config_from_file

        assert load_config_from_file(str(path)).num_processes >= 8
        return
    for recipe_name in CONFIG_RECIPES.get(name.split("_")[0], ALL_RECIPES):
        recipe = load_recipe(recipe_name)
        build = getattr(recipe, "build_parser", parser)
        args = parse_args(build(), ["--config", str(path)])
        prune_fn = getattr(recipe, f"{recipe_name.removeprefix('prune_')}_prune_fn", None)
        if prune_fn is not None:
            prune_fn(args)  # the method's options are valid
    if name != "digits.yaml":
        assert args.paper["expected_top1"] > 70 and "V100-hours" in args.paper["gpu_hours"]
        assert 0 < args.paper["reported"]["top_1_accuracy"] < 1
        assert args.num_train_epochs == 300 and args.dataset_name == "ILSVRC/imagenet-1k"


def test_transforms_follow_the_image_processor():
    from PIL import Image
    from transformers import DeiTImageProcessor

    processor = DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})
    image = Image.fromarray(torch.randint(0, 255, (48, 48, 3), dtype=torch.uint8).numpy())
    evaluation = data.eval_transforms(processor)(image)
    torch.testing.assert_close(evaluation, processor(image, return_tensors="pt")["pixel_values"][0])
    train = data.train_transforms(processor)
    first, second = train(image), train(image)
    assert first.shape == evaluation.shape == (3, 32, 32) and not torch.equal(first, second)
    with pytest.raises(ValueError, match="image size"):
        data.train_transforms(ViTImageProcessor(size={"longest_edge": 32}))


def test_dataloaders_streaming_and_mixup(digits):
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    config = tiny_config(id2label={i: str(9 - i) for i in range(10)}, label2id={str(9 - i): i for i in range(10)})
    train_set = data.load_image_dataset(digits / "digits", split="train")
    only = data.load_image_dataset(digits / "digits" / "validation", split="validation")  # class folders only
    assert only.num_rows == data.load_image_dataset(digits / "digits", split="validation").num_rows
    train, evaluation = data.make_dataloaders(
        train_set, only, processor, train_batch_size=30, eval_batch_size=64, model_config=config
    )
    assert len(train) == train_set.num_rows // 30  # the last partial batch is dropped
    batch = next(iter(evaluation))
    assert batch["pixel_values"].shape == (64, 3, 32, 32) and batch["labels"].dtype == torch.long
    names = only.features["label"].names
    first = [config.label2id[names[label]] for label in only[:64]["label"]]
    assert batch["labels"].tolist() == first  # dataset classes mapped to the model's ids by name
    mixup = data.make_mixup(10, 0.8, 1.0, 0.1)
    images, targets = mixup(batch["pixel_values"], batch["labels"])
    assert targets.shape == (64, 10) and torch.allclose(targets.sum(-1), torch.ones(64))
    assert data.make_mixup(10, 0.0, 0.0) is None
    stream = data.load_image_dataset(digits / "digits", split="validation", streaming=True)
    assert data.is_streaming(stream)
    loader = data.image_dataloader(stream, data.eval_transforms(processor), batch_size=8, shuffle=True)
    assert next(iter(loader))["pixel_values"].shape == (8, 3, 32, 32)

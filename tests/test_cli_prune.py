"""`hf-vitprune prune` / `list-models` and the Torch-Pruning integration (baselines and non-ViT timm models)."""

import re

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from test_modeling import randomize
from transformers import AutoModelForImageClassification, ViTImageProcessor

from hf_vitprune import PrunedViTForImageClassification
from hf_vitprune.cli import main
from hf_vitprune.cost import count_macs
from hf_vitprune.tp import (
    load_pruned_timm,
    save_pruned_timm,
    to_hf_vit,
    tp_prune_timm,
    tp_prune_vit,
    tp_prune_vit_to_macs,
)


@pytest.fixture
def model_folder(tmp_path):
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    model.image_processor = ViTImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label in range(3):
            folder = tmp_path / "images" / split / str(label)
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "images"


def test_prune_command_prints_the_diff_and_writes_a_loadable_folder(model_folder, tmp_path, capsys):
    output = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(model_folder),
                "--method",
                "magnitude",
                "--target-macs-ratio",
                "0.5",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "(fc1): Linear(in_features=64, out_features=128, bias=True) => (fc1): Linear(" in printed
    assert "MACs: " in printed and " G => " in printed and "Params: " in printed
    reloaded = AutoModelForImageClassification.from_pretrained(output)
    assert count_macs(reloaded) <= 0.5 * count_macs(AutoModelForImageClassification.from_pretrained(model_folder))
    assert (output / "preprocessor_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]  # no temporary left behind


def test_prune_command_with_data_for_taylor(model_folder, image_folder, tmp_path):
    output = tmp_path / "taylor"
    assert (
        main(
            [
                "prune",
                "--model",
                str(model_folder),
                "--method",
                "taylor",
                "--target-macs-ratio",
                "0.6",
                "--data",
                str(image_folder),
                "--num-samples",
                "8",
                "--batch-size",
                "4",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    assert AutoModelForImageClassification.from_pretrained(output).config.pruning["method"] == "taylor"


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--target-macs-ratio is required"),
        (["--method", "taylor", "--target-macs-ratio", "0.5"], "give --data"),
        (["--method", "magnitude", "--target-macs-ratio", "2"], r"\(0, 1\)"),
    ],
)
def test_prune_command_bad_input_is_one_clear_line(model_folder, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", str(model_folder), "--output", str(tmp_path / "x"), *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert re.search(message, error)
    assert not (tmp_path / "x").exists()


def test_torch_pruning_baseline_converts_exactly_and_meets_a_macs_target(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(num_attention_heads=4)))
    torch.testing.assert_close(to_hf_vit(model)(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=0)
    pruned = tp_prune_vit(model, 0.5)
    assert pruned.config.heads_per_layer == [2, 2, 2] and pruned.config.hidden_size < 64
    data = [{"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 10, (4,))} for _ in range(2)]
    target = tp_prune_vit_to_macs(model, 0.5, "taylor", data)
    assert count_macs(target) <= 0.5 * count_macs(model)
    assert target.config.pruning["method"] == "torch-pruning-taylor"


def test_non_vit_timm_models_prune_by_ratio_and_reload_without_pickles(tmp_path, capsys):
    import timm

    assert (
        main(
            [
                "prune",
                "--model",
                "timm/resnet10t",
                "--random-init",
                "--pruning-ratio",
                "0.5",
                "--output",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "=>" in printed and "MACs: " in printed
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False).eval()
    dense_params = sum(p.numel() for p in model.parameters())
    pruned, history = tp_prune_timm(model, 0.5)
    save_pruned_timm(pruned, history, tmp_path / "api", "resnet10t", {})
    reloaded = load_pruned_timm(tmp_path / "api")
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(reloaded(x), pruned(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) < dense_params
    with pytest.raises(ValueError, match="pruning_ratio"):
        tp_prune_timm(model, 1.5)


def test_list_models_names_convertible_timm_vits(capsys):
    assert main(["list-models", "--filter", "deit_tiny*"]) == 0
    printed = capsys.readouterr().out
    assert "deit_tiny_patch16_224" in printed and "deit_tiny_distilled_patch16_224" in printed
    assert "ViTForImageClassification" in printed

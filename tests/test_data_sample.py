"""The digits imagefolder (hf_vitprune.data) and the shipped sample model (hf_vitprune.sample)."""

import json

import numpy as np
import pytest
import torch
from datasets import ClassLabel, load_dataset
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor

from hf_vitprune import PrunedViTForImageClassification
from hf_vitprune.data import (
    DIGITS_CLASSES,
    digits_images,
    digits_transforms,
    stratified_split,
    write_digits_imagefolder,
)
from hf_vitprune.evaluation import evaluate_model
from hf_vitprune.sample import SAMPLE_MODEL_DIR, load_sample_model, main, sample_config

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", image_size=32)


def test_imagefolder_layout_counts_and_stratification(digits_root):
    per_split = {
        split: {digit: len(list((digits_root / split / digit).glob("*.png"))) for digit in DIGITS_CLASSES}
        for split in ("train", "validation")
    }
    assert sorted(p.name for p in digits_root.iterdir() if not p.name.startswith(".")) == ["train", "validation"]
    assert sum(per_split["train"].values()) + sum(per_split["validation"].values()) == NUM_DIGITS
    assert sum(per_split["validation"].values()) == 359
    for digit in DIGITS_CLASSES:  # every class is split 80/20
        total = per_split["train"][digit] + per_split["validation"][digit]
        assert per_split["validation"][digit] == round(0.2 * total)
    # the two splits are disjoint: file names are indices into the scikit-learn digits
    names = [{p.stem for p in (digits_root / split).rglob("*.png")} for split in ("train", "validation")]
    assert not names[0] & names[1] and len(names[0] | names[1]) == NUM_DIGITS


def test_images_are_rgb_upscaled_digits(digits_root):
    from sklearn.datasets import load_digits

    path = next((digits_root / "validation" / "7").glob("*.png"))
    image = Image.open(path)
    assert image.mode == "RGB" and image.size == (32, 32)
    array = np.asarray(image)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    source = load_digits()
    index = int(path.stem)
    assert source.target[index] == 7
    # downscaling back by 4x4 averaging recovers the 8x8 source up to interpolation blur
    pooled = array[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16 / 255
    assert np.corrcoef(pooled.ravel(), source.images[index].ravel())[0, 1] > 0.9


def test_loadable_by_datasets_imagefolder(digits_root):
    dataset = load_dataset("imagefolder", data_dir=str(digits_root))
    assert set(dataset) == {"train", "validation"}
    assert dataset["train"].num_rows + dataset["validation"].num_rows == NUM_DIGITS
    label = dataset["validation"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == list(DIGITS_CLASSES)
    example = dataset["validation"][0]
    assert example["image"].size == (32, 32)
    # the label matches the folder the image came from
    assert example["image"].filename.split("/")[-2] == label.int2str(example["label"])


def test_writer_is_idempotent_and_refuses_foreign_folders(digits_root, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in digits_root.rglob("*.png")}
    assert write_digits_imagefolder(digits_root, image_size=32) == digits_root
    assert {p: p.stat().st_mtime_ns for p in digits_root.rglob("*.png")} == before
    with pytest.raises(ValueError, match="not a digits imagefolder"):
        write_digits_imagefolder(digits_root, image_size=16)  # written with other parameters
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a digits imagefolder"):
        write_digits_imagefolder(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # an empty directory is filled; nothing is left behind next to it
    (tmp_path / "empty").mkdir()
    root = write_digits_imagefolder(tmp_path / "empty", image_size=16, val_fraction=0.5, seed=1)
    assert Image.open(next(root.rglob("*.png"))).size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other"]
    assert json.loads((root / ".digits.json").read_text()) == {"image_size": 16, "val_fraction": 0.5, "seed": 1}


def test_split_is_deterministic_and_seeded():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    train, validation = stratified_split(labels, 0.2, seed=0)
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(validation, again[1])
    assert np.bincount(labels[validation]).tolist() == [2, 4, 1]
    assert sorted([*train, *validation]) == list(range(len(labels)))
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], validation)


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0.0}, {"val_fraction": 1.0}])
def test_bad_split_fraction(kwargs, tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        write_digits_imagefolder(tmp_path / "digits", **kwargs)
    assert not (tmp_path / "digits").exists()


@pytest.mark.parametrize("image_size", [4, 32.0, True])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        digits_images(image_size)


def test_transforms_normalise_with_the_processor_and_augment_only_for_training(digits_root):
    dataset = load_dataset("imagefolder", data_dir=str(digits_root), split="validation").select(range(8))
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2] * 3, image_std=[0.4] * 3)
    batch = dataset.with_transform(digits_transforms(processor, train=False))[:8]
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].tolist() == dataset["label"]
    raw = torch.tensor(np.stack([np.asarray(image) for image in dataset["image"]])).permute(0, 3, 1, 2) / 255
    torch.testing.assert_close(batch["pixel_values"], (raw - 0.2) / 0.4, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    augmented = dataset.with_transform(digits_transforms(processor, train=True))[:8]["pixel_values"]
    assert augmented.shape == batch["pixel_values"].shape and not torch.allclose(augmented, batch["pixel_values"])
    torch.manual_seed(0)
    assert torch.equal(dataset.with_transform(digits_transforms(processor, train=True))[:8]["pixel_values"], augmented)


def test_sample_model_folder_loads_through_the_auto_classes():
    names = {p.name for p in SAMPLE_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert not {"configuration_pruned_vit.py", "modeling_pruned_vit.py"} & names  # the package has the code
    assert sum(p.stat().st_size for p in SAMPLE_MODEL_DIR.iterdir()) < 10 * 2**20
    config = json.loads((SAMPLE_MODEL_DIR / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].endswith("PrunedViTForImageClassification")
    model = AutoModelForImageClassification.from_pretrained(SAMPLE_MODEL_DIR)
    assert isinstance(model, PrunedViTForImageClassification)
    expected = sample_config()
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size", "image_size"):
        assert getattr(model.config, name) == getattr(expected, name)
    assert model.config.layer_norm_eps == 1e-6 and model.config.id2label == dict(enumerate(DIGITS_CLASSES))
    processor = AutoImageProcessor.from_pretrained(SAMPLE_MODEL_DIR)
    assert processor.size == {"height": 32, "width": 32}
    assert processor(Image.new("RGB", (8, 8)), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_sample_model_is_accurate_on_the_validation_split(digits_root):
    model = load_sample_model()
    dataset = load_dataset("imagefolder", data_dir=str(digits_root), split="validation")
    metrics = evaluate_model(model, dataset, batch_size=128, top_k=(1,))
    assert metrics["num_samples"] == 359
    assert metrics["top_1_accuracy"] >= 0.93


def test_evaluate_command_prints_the_table(digits_root, capsys):
    assert main(["--evaluate", "--data-dir", str(digits_root)]) == 0
    out = capsys.readouterr().out
    assert "359 images" in out and "| top-1 accuracy | MACs per image | params" in out
    row = out.strip().splitlines()[-1]
    accuracy = float(row.split("|")[1].strip().rstrip(" %"))
    assert 90 <= accuracy <= 100


def test_sample_command_needs_an_action():
    with pytest.raises(SystemExit):
        main([])

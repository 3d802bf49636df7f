"""The Hub: model cards (render, parse back, update), Hub-ready folders, one-commit pushes (HfApi mocked), loading a
folder laid out as the Hub repo by path and by id (natively and with trust_remote_code, hf_vitprune blocked),
evaluation through the shipped metric, and the convert/eval/push commands."""

import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_config
from helpers import populate_hub_cache, run_python
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from test_modeling import IRREGULAR, randomize
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor

from hf_vitprune import PrunedViTForImageClassification, PrunedViTForImageClassificationWithTeacher
from hf_vitprune.cli import main
from hf_vitprune.cost import count_macs, count_params
from hf_vitprune.data import load_image_dataset
from hf_vitprune.evaluation import compare_latency, evaluate_model, measure_latency, tune_cpu_allocator
from hf_vitprune.hub import (
    CHART_NAME,
    check_hub_folder,
    push,
    render_model_card,
    save_hub_folder,
    update_card_results,
    write_model_card,
)

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HUB_FILES = [
    "README.md",
    CHART_NAME,
    "config.json",
    "configuration_pruned_vit.py",
    "model.safetensors",
    "modeling_pruned_vit.py",
    "preprocessor_config.json",
]
METRICS = {"top_1_accuracy": 0.625, "top_5_accuracy": 0.875, "num_samples": 8}


def processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 32, "width": 32})


def pruned_model(model_class=PrunedViTForImageClassification, **overrides):
    """An irregular (pruned-looking) tiny model with class names, a pruning record and an image processor."""
    labels = dict(id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})
    model = randomize(model_class(tiny_config(**IRREGULAR, **labels, **overrides)))
    model.config.pruning = {
        "method": "taylor",
        "source": "facebook/deit-tiny-patch16-224",
        "target": {"macs": 0.5},
        "dense_macs": count_macs(tiny_config()),
        "dense_params": count_params(tiny_config()),
    }
    model.image_processor = processor()
    return model


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "tiny-taylor"
    save_hub_folder(pruned_model(), folder, dense_config=tiny_config(), dataset="ILSVRC/imagenet-1k", metrics=METRICS)
    return folder


@pytest.fixture
def folder_copy(hub_folder, tmp_path) -> Path:
    return Path(shutil.copytree(hub_folder, tmp_path / hub_folder.name))


def write_imagefolder(root: Path, classes: list[str], per_class: int = 4, seed: int = 0) -> Path:
    """`root/{train,validation}/<class>/<i>.png`, random 32x32 RGB images."""
    generator = torch.Generator().manual_seed(seed)
    for split in ("train", "validation"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------------------------
# Cards


def test_card_renders_and_parses_back(hub_folder):
    card = ModelCard.load(hub_folder / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.base_model == "facebook/deit-tiny-patch16-224" and data.license == "apache-2.0"
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    assert {"pruning", "hf_vitprune", "taylor"} <= set(data.tags)
    assert data.model_name == "deit-tiny-patch16-224-taylor-pruned"
    results = {r.metric_name: r for r in data.eval_results}
    assert results["Top-1 Accuracy"].metric_value == 0.625 and results["Top-5 Accuracy"].metric_value == 0.875
    assert all(r.dataset_split == "validation" and r.source_name is None for r in results.values())
    # body: method and citation, cost, one table row per block with pruned / dense dims, the chart
    assert "DepGraph: Towards Any Structural Pruning" in card.text and "@inproceedings{fang2023depgraph" in card.text
    assert f"| MACs per image | {count_macs(tiny_config()) / 1e6:.2f} M |" in card.text
    assert "| 1 | 2 / 4 | 16 / 16 | 8 / 16 | 64 / 128 | 40 / 64 |" in card.text
    assert "| 2 | 3 / 4 | 8 / 16 | 24 / 16 | 96 / 128 | 64 / 64 |" in card.text
    assert "| Top-1 Accuracy | 62.50% | ImageNet-1k | validation | measured with hf_vitprune |" in card.text
    assert f"![Per-block dimensions, dense beside pruned]({CHART_NAME})" in card.text
    assert 'from_pretrained("your-username/deit-tiny-patch16-224-taylor-pruned")' in card.text
    assert "trust_remote_code=True" in card.text
    chart = hub_folder / CHART_NAME
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(chart) as image:
        image.verify()
        assert image.format == "PNG" and image.width > image.height > 100


def test_paper_checkpoint_card_has_its_licence_and_reported_accuracy(tmp_path):
    model = pruned_model(PrunedViTForImageClassificationWithTeacher, use_distillation_token=True)
    model.config.pruning = {"source": "/secret/path/ft_checkpoint.pth", "source_class": "NViT ft_checkpoint.pth"}
    card = write_model_card(tmp_path, model, method="nvit", reported={"top_1_accuracy": 0.8329}, chart=None)
    assert not (tmp_path / CHART_NAME).exists()
    parsed = ModelCard.load(tmp_path / "README.md")
    assert parsed.data.license == "cc-by-nc-sa-4.0" and parsed.data.base_model is None
    (reported,) = parsed.data.eval_results
    assert reported.metric_value == 0.8329 and reported.dataset_type == "ILSVRC/imagenet-1k"
    assert reported.source_name == "NViT paper (reported)" and reported.source_url == "https://arxiv.org/abs/2110.04869"
    assert "Global Vision Transformer Pruning with Hessian-Aware Saliency" in card.text and "/secret/" not in card.text
    assert "`ft_checkpoint.pth`" in card.text and "distillation token" in card.text
    assert "Dense dims not recorded." in card.text and "![" not in card.text

    # a measurement on the same dataset: model-index keeps it alone (one source per group), the body keeps both
    card = update_card_results(tmp_path, {"top_1_accuracy": 0.81}, dataset="ILSVRC/imagenet-1k")
    parsed = ModelCard.load(tmp_path / "README.md")
    assert [(r.metric_value, r.source_name) for r in parsed.data.eval_results] == [(0.81, None)]
    assert "| Top-1 Accuracy | 81.00% | ImageNet-1k | validation | measured with hf_vitprune |" in parsed.text
    assert "| Top-1 Accuracy | 83.29% | ImageNet-1k | validation | [NViT paper (reported)]" in parsed.text


def test_update_card_results_replaces_measurements_and_latency_only(folder_copy, tmp_path):
    before = (folder_copy / "README.md").read_text()
    data = str(tmp_path / "digits")
    latency = {"seconds": 0.0125, "batch_size": 64, "device": "cpu", "dense_seconds": 0.025}
    update_card_results(folder_copy, {"top_1_accuracy": 0.5, "top_5_accuracy": 1.0}, dataset=data, latency=latency)
    card = ModelCard.load(folder_copy / "README.md")
    values = {(r.dataset_type, r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert values == {
        ("ILSVRC/imagenet-1k", "ImageNet-1k", "Top-1 Accuracy"): 0.625,
        ("ILSVRC/imagenet-1k", "ImageNet-1k", "Top-5 Accuracy"): 0.875,
        ("imagefolder", "digits", "Top-1 Accuracy"): 0.5,
        ("imagefolder", "digits", "Top-5 Accuracy"): 1.0,
    }
    assert "Measured latency: 12.50 ms per batch of 64 images on cpu (50.0% of the dense model's 25.00 ms)" in card.text
    assert "| Top-5 Accuracy | 100.00% | digits | validation | measured with hf_vitprune |" in card.text
    # everything outside the two regions is unchanged
    after = (folder_copy / "README.md").read_text()
    assert before.split("## Architecture")[1].split("## Evaluation")[0] in after
    assert before.split("## How to use")[1] == after.split("## How to use")[1]


def test_card_rejects_bad_input():
    model = pruned_model()
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\]"):
        render_model_card(model, dataset="ILSVRC/imagenet-1k", metrics={"top_1_accuracy": 81.2})
    with pytest.raises(ValueError, match="dataset is required"):
        render_model_card(model, metrics={"top_1_accuracy": 0.8})
    with pytest.raises(ValueError, match="base_model must be a Hub model id"):
        render_model_card(model, base_model="/local/checkpoint.pth")
    with pytest.raises(ValueError, match="dense_config has 2 blocks"):
        render_model_card(model, dense_config=tiny_config(num_hidden_layers=2))
    with pytest.raises(TypeError, match="to_pruned_vit"):
        render_model_card(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="latency must be a dict"):
        render_model_card(model, latency=0.01)


# ----------------------------------------------------------------------------------------------------------------
# Folders and pushing


def test_save_hub_folder_writes_a_complete_folder_and_replaces_only_when_complete(hub_folder, folder_copy):
    assert check_hub_folder(hub_folder) == sorted(HUB_FILES)
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].endswith(".PrunedViTForImageClassification")
    assert AutoImageProcessor.from_pretrained(hub_folder).size == {"height": 32, "width": 32}

    original = (folder_copy / "README.md").read_text()
    with pytest.raises(ValueError, match="fraction"):  # fails while writing the card: the old folder stays
        save_hub_folder(pruned_model(), folder_copy, dataset="x/y", metrics={"top_1_accuracy": 2.0})
    assert (folder_copy / "README.md").read_text() == original and check_hub_folder(folder_copy)
    assert sorted(p.name for p in folder_copy.parent.iterdir()) == [folder_copy.name]  # no temporary folders left
    save_hub_folder(pruned_model(), folder_copy, model_name="renamed")
    assert ModelCard.load(folder_copy / "README.md").data.model_name == "renamed"
    assert sorted(p.name for p in folder_copy.parent.iterdir()) == [folder_copy.name]

    bare = pruned_model()
    del bare.image_processor
    with pytest.raises(ValueError, match="image processor"):
        save_hub_folder(bare, folder_copy.parent / "other")


def test_push_uploads_every_file_in_one_commit(hub_folder):
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True) as create_repo,
        mock.patch.object(HfApi, "create_commit", autospec=True) as create_commit,
        mock.patch.object(HfApi, "upload_folder", autospec=True) as upload_folder,
    ):
        files = push(hub_folder, "org/tiny-taylor", private=True, commit_message="first")
    assert files == sorted(HUB_FILES)
    create_repo.assert_called_once()
    assert create_repo.call_args.args[1] == "org/tiny-taylor"
    assert create_repo.call_args.kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    create_commit.assert_called_once()
    upload_folder.assert_not_called()
    _, repo_id, operations = create_commit.call_args.args
    assert repo_id == "org/tiny-taylor" and create_commit.call_args.kwargs["commit_message"] == "first"
    assert sorted(op.path_in_repo for op in operations) == sorted(HUB_FILES)
    card = next(op for op in operations if op.path_in_repo == "README.md").path_or_fileobj
    text = card.getvalue().decode() if hasattr(card, "getvalue") else card.decode()
    assert 'from_pretrained("org/tiny-taylor")' in text and "your-username" not in text
    assert "your-username" in (hub_folder / "README.md").read_text()  # the local card is unchanged
    weights = next(op for op in operations if op.path_in_repo == "model.safetensors")
    assert Path(weights.path_or_fileobj) == hub_folder / "model.safetensors"


def test_push_refuses_incomplete_folders_before_any_network(folder_copy):
    (folder_copy / "modeling_pruned_vit.py").unlink()
    (folder_copy / "preprocessor_config.json").unlink()
    (folder_copy / CHART_NAME).unlink()
    with mock.patch.object(HfApi, "create_repo") as create_repo:
        with pytest.raises(FileNotFoundError) as error:
            push(folder_copy, "org/name")
        create_repo.assert_not_called()
    message = str(error.value)
    assert "modeling_pruned_vit.py (code for trust_remote_code)" in message
    assert "preprocessor_config.json (the image processor)" in message
    assert f"{CHART_NAME} (shown by the model card)" in message and "config.json (the config" not in message
    assert message.count("modeling_pruned_vit.py") == 1
    (folder_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors or model.safetensors.index.json"):
        check_hub_folder(folder_copy)
    config = json.loads((folder_copy / "config.json").read_text())
    (folder_copy / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(ValueError, match="auto_map lacks"):
        check_hub_folder(folder_copy)
    with pytest.raises(ValueError, match="owner/name"):
        push(folder_copy, "just-a-name", dry_run=True)


def test_cli_push_dry_run_lists_the_files_without_network(hub_folder, capsys):
    with mock.patch.object(HfApi, "create_repo", side_effect=AssertionError("network")):
        assert main(["push", str(hub_folder), "org/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Would upload 7 files to https://huggingface.co/org/tiny in one commit:" in out
    assert [line.strip() for line in out.splitlines()[1:]] == sorted(HUB_FILES)
    with mock.patch.object(HfApi, "create_repo"), mock.patch.object(HfApi, "create_commit") as create_commit:
        assert main(["push", str(hub_folder), "org/tiny", "--commit-message", "v1"]) == 0
    assert create_commit.call_args.kwargs["commit_message"] == "v1"
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(hub_folder.parent / "missing"), "org/tiny"])
    assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("model_class", [PrunedViTForImageClassification, PrunedViTForImageClassificationWithTeacher])
def test_hub_folder_loads_through_the_auto_class(model_class, tmp_path, pixel_values):
    model = pruned_model(model_class, use_distillation_token=model_class is PrunedViTForImageClassificationWithTeacher)
    save_hub_folder(model, tmp_path / "repo")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "repo").eval()
    assert type(reloaded) is model_class
    torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=0)


def test_loading_by_id_natively_and_with_remote_code_without_hf_vitprune(tmp_path, pixel_values):
    """The Hub folder of a DeiT-style (two-head) model in a Hub cache: `from_pretrained("org/name")` offline, here
    with hf_vitprune, and in a fresh process where it cannot be imported, through the repo's code."""
    model = pruned_model(PrunedViTForImageClassificationWithTeacher, use_distillation_token=True)
    save_hub_folder(model, tmp_path / "repo")
    populate_hub_cache(tmp_path / "cache", "org/tiny-deit", tmp_path / "repo")
    native = AutoModelForImageClassification.from_pretrained("org/tiny-deit", cache_dir=tmp_path / "cache").eval()
    assert type(native) is PrunedViTForImageClassificationWithTeacher
    torch.testing.assert_close(native(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=0)

    torch.save({"x": pixel_values, "logits": model(pixel_values).logits.detach()}, tmp_path / "io.pt")
    script = """
        import torch
        from PIL import Image
        from transformers import AutoModelForImageClassification, pipeline
        io = torch.load("io.pt")
        model = AutoModelForImageClassification.from_pretrained("org/tiny-deit", trust_remote_code=True).eval()
        print("CLASS", type(model).__module__, type(model).__name__)
        print("DIFF", (model(io["x"]).logits - io["logits"]).abs().max().item())
        classifier = pipeline("image-classification", model="org/tiny-deit", trust_remote_code=True)
        print("TOP", len(classifier(Image.new("RGB", (40, 40)))))
    """
    out = run_python(script, tmp_path, with_hf_vitprune=False, HF_HUB_CACHE=str(tmp_path / "cache"))
    module, name = out.split("CLASS")[1].split()[:2]
    assert module.startswith("transformers_modules.org.tiny") and name == "PrunedViTForImageClassificationWithTeacher"
    assert float(out.split("DIFF")[1].split()[0]) < 1e-6
    assert int(out.split("TOP")[1].split()[0]) == 5


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    # "nine", "one", "two": the imagefolder numbers them 0, 1, 2; the model calls them 9, 1, 2
    return write_imagefolder(tmp_path_factory.mktemp("data") / "imgs", ["nine", "one", "two"])


def direct_accuracy(model, dataset, processor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy computed image by image with torch, labels mapped by name when the model knows the names."""
    names = dataset.features["label"].names
    by_name = set(names) <= set(model.config.label2id)
    hits = dict.fromkeys(ks, 0)
    with torch.no_grad():
        for row in dataset:
            pixels = processor(row["image"].convert("RGB"), return_tensors="pt")["pixel_values"]
            ranked = model(pixels).logits[0].argsort(descending=True).tolist()
            label = model.config.label2id[names[row["label"]]] if by_name else row["label"]
            for k in ks:
                hits[k] += label in ranked[:k]
    return {f"top_{k}_accuracy": hits[k] / len(dataset) for k in ks}


def test_evaluate_model_matches_a_direct_computation(imagefolder):
    model = pruned_model()
    dataset = load_image_dataset(str(imagefolder), "validation")
    assert len(dataset) == 12
    results = evaluate_model(model, dataset, batch_size=5)
    assert results == {**direct_accuracy(model, dataset, processor()), "num_samples": 12}

    # labels follow the model's names: a classifier that always ranks 9 ("nine"), 1 ("one"), 0, 3, 4 first
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(-0.1 * torch.arange(10.0))
        model.classifier.bias[[9, 1, 2]] = torch.tensor([10.0, 9.0, -5.0])
    results = evaluate_model(model, dataset, image_processor=processor(), top_k=(1, 2, 5, 20))
    assert results == {"top_1_accuracy": 4 / 12, "top_2_accuracy": 8 / 12, "top_5_accuracy": 8 / 12, "num_samples": 12}
    assert model.training is False


def test_evaluate_model_on_a_dataloader_and_bad_input(pixel_values):
    model = pruned_model().train()
    labels = torch.tensor([3, 7])
    batches = [(pixel_values, labels), (pixel_values.flip(0), labels.flip(0))]
    with torch.no_grad():
        logits = torch.cat([model.eval()(x).logits for x, _ in batches])
    model.train()
    ranked = logits.argsort(dim=-1, descending=True)
    expected = (ranked[:, :3] == torch.cat([labels, labels.flip(0)])[:, None]).any(-1).float().mean().item()
    results = evaluate_model(model, batches, top_k=(3,))
    assert results == {"top_3_accuracy": expected, "num_samples": 4} and model.training
    with pytest.raises(ValueError, match="labels must be in \\[0, 10\\)"):
        evaluate_model(model, [(pixel_values, torch.tensor([0, 10]))])
    with pytest.raises(ValueError, match="top_k"):
        evaluate_model(model, batches, top_k=(0,))
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(model, [])


def test_measure_latency(tiny_model):
    tiny_model.train()
    seconds = measure_latency(tiny_model, batch_size=2, repeats=3, warmup=1)
    assert 0 < seconds < 5 and tiny_model.training
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(tiny_model, repeats=0)
    with pytest.raises(ValueError, match="image_size is required"):
        measure_latency(torch.nn.Linear(3, 3))


def test_compare_latency_times_models_round_robin(tiny_model):
    calls = []
    small = PrunedViTForImageClassification(tiny_config(num_hidden_layers=1)).train()
    hooks = [
        m.register_forward_hook(lambda *_, n=n: calls.append(n)) for n, m in (("big", tiny_model), ("small", small))
    ]
    big_seconds, small_seconds = compare_latency([tiny_model, small], batch_size=2, repeats=3, warmup=1)
    assert calls == ["big", "small", "small", "big"] * 2  # one pass of each per step, order reversed every other
    assert 0 < small_seconds and 0 < big_seconds and small.training and not tiny_model.training
    with pytest.raises(ValueError, match="at least one model"):
        compare_latency([])
    for hook in hooks:
        hook.remove()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_cpu_allocator_stops_the_page_faults_of_every_forward_pass(tmp_path):
    """In a fresh process (the allocator setting is process-wide): the sample ViT at batch 64 page-faults on its
    activations in every pass under glibc's defaults, and (almost) never once tuned."""
    out = run_python(
        """
        import resource, torch
        from hf_vitprune.evaluation import tune_cpu_allocator
        from hf_vitprune.sample import load_sample_model
        model, x = load_sample_model().eval(), torch.randn(64, 3, 32, 32)

        def faults_per_pass():
            with torch.inference_mode():
                for _ in range(3):  # warm-up: the heap grows to its steady size
                    model(pixel_values=x)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(3):
                    model(pixel_values=x)
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3

        default = faults_per_pass()
        print(default, tune_cpu_allocator(), faults_per_pass())
        """,
        tmp_path,
        with_hf_vitprune=True,
    )
    default, applied, tuned = out.split()
    assert applied == "True" and float(default) > 1000 and float(tuned) < float(default) / 10, out
    with pytest.raises(ValueError, match="trim_threshold must be an integer"):
        tune_cpu_allocator(trim_threshold=2**31)


def test_cli_eval_prints_and_writes_the_card(folder_copy, imagefolder, capsys):
    model = AutoModelForImageClassification.from_pretrained(folder_copy)
    dataset = load_image_dataset(str(imagefolder), "validation")
    expected = direct_accuracy(model, dataset, processor())
    args = ["eval", "--model", str(folder_copy), "--data", str(imagefolder), "--batch-size", "5"]
    assert main([*args, "--latency-repeats", "1", "--write-card"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 accuracy: {100 * expected['top_1_accuracy']:.2f}%" in out
    assert f"top-5 accuracy: {100 * expected['top_5_accuracy']:.2f}%" in out
    assert f"MACs: {count_macs(model) / 1e9:.4f} G" in out and f"Params: {count_params(model) / 1e6:.4f} M" in out
    assert "ms per batch of 5 on cpu" in out and "samples: 12" in out
    card = ModelCard.load(folder_copy / "README.md")
    measured = {r.metric_name: r.metric_value for r in card.data.eval_results if r.dataset_type == "imagefolder"}
    assert measured == {"Top-1 Accuracy": expected["top_1_accuracy"], "Top-5 Accuracy": expected["top_5_accuracy"]}
    assert "ms per batch of 5 images on cpu" in card.text
    with pytest.raises(SystemExit):
        main(["eval", "--model", "org/not-a-folder", "--data", str(imagefolder), "--write-card"])
    assert "--write-card needs --model to be a local folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# convert


def test_cli_convert_hf_writes_an_exact_hub_folder(tmp_path, pixel_values):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=10,
    )  # fmt: skip
    torch.manual_seed(0)
    source = ViTForImageClassification(config).eval()
    source.save_pretrained(tmp_path / "vit")
    processor().save_pretrained(tmp_path / "vit")
    assert main(["convert", "--from", "hf", str(tmp_path / "vit"), "--output", str(tmp_path / "out")]) == 0
    assert check_hub_folder(tmp_path / "out") == sorted(HUB_FILES)
    converted = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(converted(pixel_values).logits, source(pixel_values).logits, atol=1e-5, rtol=0)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "pruning" in card.data.tags and card.data.base_model is None  # a local folder is not a Hub id
    assert "not pruned" in card.text and "| 0 | 4 / 4 |" in card.text and "this model / the source model" in card.text
    # the first measured results go into model-index under the card's name
    update_card_results(tmp_path / "out", {"top_1_accuracy": 0.5}, dataset="beans")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.model_name == card.text.split("# ")[1].split("\n")[0] == "vit-pruned-vit"


def test_cli_convert_timm(tmp_path):
    assert main(["convert", "--from", "timm", "vit_tiny_patch16_224", "--random-init", "--output", str(tmp_path)]) == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model.startswith("timm/vit_tiny_patch16_224")
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 12


def test_cli_convert_nvit_checkpoint_with_licence_and_reported_accuracy(tmp_path, capsys):
    from test_nvit import masked_state, save_checkpoint

    from hf_vitprune.convert import from_nvit_checkpoint

    save_checkpoint(tmp_path / "pruned_checkpoint.pth", masked_state(0, prune_embed=False))
    args = ["convert", "--from", "nvit", str(tmp_path / "pruned_checkpoint.pth"), "--output", str(tmp_path / "out")]
    assert main([*args, "--reported-top1", "83.29", "--model-name", "nvit-tiny", "--repo-id", "org/nvit-tiny"]) == 0
    check_hub_folder(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and "nvit" in card.data.tags
    (reported,) = card.data.eval_results
    assert reported.metric_value == 0.8329 and reported.source_name == "NViT paper (reported)"
    assert 'from_pretrained("org/nvit-tiny")' in card.text
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    direct = from_nvit_checkpoint(tmp_path / "pruned_checkpoint.pth")
    x = torch.randn(2, 3, direct.config.image_size, direct.config.image_size)
    torch.testing.assert_close(reloaded(x).logits, direct(x).logits, atol=1e-6, rtol=0)
    with pytest.raises(SystemExit):
        main([*args, "--reported-top1", "183"])
    assert "--reported-top1 is a percentage" in capsys.readouterr().err


def test_cli_convert_lpvit_needs_the_base_model(hub_folder, tmp_path):
    from hf_vitprune.modeling_pruned_vit import expand_block_mask

    blocks = (torch.rand(8, 4, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.uint8)
    mask = expand_block_mask(blocks, (16, 16), (128, 64)).float()
    torch.save({"vit.layers.0.mlp.fc1.weight_mask": mask}, tmp_path / "masks.pt")
    args = ["convert", "--from", "lpvit", str(tmp_path / "masks.pt"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(args)
    assert main([*args, "--base-model", str(hub_folder)]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "lpvit" in card.data.tags and "LPViT: Low-Power Semi-structured Pruning" in card.text
    assert "block-sparse weights in 16x16 blocks" in card.text
    base = AutoModelForImageClassification.from_pretrained(hub_folder)
    sparse = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert count_macs(sparse) < count_macs(base)
    assert f"| {count_macs(base) / 1e6:.2f} M | {count_macs(sparse) / 1e6:.2f} M |" in card.text


def test_cli_convert_reports_a_missing_converter(monkeypatch, tmp_path, capsys):
    import hf_vitprune.convert

    monkeypatch.delattr(hf_vitprune.convert, "from_savit_checkpoint")
    (tmp_path / "ckpt.pth").write_bytes(b"")
    code = main(["convert", "--from", "savit", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert "savit converter (hf_vitprune.convert.from_savit_checkpoint) is not available" in capsys.readouterr().err


def test_shipped_digits_model_converts_evaluates_and_publishes(tmp_path, capsys):
    """End to end on the digits ViT shipped with hf_vitprune: convert to a Hub folder, evaluate on the digits
    imagefolder into the card, dry-run the push."""
    sample = pytest.importorskip("hf_vitprune.sample", reason="the shipped sample model is not in this version")
    data = pytest.importorskip("hf_vitprune.data", reason="the digits data set is not in this version")
    root = tmp_path / "digits"
    data.write_digits_imagefolder(root, image_size=32)
    split = "validation" if (root / "validation").is_dir() else "train"
    out = tmp_path / "digits-vit"
    assert main(["convert", "--from", "hf", str(sample.SAMPLE_MODEL_DIR), "--output", str(out)]) == 0
    args = ["eval", "--model", str(out), "--data", str(root), "--split", split, "--latency-repeats", "1"]
    assert main([*args, "--write-card"]) == 0
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    dataset = load_image_dataset(str(root), split)
    expected = direct_accuracy(model, dataset, AutoImageProcessor.from_pretrained(out))
    assert f"top-1 accuracy: {100 * expected['top_1_accuracy']:.2f}%" in capsys.readouterr().out
    assert expected["top_1_accuracy"] > 0.5  # a trained model, not chance (10 classes)
    card = ModelCard.load(out / "README.md")
    values = sorted(r.metric_value for r in card.data.eval_results)
    assert values == pytest.approx(sorted(expected.values()), abs=1e-6)  # the card keeps 6 decimals
    assert main(["push", str(out), "org/digits-vit", "--dry-run"]) == 0
    assert "Would upload 7 files" in capsys.readouterr().out

"""The sample model shipped with hf_vitprune: a small dense ViT trained on the scikit-learn digits.

It is the default model of the demo, the benchmarks, the Space and the tests: real (trained, so pruning has
something to lose), offline (no Hub download) and big enough that a model pruned to half its MACs is measurably
faster on a CPU. `make sample-model` retrains it:

    python -m hf_vitprune.sample --train --output hf_vitprune/sample_model   # train, save, write the card
    python -m hf_vitprune.sample --evaluate                                  # accuracy, MACs, params
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, ViTImageProcessor, get_cosine_schedule_with_warmup

from .configuration_pruned_vit import PrunedViTConfig
from .cost import count_macs, count_params
from .data import DIGITS_CLASSES, digits_transforms, load_image_dataset, write_digits_imagefolder
from .evaluation import evaluate_model
from .hub import write_folder_atomically
from .modeling_pruned_vit import PrunedViTForImageClassification

logger = logging.getLogger(__name__)

#: The shipped model folder (config, safetensors, modeling code, image processor, card).
SAMPLE_MODEL_DIR = Path(__file__).resolve().parent / "sample_model"
IMAGE_SIZE = 32
TRAIN_COMMAND = "make sample-model"
CODE_FILES = ("configuration_pruned_vit.py", "modeling_pruned_vit.py")


def sample_config(**overrides: Any) -> PrunedViTConfig:
    """The sample architecture: ViT with 6 blocks, width 128, 4 heads of 32, MLP 512, patch 4 on 32x32 RGB
    images (64 patches + CLS = 65 tokens), timm's LayerNorm eps, labels "0".."9"."""
    kwargs: dict[str, Any] = dict(
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        image_size=IMAGE_SIZE,
        patch_size=4,
        layer_norm_eps=1e-6,
        id2label=dict(enumerate(DIGITS_CLASSES)),
        label2id={name: i for i, name in enumerate(DIGITS_CLASSES)},
    )
    kwargs.update(overrides)
    return PrunedViTConfig(**kwargs)


def sample_image_processor() -> ViTImageProcessor:
    """Resize to 32x32 (a no-op on the digits imagefolder), rescale to [0, 1], normalise with mean = std = 0.5
    (HF ViT's convention; the digits are white on black, so the background maps to -1)."""
    return ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def load_sample_model(**from_pretrained_kwargs: Any) -> PrunedViTForImageClassification:
    """The shipped model (`SAMPLE_MODEL_DIR`) with its image processor attached as `model.image_processor`.
    Keyword arguments go to `from_pretrained` (e.g. `dtype`, `device_map`)."""
    model = PrunedViTForImageClassification.from_pretrained(SAMPLE_MODEL_DIR, **from_pretrained_kwargs)
    model.image_processor = AutoImageProcessor.from_pretrained(SAMPLE_MODEL_DIR)
    return model


def _digits_split(data_dir: str | os.PathLike, split: str):
    return load_image_dataset(str(write_digits_imagefolder(data_dir, image_size=IMAGE_SIZE)), split=split)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, LayerNorms, tokens and position embeddings (the 1-d and token tensors)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        is_token = name.endswith(("cls_token", "position_embeddings"))
        (no_decay if parameter.ndim < 2 or is_token else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def train_sample_model(
    output_dir: str | os.PathLike = SAMPLE_MODEL_DIR,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: int = 1,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Train the sample model from scratch on the digits train split and save it to `output_dir`.

    AdamW with a linear warm-up then cosine decay, small random rotations and shifts (`digits_transforms`),
    everything seeded by `seed`; on an accelerator when there is one, otherwise on the CPU with torch's default
    thread count. The folder (weights, code, image processor, a model card with the validation accuracy) is
    written atomically.

    Args:
        output_dir: the model folder to write (replaced if it exists).
        epochs, batch_size, lr, weight_decay, warmup_epochs: the optimisation.
        seed: seeds the initialisation, the shuffling and the augmentation.
        data_dir: where the digits imagefolder is (written if absent); default a temporary directory.

    Returns:
        `{"top_1_accuracy", "num_samples", "epochs", "seconds"}` on the validation split.
    """
    for name, value, minimum in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("warmup_epochs", warmup_epochs, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    torch.manual_seed(seed)
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    model = PrunedViTForImageClassification(sample_config()).to(device)
    processor = sample_image_processor()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data_dir) if data_dir is not None else Path(tmp) / "digits"
        train_set = _digits_split(root, "train").with_transform(digits_transforms(processor, train=True))
        eval_set = _digits_split(root, "validation")
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        optimizer = _optimizer(model, lr, weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_epochs * len(loader), epochs * len(loader))
        start = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            total = 0.0
            for batch in loader:
                loss = model(pixel_values=batch["pixel_values"].to(device), labels=batch["labels"].to(device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                total += loss.item()
            accuracy = evaluate_model(model, eval_set, processor, batch_size=256, top_k=(1,))["top_1_accuracy"]
            logger.info(
                "epoch %d/%d: train loss %.4f, validation accuracy %.2f %% (%.0f s)",
                epoch + 1, epochs, total / len(loader), 100 * accuracy, time.perf_counter() - start,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        metrics = evaluate_model(model, eval_set, processor, batch_size=256, top_k=(1,))
    results = {**metrics, "epochs": epochs, "seconds": seconds}
    model.image_processor = processor

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        # no copy of the modeling code in the repository: the package registers the class (Hub folders made by
        # `hf_vitprune.hub.save_hub_folder` do carry the code, for trust_remote_code)
        for code in CODE_FILES:
            (folder / code).unlink()
        (folder / "README.md").write_text(model_card(model, results, seed))

    write_folder_atomically(output_dir, save)
    logger.info("saved the sample model to %s: %s", output_dir, results)
    return results


def model_card(model: PrunedViTForImageClassification, results: dict[str, float], seed: int) -> str:
    """A short model card: what the model is, its measured accuracy and how to reproduce it."""
    config = model.config
    accuracy = 100 * results["top_1_accuracy"]
    return f"""---
library_name: transformers
pipeline_tag: image-classification
license: apache-2.0
tags: [hf_vitprune, vision-transformer, digits]
---

# hf_vitprune sample model: a small ViT on the scikit-learn digits

A dense `PrunedViTForImageClassification` (a standard ViT) shipped with hf_vitprune as the default model of its
demo, benchmarks, Space and tests.

- Architecture: {config.num_hidden_layers} blocks, width {config.hidden_size}, {config.num_attention_heads} heads of \
{config.hidden_size // config.num_attention_heads}, MLP {config.intermediate_size}, patch {config.patch_size} on \
{config.image_size}x{config.image_size} RGB ({config.num_patches + 1} tokens); {count_params(model) / 1e6:.2f} M \
parameters, {count_macs(model) / 1e6:.1f} M MACs per image.
- Data: the 1,797 scikit-learn 8x8 digits, bilinearly upscaled to {config.image_size}x{config.image_size}
  (`hf_vitprune.data.write_digits_imagefolder`); stratified split of {results["num_samples"]} validation images.
- Training: {results["epochs"]} epochs from scratch, AdamW + cosine schedule, small random rotations and shifts,
  seed {seed}; {results["seconds"] / 60:.1f} minutes on the machine that trained it.

**Validation top-1 accuracy: {accuracy:.2f} %** ({results["num_samples"]} images).

Reproduce: `{TRAIN_COMMAND}` (`python -m hf_vitprune.sample --train --output hf_vitprune/sample_model`);
evaluate: `python -m hf_vitprune.sample --evaluate`.

```python
import hf_vitprune  # registers PrunedViT with the Auto classes (this folder carries no modeling code)
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(hf_vitprune.sample.SAMPLE_MODEL_DIR)
processor = AutoImageProcessor.from_pretrained(hf_vitprune.sample.SAMPLE_MODEL_DIR)
```
"""


def evaluate_sample_model(
    model_dir: str | os.PathLike = SAMPLE_MODEL_DIR, data_dir: str | os.PathLike | None = None
) -> dict[str, float]:
    """Top-1 accuracy on the digits validation split, MACs and params of the model folder `model_dir`."""
    model = PrunedViTForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data_dir) if data_dir is not None else Path(tmp) / "digits"
        metrics = evaluate_model(model, _digits_split(root, "validation"), processor, batch_size=256, top_k=(1,))
    return {**metrics, "macs": count_macs(model), "params": count_params(model)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_vitprune.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the model and save it to --output.")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the model in --output and print a table.")
    parser.add_argument("--output", default=str(SAMPLE_MODEL_DIR), help="model folder (default: the shipped one).")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="digits imagefolder (written if absent; default: temporary).")
    args = parser.parse_args(argv)
    if not (args.train or args.evaluate):
        parser.error("choose --train, --evaluate or both.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.train:
        train_sample_model(args.output, epochs=args.epochs, seed=args.seed, data_dir=args.data_dir)
    if args.evaluate:
        results = evaluate_sample_model(args.output, data_dir=args.data_dir)
        accuracy = f"{100 * results['top_1_accuracy']:.2f} %"
        print(f"\nSample model {args.output}, digits validation split ({results['num_samples']} images):\n")
        print("| top-1 accuracy | MACs per image | params   |")
        print("|----------------|----------------|----------|")
        print(f"| {accuracy:>14} | {results['macs'] / 1e6:12.2f} M | {results['params'] / 1e6:6.3f} M |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

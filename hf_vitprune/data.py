"""Image-classification data: the scikit-learn digits written as an imagefolder, and its transforms.

The digits set (1,797 greyscale 8x8 images with 16 grey levels, bundled with scikit-learn, so no download) is
the offline stand-in for ImageNet used by the sample model, the demo, the benchmarks and the tests:
`write_digits_imagefolder` writes it as RGB PNGs that `datasets.load_dataset("imagefolder", data_dir=root)` reads
as `train`/`validation` splits with a `ClassLabel` named "0".."9".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

DIGITS_SPLITS = ("train", "validation")
DIGITS_CLASSES = tuple(str(digit) for digit in range(10))
#: Written last into a complete digits folder (a hidden file, so imagefolder ignores it): the parameters it was
#: written with, checked when the folder is reused.
_DIGITS_MARKER = ".digits.json"


def digits_images(image_size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """All 1,797 scikit-learn digits as RGB images of `image_size` x `image_size`, and their labels (0-9).

    The 16 grey levels are mapped to 0-255 (white digit on black) and upscaled with bilinear interpolation:
    nearest would make every 4x4 patch of a 32x32 image a flat copy of one source pixel, whereas bilinear gives
    the smooth strokes a ViT sees in natural images, and sub-patch shifts in augmentation remain meaningful.
    """
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 (the digits are 8x8), got {image_size!r}.")
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    images = [
        Image.fromarray(array, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
        for array in pixels
    ]
    return images, digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: sorted (train, validation) indices with `round(val_fraction * n_c)`
    validation samples from each class c (a NumPy generator seeded with `seed`, independent of scikit-learn)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    rng = np.random.default_rng(seed)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        validation.append(rng.permutation(members)[: round(val_fraction * len(members))])
    validation = np.sort(np.concatenate(validation))
    train = np.setdiff1d(np.arange(len(labels)), validation)
    return train, validation


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / _DIGITS_MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_digits_imagefolder(
    root: str | os.PathLike, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> Path:
    """Write the scikit-learn digits as an imagefolder: `root/{train,validation}/<digit>/<index>.png`.

    Images are RGB PNGs of `image_size` (see `digits_images`); the split is `stratified_split(val_fraction,
    seed)`, so it is the same on every machine (with the defaults: 1,438 train and 359 validation images). The
    folder is written to a temporary directory next to `root` and renamed into place, so `root` is either
    absent or complete, even with several processes writing at once. A complete folder written with the same
    parameters is reused as is; an empty `root` directory is filled.

    Returns:
        `root`, for `datasets.load_dataset("imagefolder", data_dir=root)`.

    Raises:
        ValueError: `root` holds anything else (other files, or digits written with other parameters).
    """
    root = Path(root)
    params = {"image_size": image_size, "val_fraction": val_fraction, "seed": seed}
    if _read_marker(root) == params:
        return root
    images, labels = digits_images(image_size)
    splits = dict(zip(DIGITS_SPLITS, stratified_split(labels, val_fraction, seed)))
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(
            f"root {str(root)!r} exists and is not a digits imagefolder written with {params}; remove it or choose "
            f"another root."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, indices in splits.items():
            for name in DIGITS_CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for index in indices:
                images[index].save(tmp / split / str(labels[index]) / f"{index:04d}.png")
        (tmp / _DIGITS_MARKER).write_text(json.dumps(params))
        if root.is_dir():
            root.rmdir()  # empty (checked above); rename cannot replace a directory on every platform
        tmp.rename(root)
    except OSError:
        if _read_marker(root) != params:  # another process did not finish the same folder first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote the digits imagefolder to %s (%s)", root, {s: len(i) for s, i in splits.items()})
    return root


def digits_transforms(image_processor: Any, train: bool) -> Callable[[dict[str, list]], dict[str, torch.Tensor]]:
    """A batch transform for `datasets.Dataset.with_transform`: `{"image", "label"}` columns to `pixel_values`
    (through `image_processor`: resize, rescale, its mean/std) and `labels`.

    With `train=True`, each image first gets a small random rotation (up to 10 degrees) and shift (up to 10 % of
    its size), filled with black like the digits' background; they draw from torch's global generator, so
    `torch.manual_seed` makes them reproducible.
    """
    from torchvision.transforms import v2

    augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=0) if train else None

    def transform(batch: dict[str, list]) -> dict[str, torch.Tensor]:
        images = [image.convert("RGB") for image in batch["image"]]
        if augment is not None:
            images = [augment(image) for image in images]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch["label"])}

    return transform


__all__ = [
    "DIGITS_CLASSES",
    "DIGITS_SPLITS",
    "digits_images",
    "digits_transforms",
    "stratified_split",
    "write_digits_imagefolder",
]


# ----------------------------------------------------------------------------------------------------------------
# Hub datasets and local imagefolders, DeiT training transforms, dataloaders (used by the recipes)

#: ImageNet-1k on the Hub: gated (accept the terms, then `hf auth login`), read by datasets 5 from its data files.
DEFAULT_DATASET = "ILSVRC/imagenet-1k"
#: DeiT's RandAugment policy (timm notation).
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
#: PIL resampling filter number -> timm interpolation name.
_INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def is_streaming(dataset: Any) -> bool:
    """True for a `datasets.IterableDataset` (`streaming=True`)."""
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def load_image_dataset(name_or_dir: str | os.PathLike = DEFAULT_DATASET, split: str = "train", streaming: bool = False):
    """One split of an image-classification dataset.

    Args:
        name_or_dir: a Hub dataset id (default ImageNet-1k; offline: from the cache) or a local imagefolder
            root: with `train/` and `validation/` subfolders of class folders, or class folders only (its single
            split serves any `split`, e.g. a `--validation_dir`).
        split: "train", "validation", ...
        streaming: return a `datasets.IterableDataset` read as it is iterated (no full download).
    """
    from datasets import load_dataset

    if Path(name_or_dir).is_dir():
        splits = load_dataset("imagefolder", data_dir=str(name_or_dir), streaming=streaming)
        if split in splits:
            return splits[split]
        if len(splits) == 1:
            only = next(iter(splits))
            logger.info("%s has one split (%r): using it as %r.", name_or_dir, only, split)
            return splits[only]
        raise ValueError(f"{name_or_dir} has splits {sorted(splits)}, not {split!r}.")
    return load_dataset(str(name_or_dir), split=split, streaming=streaming)


def _input_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) the processor produces: its crop size when it center-crops, else its resize size."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height = get("height") or get("shortest_edge")
    width = get("width") or get("shortest_edge")
    if not (height and width):
        raise ValueError(f"cannot read an image size from the image processor's size {size!r}.")
    return int(height), int(width)


def train_transforms(
    image_processor: Any,
    *,
    auto_augment: str | None = RAND_AUGMENT,
    re_prob: float = 0.25,
    color_jitter: float = 0.4,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Callable:
    """DeiT's training augmentation for one PIL image (timm `create_transform`): random resized crop to the
    processor's size with its interpolation, flip, RandAugment `auto_augment` ("none" or None: off), colour
    jitter, normalisation with the processor's mean/std, then random erasing with probability `re_prob`."""
    from timm.data import create_transform

    height, width = _input_size(image_processor)
    policy = None if auto_augment in (None, "", "none") else auto_augment
    resample = getattr(image_processor, "resample", 3)
    return create_transform(
        input_size=(3, height, width),
        is_training=True,
        scale=scale,
        color_jitter=color_jitter,
        auto_augment=policy,
        interpolation=_INTERPOLATIONS.get(int(resample) if resample is not None else 3, "bicubic"),
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
    )


class _ProcessorTransform:
    """One PIL image -> the image processor's `pixel_values` (a picklable callable, for worker processes)."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]


def eval_transforms(image_processor: Any) -> Callable:
    """Evaluation preprocessing of one PIL image: exactly the model's image processor (resize, crop, normalise)."""
    return _ProcessorTransform(image_processor)


class _ExampleTransform:
    """A batch of dataset rows -> `pixel_values` (per-image `transform`) and `labels` (mapped to the model's ids)."""

    def __init__(self, transform: Callable, image_column: str, label_column: str, label_map, mode: str) -> None:
        self.transform, self.image_column, self.label_column = transform, image_column, label_column
        self.label_map, self.mode = label_map, mode

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        labels = batch[self.label_column]
        return {
            "pixel_values": [self.transform(image.convert(self.mode)) for image in batch[self.image_column]],
            "labels": labels if self.label_map is None else [self.label_map[label] for label in labels],
        }


def image_columns(dataset) -> tuple[str, str]:
    """The (image, label) column names of a `datasets.Dataset`: its `Image` and `ClassLabel` features (else a
    column named `label`/`labels`)."""
    from datasets import ClassLabel, Image

    features = dataset.features
    image = next((name for name, feature in features.items() if isinstance(feature, Image)), None)
    label = next((name for name, feature in features.items() if isinstance(feature, ClassLabel)), None)
    label = label or next((name for name in ("label", "labels") if name in features), None)
    if image is None or label is None:
        raise ValueError(f"the dataset needs an Image column and a label column, got columns {list(features)}.")
    return image, label


def _label_map(dataset, label_column: str, config: Any) -> list[int] | None:
    """Dataset label index -> model label id, matched by class name when every dataset class is a model class (an
    imagefolder numbers its folders alphabetically, which need not be the model's order); None: use as is."""
    names = getattr(dataset.features[label_column], "names", None)
    label2id = getattr(config, "label2id", None) or {}
    if not names or not set(names) <= set(label2id):
        return None
    return [int(label2id[name]) for name in names]


def collate_images(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `pixel_values` and `labels` of examples into a batch."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([int(example["labels"]) for example in examples]),
    }


def image_dataloader(
    dataset: Any,
    transform: Callable,
    *,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    model_config: Any = None,
    shuffle_buffer_size: int = 10_000,
) -> torch.utils.data.DataLoader:
    """A DataLoader of `{"pixel_values", "labels"}` batches from a `datasets` image dataset (map-style: transformed
    lazily with `with_transform`; streaming: with `map`, shuffled in a buffer of `shuffle_buffer_size`).

    Images are converted to RGB (grayscale when `model_config.num_channels == 1`) and dataset labels are mapped to
    the model's ids by class name when every dataset class is in `model_config.label2id`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    try:
        image_column, label_column = image_columns(dataset)
        label_map = _label_map(dataset, label_column, model_config)
    except (TypeError, AttributeError):  # a stream without known features
        image_column, label_column, label_map = "image", "label", None
    mode = "L" if getattr(model_config, "num_channels", 3) == 1 else "RGB"
    example_transform = _ExampleTransform(transform, image_column, label_column, label_map, mode)
    if is_streaming(dataset):
        if shuffle:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        prepared = dataset.map(example_transform, batched=True, remove_columns=[image_column, label_column])
    else:
        prepared = dataset.with_transform(example_transform)
    return torch.utils.data.DataLoader(
        prepared,
        batch_size=batch_size,
        shuffle=shuffle and not is_streaming(dataset),
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_images,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        persistent_workers=num_workers > 0,
    )


def make_dataloaders(
    train_dataset: Any,
    eval_dataset: Any,
    image_processor: Any,
    *,
    train_batch_size: int = 64,
    eval_batch_size: int = 64,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    auto_augment: str | None = RAND_AUGMENT,
    re_prob: float = 0.25,
    augment: bool = True,
    model_config: Any = None,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training (shuffled, `train_transforms`, last partial batch dropped) and evaluation (in order, the image
    processor) dataloaders; `augment=False` trains on the evaluation preprocessing (deterministic batches, e.g.
    for tiny datasets). See `image_dataloader` for the other arguments."""
    common = dict(num_workers=num_workers, pin_memory=pin_memory, model_config=model_config)
    train_transform = (
        train_transforms(image_processor, auto_augment=auto_augment, re_prob=re_prob)
        if augment
        else eval_transforms(image_processor)
    )
    train = image_dataloader(
        train_dataset,
        train_transform,
        batch_size=train_batch_size,
        shuffle=True,
        drop_last=True,
        seed=seed,
        **common,
    )
    evaluation = image_dataloader(eval_dataset, eval_transforms(image_processor), batch_size=eval_batch_size, **common)
    return train, evaluation


def digits_dataloaders(
    root: str | os.PathLike,
    image_processor: Any,
    *,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    seed: int = 0,
    model_config: Any = None,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training and validation dataloaders of the digits imagefolder at `root` (written there first if absent):
    shuffled (seeded) training batches without augmentation, validation in order; what the demo and the
    benchmarks train and evaluate on."""
    folder = str(write_digits_imagefolder(root))
    return make_dataloaders(
        load_image_dataset(folder, split="train"),
        load_image_dataset(folder, split="validation"),
        image_processor,
        train_batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        augment=False,
        model_config=model_config,
    )


def make_mixup(
    num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, label_smoothing: float = 0.1
) -> Callable | None:
    """DeiT's mixup/cutmix (timm `Mixup`, batch mode, switching with probability 0.5), giving soft targets with
    `label_smoothing`; None when both alphas are 0 (e.g. tiny CPU runs). Needs even batch sizes."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


__all__ += [
    "DEFAULT_DATASET",
    "RAND_AUGMENT",
    "collate_images",
    "digits_dataloaders",
    "image_columns",
    "eval_transforms",
    "image_dataloader",
    "is_streaming",
    "load_image_dataset",
    "make_dataloaders",
    "make_mixup",
    "train_transforms",
]

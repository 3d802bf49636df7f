"""Accuracy and latency of image classifiers.

`evaluate_model` computes top-k accuracy through the `evaluate` metric module shipped in the package
(`hf_vitprune/metrics/top_k_accuracy`, loaded by path, so it works offline); `measure_latency` times whole forward
passes. Both run on the device of the model's parameters (CPU or CUDA) and work for PrunedViT as well as any
transformers or timm classifier. `tune_cpu_allocator` makes CPU timings reflect the model rather than the allocator.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import eval_transforms, image_dataloader
from .importance import batch_inputs
from .metrics import TOP_K_ACCURACY

logger = logging.getLogger(__name__)


#: glibc `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 * 2**20


def tune_cpu_allocator(trim_threshold: int = 2**30) -> bool:
    """Make glibc's malloc keep freed memory for reuse: serve blocks up to 32 MiB from the heap and return free heap
    memory to the OS only beyond `trim_threshold` bytes. Returns whether it applied (Linux with glibc only).

    By default glibc maps every block above a moving threshold afresh and unmaps it on free, so each forward pass
    page-faults on its large activations: the shipped digits ViT at batch 64 takes about 29,000 faults per pass,
    112 ms instead of 64 ms (`make bench` measures both), and the dense model (with the largest activations) pays more
    than a pruned one, so latency ratios come out inflated and vary by 15 % between runs. This is what jemalloc or
    tcmalloc (which the PyTorch CPU performance guides recommend) do too. It changes the whole process, so only
    entry points call it: `make bench`, `make demo`, the CLI and the NViT recipe (when it measures a latency table
    on CPU).
    """
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int) or not 0 < trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be an integer in [1, 2**31), got {trim_threshold!r}.")
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # a C library without it (musl) has nothing to tune
    if mallopt is None:
        return False
    applied = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    logger.debug("tune_cpu_allocator: %s", "applied" if applied else "not supported by this C library")
    return applied


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def evaluate_model(
    model: nn.Module,
    data: Iterable,
    image_processor: Any = None,
    batch_size: int = 64,
    top_k: Sequence[int] = (1, 5),
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-k accuracy of `model` on `data`, computed by the shipped `evaluate` metric module.

    Args:
        model: an image classifier (PrunedViT, transformers or timm); its outputs' `.logits` (or the output tensor)
            are ranked.
        data: a `datasets.Dataset` with an image and a label column (preprocessed with `image_processor`), or an
            iterable of batches (dicts with `pixel_values` and `labels`, or `(images, labels)` pairs), e.g. a
            DataLoader.
        image_processor: for a dataset of images; default `model.image_processor` (the converters attach one).
            Dataset labels are matched to the model's `label2id` by class name when the names agree.
        batch_size, num_workers: of the DataLoader built for a dataset.
        top_k: the k to report; a k above the number of classes is skipped (logged).

    Returns:
        `{"top_1_accuracy": ..., "top_5_accuracy": ..., "num_samples": n}` (fractions in [0, 1]).
    """
    import evaluate
    from datasets import Dataset

    ks = sorted({_positive_int("top_k", k) for k in top_k})
    if not ks:
        raise ValueError(f"top_k must list at least one positive integer, got {top_k!r}.")
    if isinstance(data, Dataset):
        processor = image_processor if image_processor is not None else getattr(model, "image_processor", None)
        if processor is None:
            raise ValueError(
                "evaluating a dataset of images needs an image processor: pass image_processor= (e.g. "
                "AutoImageProcessor.from_pretrained(model folder)) or attach model.image_processor."
            )
        data = image_dataloader(
            data,
            eval_transforms(processor),
            batch_size=_positive_int("batch_size", batch_size),
            num_workers=num_workers,
            model_config=getattr(model, "config", None),
        )
    parameter = next(model.parameters())
    metric = evaluate.load(TOP_K_ACCURACY, keep_in_memory=True)
    num_samples, num_classes = 0, None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(data, desc="Evaluating", total=len(data) if hasattr(data, "__len__") else None):
                inputs = batch_inputs(batch, parameter.device)
                output = model(inputs["pixel_values"].to(parameter.dtype))
                logits = getattr(output, "logits", output)
                num_classes = logits.shape[-1]
                labels = inputs["labels"]
                if labels.min() < 0 or labels.max() >= num_classes:
                    raise ValueError(
                        f"labels must be in [0, {num_classes}) for a model with {num_classes} classes, got "
                        f"[{labels.min().item()}, {labels.max().item()}]."
                    )
                ranked = logits.topk(min(ks[-1], num_classes), dim=-1).indices
                metric.add_batch(predictions=ranked.cpu().tolist(), references=labels.cpu().tolist())
                num_samples += labels.numel()
    finally:
        model.train(was_training)
    if num_samples == 0:
        raise ValueError("data is empty: nothing to evaluate.")
    skipped = [k for k in ks if k > num_classes]
    if skipped:
        logger.warning("top-%s accuracy skipped: the model has only %d classes.", skipped, num_classes)
    results = metric.compute(k=[k for k in ks if k <= num_classes])
    return {**results, "num_samples": num_samples}


def measure_latency(
    model: nn.Module,
    batch_size: int = 64,
    repeats: int = 10,
    warmup: int = 3,
    image_size: int | None = None,
) -> float:
    """Median seconds of one forward pass of `model` on a random batch (see `compare_latency`)."""
    return compare_latency([model], batch_size, repeats, warmup, image_size)[0]


def compare_latency(
    models: Sequence[nn.Module],
    batch_size: int = 64,
    repeats: int = 10,
    warmup: int = 3,
    image_size: int | None = None,
) -> list[float]:
    """Median seconds of one forward pass of each model on the same random batch, timed round-robin (one pass of
    each model per repeat, the order reversed every other repeat): neither its position nor a change of load on the
    machine favours a model, so their ratio is fair.

    Runs under `torch.inference_mode`, with the accelerator synchronised around each timed pass, on the device and
    dtype of the first model's parameters. `image_size` defaults to `config.image_size` of the first model (the
    channels to its `config.num_channels`, else 3). On CPU under glibc, call `tune_cpu_allocator()` first, or the
    timings include a page fault per page of every large activation.
    """
    _positive_int("batch_size", batch_size)
    _positive_int("repeats", repeats)
    _positive_int("warmup", warmup, minimum=0)
    if not models:
        raise ValueError("models must list at least one model.")
    config = getattr(models[0], "config", None)
    image_size = image_size or getattr(config, "image_size", None)
    if image_size is None:
        raise ValueError("image_size is required for a model without config.image_size.")
    channels = getattr(config, "num_channels", 3)
    parameter = next(models[0].parameters())
    pixel_values = torch.randn(
        batch_size, channels, image_size, image_size, device=parameter.device, dtype=parameter.dtype
    )

    def synchronize() -> None:
        if parameter.device.type != "cpu":
            torch.accelerator.synchronize(parameter.device)

    modes = [model.training for model in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode():
            for step in range(warmup + repeats):
                order = list(zip(models, times))
                for model, seconds in order if step % 2 == 0 else order[::-1]:
                    model.eval()
                    synchronize()
                    start = time.perf_counter()
                    model(pixel_values)
                    synchronize()
                    if step >= warmup:
                        seconds.append(time.perf_counter() - start)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return [statistics.median(seconds) for seconds in times]


__all__ = ["compare_latency", "evaluate_model", "measure_latency", "tune_cpu_allocator"]

"""Gradio Space: a pruned Vision Transformer beside its dense parent.

Pick a dense/pruned pair from `models.json`, upload an image (or pick an example) and compare the top-5 labels of
both models, their latency measured live on this machine, their MACs and parameters, the per-block dims, the
pruned model card's method summary and its pruning record.

`models.json` (path from the `HF_VITPRUNE_SPACE_MODELS` environment variable, default: next to this file) lists the
pairs: `{"pairs": [{"name": ..., "dense": ..., "pruned": ..., "build": {...}}]}`. A model is one of
- `hf_vitprune:sample_model`: the digits ViT shipped with hf_vitprune;
- a local folder, written `./...`, `../...`, `~/...` or `/...` (relative to the config file);
- a Hub repo id `org/name`.
The optional `build` (`{"method": "taylor", "target_macs_ratio": 0.5, "calibration_batches": 4}`) lets the app
write the pruned folder itself: it prunes the sample model with `hf_vitprune.prune` (data-driven methods calibrate
on digits training images) and saves the Hub-ready folder there, rebuilt when the sample model or the recipe changes.
A pair that cannot be used (missing folder, Hub model not cached while offline) is skipped with a note on the page.

Models load with `trust_remote_code=True`, and only the models of the list are ever loaded. With hf_vitprune
installed its classes are used (the Auto classes prefer registered classes), models of other families are
converted with `hf_vitprune.to_pruned_vit`, MACs and parameters come from `hf_vitprune.count_macs`/`count_params`
and the per-block chart is drawn by `hf_vitprune.hub.save_architecture_chart`. Without it (a Space installs only
`requirements.txt`), each model runs the code of its own repo (`auto_map`), MACs are counted by torch's
`FlopCounterMode` (the same numbers for PrunedViT) and the chart is the pruned repo's `architecture.png`.

Run `python space/app.py` to serve the page (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT set the address).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import validate_repo_id
from PIL import Image, ImageOps
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
from transformers.dynamic_module_utils import get_class_from_dynamic_module

try:
    import hf_vitprune
except ImportError:  # a Space with only requirements.txt installed: models run their own code
    hf_vitprune = None

logger = logging.getLogger(__name__)

SPACE_DIR = Path(__file__).resolve().parent
CONFIG_ENV = "HF_VITPRUNE_SPACE_MODELS"
RUNS_ENV = "HF_VITPRUNE_SPACE_RUNS"
DEFAULT_CONFIG = SPACE_DIR / "models.json"
EXAMPLES_DIR = SPACE_DIR / "examples"
SAMPLE_MODEL = "hf_vitprune:sample_model"
#: Written into a folder the app builds: what it was built from, to rebuild it when that changes.
BUILD_MARKER = ".space_build.json"
BUILD_KEYS = {"method", "target_macs_ratio", "calibration_batches"}
CALIBRATION_BATCH_SIZE = 32
#: The file of a Hub-ready folder with the per-block chart (`hf_vitprune.hub.CHART_NAME`).
CHART_FILE = "architecture.png"
#: The keys of a pruning record shown first, in this order (then the others, sorted).
RECORD_ORDER = ("method", "source", "target", "macs_ratio", "params_ratio", "macs", "params", "dense_macs")
#: Longest image side processed; larger uploads are downscaled first (the models see 224 px or less anyway).
MAX_SIDE = 2048
TOP_K = 5
TITLE = "hf_vitprune: pruned ViT vs dense"
EMPTY_IMAGE = "No image: upload one or pick an example, then press Predict."
STANDALONE_NOTE = (
    "hf_vitprune is not installed: each model runs the code of its own repo (trust_remote_code), MACs are "
    "counted by torch's FlopCounterMode and the chart is the pruned model's `architecture.png`."
)


class InputError(ValueError):
    """A problem with what the user sent or chose, shown on the page as a message."""


@dataclass(frozen=True)
class Pair:
    """A dense model and a pruned version of it, as listed in the config (resolved locations); `build` is the
    recipe the app writes the pruned folder with when it is missing or stale (None: use the folder as it is)."""

    name: str
    dense: str
    pruned: str
    build: dict[str, Any] | None = None


@dataclass
class LoadedModel:
    """A model ready to run: the model, its image processor, its model card ("" when none), its costs and the
    chart of its repo (None when it has none)."""

    model: torch.nn.Module
    processor: Any
    card: str
    macs: int
    params: int
    chart: Image.Image | None


# ----------------------------------------------------------------------------------------------------------------
# The models config


def _resolve(value: str, base: Path, buildable: bool = False) -> tuple[str | None, str | None]:
    """`(location, None)` for a usable model entry, `(None, reason)` for one to skip. A missing folder is usable
    when `buildable` (the app writes it)."""
    if value == SAMPLE_MODEL:
        if hf_vitprune is None:
            return None, f"`{value}` needs hf_vitprune installed"
        from hf_vitprune.sample import SAMPLE_MODEL_DIR

        value = str(SAMPLE_MODEL_DIR)
    if value.startswith((".", "/", "~")):
        folder = (base / Path(value).expanduser()).resolve()
        if not (buildable or (folder / "config.json").is_file()):
            return None, f"no model folder at `{value}` (`python -m hf_vitprune.demo` writes the demo's)"
        return str(folder), None
    try:
        validate_repo_id(value)
    except ValueError:
        return None, f"`{value}` is neither a folder (`./...`, `../...`, `~/...`, `/...`) nor a Hub id (`org/name`)"
    if hub_constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(value, "config.json"), str):
        return None, f"`{value}` is not in the Hub cache and HF_HUB_OFFLINE is set"
    return value, None


def _check_build(build: Any, where: str, dense: str, pruned: str) -> dict[str, Any]:
    """The `build` recipe of a pair with its defaults, or a ValueError saying what is wrong."""
    if not isinstance(build, dict) or not isinstance(build.get("method"), str) or not set(build) <= BUILD_KEYS:
        raise ValueError(
            f"{where}.build must be an object with a 'method' string and only the keys {sorted(BUILD_KEYS)}."
        )
    ratio, batches = build.get("target_macs_ratio"), build.get("calibration_batches", 4)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"{where}.build.target_macs_ratio must be a number in (0, 1), got {ratio!r}.")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"{where}.build.calibration_batches must be a positive integer, got {batches!r}.")
    if dense != SAMPLE_MODEL or not pruned.startswith((".", "/", "~")):
        raise ValueError(f"{where}: 'build' needs dense {SAMPLE_MODEL!r} and a pruned folder (`./...`, `/...`).")
    if hf_vitprune is not None:
        from hf_vitprune.methods import METHODS

        if build["method"] not in METHODS:
            raise ValueError(f"{where}.build.method must be one of {sorted(METHODS)}, got {build['method']!r}.")
    return {"method": build["method"], "target_macs_ratio": float(ratio), "calibration_batches": batches}


def load_pairs(path: str | os.PathLike) -> tuple[dict[str, Pair], list[str]]:
    """The usable pairs of a models config, by display name, and notes on the skipped ones.

    Raises:
        ValueError: the file is not a valid models config (the message says where).
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["pairs"]
        if not isinstance(entries, list):
            raise TypeError(f"'pairs' is a {type(entries).__name__}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected a JSON object with a 'pairs' list ({error}).") from error
    pairs, notes = {}, []
    for index, entry in enumerate(entries):
        where = f"{path}: pairs[{index}]"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "dense", "pruned")):
            raise ValueError(f"{where} must have the strings 'name', 'dense' and 'pruned'.")
        name = entry["name"]
        if name in pairs or any(f"**{name}**" in note for note in notes):
            raise ValueError(f"{path}: pair name {name!r} appears twice.")
        build = entry.get("build")
        if build is not None:
            build = _check_build(build, where, entry["dense"], entry["pruned"])
        dense, dense_reason = _resolve(entry["dense"], path.parent)
        pruned, pruned_reason = _resolve(entry["pruned"], path.parent, buildable=build is not None)
        if dense is None or pruned is None:
            notes.append(f"Skipped **{name}**: {dense_reason or pruned_reason}.")
            continue
        pairs[name] = Pair(name, dense, pruned, build)
    return pairs, notes


# ----------------------------------------------------------------------------------------------------------------
# Building the pruned sample model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digits_calibration(image_processor: Any, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num_batches` seeded random batches of digits training images (`hf_vitprune.data`) as (pixels, labels)."""
    from hf_vitprune.data import digits_images, stratified_split

    images, labels = digits_images()
    train, _ = stratified_split(labels, val_fraction=0.2)
    order = np.random.default_rng(0).permutation(train)[: num_batches * CALIBRATION_BATCH_SIZE]
    batches = []
    for start in range(0, len(order), CALIBRATION_BATCH_SIZE):
        chosen = order[start : start + CALIBRATION_BATCH_SIZE]
        pixels = image_processor(images=[images[i] for i in chosen], return_tensors="pt")["pixel_values"]
        batches.append((pixels, torch.as_tensor(labels[chosen])))
    return batches


def build_pruned_sample(folder: str | os.PathLike, build: dict[str, Any]) -> Path:
    """Prune the sample model as `build` says and save the Hub-ready folder (card and chart with the dense
    beside the pruned dims) at `folder`; a folder this function wrote from the same sample weights and recipe is
    reused as is.

    Raises:
        ValueError: `folder` exists but was not written by this function (it is never overwritten then).
    """
    from hf_vitprune.hub import save_hub_folder, write_folder_atomically
    from hf_vitprune.methods import METHODS
    from hf_vitprune.sample import SAMPLE_MODEL_DIR, load_sample_model

    folder = Path(folder)
    marker = folder / BUILD_MARKER
    stamp = {"sample_model_sha256": _sha256(SAMPLE_MODEL_DIR / "model.safetensors"), **build}
    if marker.is_file():
        if json.loads(marker.read_text()) == stamp:
            return folder
    elif folder.exists():
        raise ValueError(f"{folder} exists and was not written by the Space's `build`; remove it or choose another.")
    logger.info("building %s: %s of the sample model", folder, build)
    dense = load_sample_model().eval()
    calibration = None
    if METHODS[build["method"]].data_driven:
        calibration = _digits_calibration(dense.image_processor, build["calibration_batches"])
    pruned = hf_vitprune.prune(
        dense, build["method"], target_macs_ratio=build["target_macs_ratio"], dataloader=calibration
    )

    def save(tmp: Path) -> None:
        save_hub_folder(pruned.eval(), tmp, image_processor=dense.image_processor, dense_config=dense.config)
        (tmp / BUILD_MARKER).write_text(json.dumps(stamp, indent=2))

    return write_folder_atomically(folder, save)


# ----------------------------------------------------------------------------------------------------------------
# Models


def _model_class(config: Any, location: str) -> type:
    """The class named by `config.architectures`: hf_vitprune's when installed, else the repo's own code (its
    `auto_map` names one classifier; DeiT-style models with two heads need their own class), else the Auto class."""
    if hf_vitprune is not None:  # its Auto registration picks the class named by `architectures`
        return AutoModelForImageClassification
    architecture = (getattr(config, "architectures", None) or [""])[0]
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModelForImageClassification")
    if isinstance(reference, str) and architecture:
        module = reference.rsplit(".", 1)[0]
        return get_class_from_dynamic_module(f"{module}.{architecture}", location)
    return AutoModelForImageClassification


def _is_pruned_vit(model: torch.nn.Module) -> bool:
    """Whether hf_vitprune is installed and `model` is one of its PrunedViT classes (its cost model applies)."""
    return hf_vitprune is not None and isinstance(model, hf_vitprune.PrunedViTPreTrainedModel)


def counted_macs(model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    """MACs of one forward pass on `pixel_values`, counted by torch's `FlopCounterMode` (FLOPs / 2) with eager
    attention: the counter does not see the matmuls inside CPU scaled-dot-product attention."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous not in (None, "eager"):
        model.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.inference_mode():
            model(pixel_values)
    finally:
        if previous not in (None, "eager"):
            model.set_attn_implementation(previous)
    return counter.get_total_flops() // 2


def _open_image(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as image:
        return image.copy()


def _repo_file(location: str, filename: str) -> Path | None:
    """A file of a model folder or Hub repo, None when there is none."""
    if Path(location).is_dir():
        path = Path(location) / filename
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(location, filename))
    except Exception as error:  # optional files: any Hub failure just means it is not shown
        logger.info("no %s in %s: %s", filename, location, error)
        return None


def load_model(location: str, device: torch.device | None = None) -> LoadedModel:
    """Load an image classifier with its image processor, card, costs and chart for inference.

    `trust_remote_code=True`: only call it on locations you trust (the app calls it on its listed models only).
    With hf_vitprune installed, ViTs of other families are converted with `to_pruned_vit` (exact); MACs and
    parameters come from its cost model for a PrunedViT, else from `counted_macs` and the parameter count.
    """
    config = AutoConfig.from_pretrained(location, trust_remote_code=True)
    model = _model_class(config, location).from_pretrained(location, trust_remote_code=True)
    if hf_vitprune is not None:
        try:
            model = hf_vitprune.to_pruned_vit(model)
        except TypeError as error:  # a family PrunedViT does not cover: shown as it is, counted as without hf_vitprune
            logger.info("%s stays a %s: %s", location, type(model).__name__, error)
    if device is None:
        device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    model = model.to(device).eval()
    processor = AutoImageProcessor.from_pretrained(location, trust_remote_code=True)
    if _is_pruned_vit(model):
        macs, params = hf_vitprune.count_macs(model), hf_vitprune.count_params(model)
    else:
        blank = processor(images=Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"].to(device)
        macs, params = counted_macs(model, blank), sum(p.numel() for p in model.parameters())
    card, chart = _repo_file(location, "README.md"), _repo_file(location, CHART_FILE)
    return LoadedModel(
        model,
        processor,
        card.read_text(encoding="utf-8") if card else "",
        macs,
        params,
        _open_image(chart) if chart else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Images and predictions


def prepare_image(image: Image.Image | np.ndarray | None, mode: str = "RGB") -> tuple[Image.Image, list[str]]:
    """The image as `mode` ("RGB" or "L"), at most `MAX_SIDE` pixels a side, and notes on what was changed.

    Transparent pixels (RGBA, LA, palette with transparency) are put on white; 16-bit and float images are
    stretched to 0-255; EXIF orientation is applied.

    Raises:
        InputError: no image, or not something readable as one.
    """
    if image is None:
        raise InputError(EMPTY_IMAGE)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0:
            raise InputError(f"Cannot read an image array of shape {image.shape}.")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"Expected an image, got {type(image).__name__}.")
    if min(image.size) < 1:
        raise InputError(f"The image is empty ({image.width}x{image.height} pixels).")
    notes = []
    image = ImageOps.exif_transpose(image)
    if max(image.size) > MAX_SIDE:
        original = image.size
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        notes.append(f"downscaled from {original[0]}x{original[1]} to {image.width}x{image.height}")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        image = Image.fromarray(np.uint8(np.round((pixels - low) / ((high - low) or 1) * 255)))
        notes.append("high bit-depth image stretched to 8 bits")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
        notes.append("transparent areas put on white")
    if image.mode != mode:
        notes.append(f"converted from {image.mode} to {mode}")
        image = image.convert(mode)
    return image, notes


def top_k(logits: torch.Tensor, id2label: dict[int, str], k: int = TOP_K) -> dict[str, float]:
    """The `k` most probable labels of one image's logits, `{label: probability}` (what `gr.Label` shows)."""
    probabilities = logits.float().softmax(-1)
    values, indices = probabilities.topk(min(k, probabilities.numel()))
    return {id2label.get(int(i), str(int(i))): float(p) for p, i in zip(values, indices)}


def time_forwards(runs_on: list[tuple[torch.nn.Module, torch.Tensor]], runs: int, warmup: int = 1) -> list[float]:
    """Median seconds of a forward pass of each `(model, pixel_values)`, accelerator synchronised. The models are
    timed in turn, `warmup` untimed rounds then `runs` timed ones, so that all see the same load of the machine."""

    def synchronize(device: torch.device) -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    times: list[list[float]] = [[] for _ in runs_on]
    with torch.inference_mode():
        for step in range(warmup + runs):
            for timings, (model, pixel_values) in zip(times, runs_on):
                synchronize(pixel_values.device)
                start = time.perf_counter()
                model(pixel_values)
                synchronize(pixel_values.device)
                if step >= warmup:
                    timings.append(time.perf_counter() - start)
    return [statistics.median(timings) for timings in times]


def classify(loaded: LoadedModel, image: Image.Image) -> tuple[dict[str, float], torch.Tensor]:
    """Top-k labels of `image` and the model's input (`image` processed by the model's own image processor)."""
    model = loaded.model
    pixel_values = loaded.processor(images=image, return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(pixel_values).logits[0]
    return top_k(logits, model.config.id2label), pixel_values


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def method_summary(card: str) -> str:
    """The summary paragraph (under the title) and the "Model details" section of a model card, as markdown (its
    headings one level down, to sit under the page's own)."""
    text = re.sub(r"\A---\n.*?\n---\n", "", card, flags=re.DOTALL)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    sections = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    intro = re.sub(r"^# .*\n", "", sections[0], count=1, flags=re.MULTILINE).strip()
    details = [s.strip() for s in sections[1:] if re.match(r"## .*(detail|method|summary|pruning)", s, re.IGNORECASE)]
    details = [re.sub(r"^(#+) ", r"#\1 ", section, flags=re.MULTILINE) for section in details[:1]]
    return "\n\n".join(part for part in [intro, *details] if part)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return str(value).replace("|", "\\|")


def pruning_record_markdown(config: Any) -> str:
    """The `config.pruning` record of a pruned model (method, source, target, achieved MACs and params, ...) as
    a markdown table; "" when the config has none."""
    record = getattr(config, "pruning", None)
    if not record:
        return ""
    first = {key: index for index, key in enumerate(RECORD_ORDER)}
    items = sorted(record.items(), key=lambda item: (first.get(item[0], len(first)), item[0]))
    rows = [f"| {key} | `{_value(value)}` |" for key, value in items]
    return "\n".join(["### Pruning record (`config.pruning`)", "", "| field | value |", "|---|---|", *rows])


def _number(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.3g}"


def costs_markdown(dense: LoadedModel, pruned: LoadedModel, latency: tuple[float, float, int] | None = None) -> str:
    """A table of MACs and parameters of both models, with their live latency when measured."""
    rows = []
    if latency is not None:
        dense_s, pruned_s, runs = latency
        device = next(pruned.model.parameters()).device.type
        rows.append(
            (
                f"latency (batch 1, median of {runs}, {device})",
                f"{dense_s * 1e3:.2f} ms",
                f"{pruned_s * 1e3:.2f} ms",
                f"{pruned_s / dense_s:.2f}x",
            )
        )
    for name, d, p in (("MACs per image", dense.macs, pruned.macs), ("parameters", dense.params, pruned.params)):
        rows.append((name, _number(d), _number(p), f"{p / d:.2f}x"))
    table = ["| | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    table += [f"| {' | '.join(row)} |" for row in rows]
    if latency is None:
        table.append("\nPress **Predict** to measure the latency of both models here.")
    return "\n".join(table)


def _run_count() -> int:
    value = os.environ.get(RUNS_ENV, "7")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{RUNS_ENV} must be a positive integer, got {value!r}.")
    return int(value)


def _gradio_error(error: Exception) -> gr.Error:
    """The message the page shows for `error` (a toast, never a traceback); unexpected errors are logged."""
    if isinstance(error, InputError):
        return gr.Error(str(error), print_exception=False)
    logger.exception("the Space failed")
    return gr.Error(f"Something went wrong ({type(error).__name__}: {error}).")


# ----------------------------------------------------------------------------------------------------------------
# The app


class SpaceApp:
    """The pairs of a models config, the lazily loaded models, and the functions behind the page."""

    def __init__(self, config_path: str | os.PathLike | None = None):
        self.config_path = Path(config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
        self.pairs, self.notes = load_pairs(self.config_path)
        if hf_vitprune is None:
            self.notes.append(STANDALONE_NOTE)
        self.runs = _run_count()
        self._models: dict[str, LoadedModel] = {}
        self._charts: dict[str, Image.Image | None] = {}
        self._lock = threading.RLock()

    def model(self, location: str) -> LoadedModel:
        """The model at `location`, loaded once (its folder built first when its pair has a `build` recipe).

        Raises:
            InputError: `location` is not a model of a listed pair (nothing else is ever loaded).
        """
        pairs = [pair for pair in self.pairs.values() if location in (pair.dense, pair.pruned)]
        if not pairs:
            raise InputError(f"{location!r} is not a model of this Space.")
        with self._lock:
            if location not in self._models:
                for pair in pairs:
                    if pair.build is not None and location == pair.pruned:
                        build_pruned_sample(location, pair.build)
                logger.info("loading %s", location)
                self._models[location] = load_model(location)
            return self._models[location]

    def pair(self, name: str | None) -> tuple[Pair, LoadedModel, LoadedModel]:
        """A listed pair by display name and its two loaded models.

        Raises:
            InputError: `name` is not a listed pair (the message lists them).
        """
        if name not in self.pairs:
            choices = ", ".join(repr(n) for n in self.pairs) or "none available"
            raise InputError(f"Unknown model pair {name!r}; choose one of: {choices}.")
        pair = self.pairs[name]
        return pair, self.model(pair.dense), self.model(pair.pruned)

    def chart(self, name: str) -> Image.Image | None:
        """The per-block dims chart of a pair, dense beside pruned: drawn by hf_vitprune when installed (and both
        are PrunedViTs), else the pruned repo's `architecture.png` (None when it has none)."""
        _, dense, pruned = self.pair(name)
        with self._lock:  # matplotlib's pyplot is not thread-safe
            if name not in self._charts:
                chart = pruned.chart
                if _is_pruned_vit(dense.model) and _is_pruned_vit(pruned.model):
                    from hf_vitprune.hub import save_architecture_chart

                    with tempfile.TemporaryDirectory() as tmp:
                        path = save_architecture_chart(pruned.model.config, Path(tmp) / CHART_FILE, dense.model.config)
                        chart = _open_image(path)
                self._charts[name] = chart
            return self._charts[name]

    def describe(self, name: str | None) -> tuple[Image.Image | None, str, str]:
        """What the page shows for a pair before any prediction: chart, method summary and pruning record, costs.

        Raises:
            gr.Error: unknown pair, or the models failed to load.
        """
        if not self.pairs:
            return None, "", ""
        try:
            _, dense, pruned = self.pair(name)
            summary = method_summary(pruned.card) or "_The pruned model has no model card (README.md)._"
            record = pruning_record_markdown(pruned.model.config)
            return self.chart(name), "\n\n".join(p for p in (summary, record) if p), costs_markdown(dense, pruned)
        except Exception as error:
            raise _gradio_error(error) from error

    def predict(self, image: Image.Image | np.ndarray | None, name: str | None) -> tuple[dict, dict, str, str]:
        """Top-5 labels of the dense and the pruned model, the cost table with their latency measured on this
        image (`runs` timed passes each, batch 1), and a status line (do the top-1 labels agree, what was done
        to the image).

        Raises:
            gr.Error: no image, an unreadable image or an unknown pair (a clear message on the page, and an
                `AppError` with that message for API clients).
        """
        try:
            _, dense, pruned = self.pair(name)
            mode = "L" if getattr(pruned.model.config, "num_channels", 3) == 1 else "RGB"
            image, notes = prepare_image(image, mode)
            (dense_top, dense_input), (pruned_top, pruned_input) = classify(dense, image), classify(pruned, image)
            dense_s, pruned_s = time_forwards([(dense.model, dense_input), (pruned.model, pruned_input)], self.runs)
        except Exception as error:
            raise _gradio_error(error) from error
        agree = "agree" if next(iter(dense_top)) == next(iter(pruned_top)) else "**disagree**"
        status = f"Top-1 labels {agree}. Input {image.width}x{image.height} {image.mode}" + "".join(
            f"; {note}" for note in notes
        )
        return dense_top, pruned_top, costs_markdown(dense, pruned, (dense_s, pruned_s, self.runs)), status


def build_demo(app: SpaceApp | None = None) -> gr.Blocks:
    """The page: pair choice, image input and examples, labels side by side, costs, chart and method summary."""
    app = app or SpaceApp()
    names = list(app.pairs)
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.png"))
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            "# ✂️ hf_vitprune: a pruned ViT beside its dense parent\n"
            "Choose a pair, upload an image or pick an example, and press **Predict**: both models classify it, "
            "and their latency is measured live on this machine."
        )
        notes = app.notes if names else [*app.notes, f"No model pair is available in `{app.config_path.name}`."]
        gr.Markdown("\n".join(f"- {note}" for note in notes), visible=bool(notes))
        with gr.Row():
            with gr.Column(scale=1):
                pair = gr.Dropdown(names, value=names[0] if names else None, label="Dense / pruned pair")
                image = gr.Image(type="pil", image_mode=None, label="Image", sources=["upload", "clipboard"])
                button = gr.Button("Predict", variant="primary", interactive=bool(names))
                if examples:
                    gr.Examples(examples, inputs=image, label="Examples")
            with gr.Column(scale=2):
                status = gr.Markdown()
                with gr.Row():
                    dense_label = gr.Label(num_top_classes=TOP_K, label="Dense model: top 5")
                    pruned_label = gr.Label(num_top_classes=TOP_K, label="Pruned model: top 5")
                costs = gr.Markdown()
        gr.Markdown("### Per-block dims, dense beside pruned")
        chart = gr.Image(type="pil", interactive=False, show_label=False, buttons=[])
        summary = gr.Markdown()
        button.click(app.predict, [image, pair], [dense_label, pruned_label, costs, status], api_name="predict")
        pair.change(app.describe, pair, [chart, summary, costs], api_name="describe")
        demo.load(app.describe, pair, [chart, summary, costs], api_visibility="private")
    return demo


app = SpaceApp()
demo = build_demo(app)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if app.pairs:  # load (and build) the first pair now rather than on the first visit
        try:
            app.pair(next(iter(app.pairs)))
        except Exception:
            logger.exception("could not load the first pair; the page will show the error")
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), max_file_size="20mb")

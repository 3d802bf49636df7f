"""Publishing pruned ViTs on the Hugging Face Hub: model cards, Hub-ready folders and one-commit pushes.

A Hub-ready folder is what `save_hub_folder` writes and `push` uploads:

    config.json                  PrunedViTConfig, with `auto_map` for trust_remote_code
    model.safetensors            weights (or an index and its shards)
    configuration_pruned_vit.py  model code, imports only torch and transformers
    modeling_pruned_vit.py
    preprocessor_config.json     a native transformers image processor
    README.md                    the model card (front matter with model-index, body from the template)
    architecture.png             per-block dims chart, dense beside pruned

Card template: the canonical Jinja template is `model_cards/pruned_vit.md.j2` at the top of the repository (found
next to the package in a source checkout or an editable install); a wheel installs it as data files under
`<prefix>/share/hf_vitprune/model_cards/` (setup.py `data_files`), the second place `template_path` looks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from .configuration_pruned_vit import PrunedViTConfig
from .cost import count_macs, count_params
from .modeling_pruned_vit import PrunedViTModel, PrunedViTPreTrainedModel

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "pruned_vit.md.j2"
CARD_NAME = "README.md"
CHART_NAME = "architecture.png"
#: Snippets in a card rendered without `repo_id` use `your-username/<model_name>`; `push` fills in the real id.
PLACEHOLDER_USER = "your-username"
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_COMMIT_MESSAGE = "Upload pruned ViT (hf_vitprune)"
#: Files a Hub-ready PrunedViT folder must have besides the weights, and why.
REQUIRED_FILES = {
    "config.json": "the config, with auto_map",
    "configuration_pruned_vit.py": "code for trust_remote_code",
    "modeling_pruned_vit.py": "code for trust_remote_code",
    "preprocessor_config.json": "the image processor",
    CARD_NAME: "the model card",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_DATASET_NAMES = {"ILSVRC/imagenet-1k": "ImageNet-1k", "imagenet-1k": "ImageNet-1k"}
_RESULT_KEY = re.compile(r"^top_(\d+)_accuracy$")
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class MethodInfo:
    """What a card says about a pruning method: its name, paper, link, BibTeX, and the licence of the authors'
    released checkpoints (None when they release none, or only masks for someone else's weights)."""

    name: str
    paper: str
    url: str
    bibtex: str
    checkpoint_license: str | None = None


_DEPGRAPH_BIBTEX = """@inproceedings{fang2023depgraph,
  title     = {DepGraph: Towards Any Structural Pruning},
  author    = {Fang, Gongfan and Ma, Xinyin and Song, Mingli and Mi, Michael Bi and Wang, Xinchao},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {16091--16101},
  year      = {2023}
}"""

#: method name (as in `hf_vitprune.methods.METHODS` and `config.pruning["method"]`) -> card information.
METHOD_INFO: dict[str, MethodInfo] = {
    "nvit": MethodInfo(
        name="NViT",
        paper="Global Vision Transformer Pruning with Hessian-Aware Saliency (Yang et al., CVPR 2023)",
        url="https://arxiv.org/abs/2110.04869",
        bibtex="""@inproceedings{yang2023nvit,
  title     = {Global Vision Transformer Pruning with Hessian-Aware Saliency},
  author    = {Yang, Huanrui and Yin, Hongxu and Shen, Maying and Molchanov, Pavlo and Li, Hai and Kautz, Jan},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {18547--18557},
  year      = {2023}
}""",
        checkpoint_license="cc-by-nc-sa-4.0",
    ),
    "savit": MethodInfo(
        name="SAViT",
        paper="SAViT: Structure-Aware Vision Transformer Pruning via Collaborative Optimization "
        "(Zheng et al., NeurIPS 2022)",
        url="https://github.com/hikvision-research/SAViT",
        bibtex="""@inproceedings{zheng2022savit,
  title     = {{SAViT}: Structure-Aware Vision Transformer Pruning via Collaborative Optimization},
  author    = {Zheng, Chuanyang and Li, Zheyang and Zhang, Kai and Yang, Zhi and Tan, Wenming and Xiao, Jun
               and Ren, Ye and Pu, Shiliang},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  volume    = {35},
  pages     = {9010--9023},
  year      = {2022}
}""",
        checkpoint_license="apache-2.0",
    ),
    "lpvit": MethodInfo(
        name="LPViT",
        paper="LPViT: Low-Power Semi-structured Pruning for Vision Transformers (Xu et al., ECCV 2024)",
        url="https://arxiv.org/abs/2407.02068",
        bibtex="""@inproceedings{xu2024lpvit,
  title     = {{LPViT}: Low-Power Semi-structured Pruning for Vision Transformers},
  author    = {Xu, Kaixin and Wang, Zhe and Chen, Chunyun and Geng, Xue and Lin, Jie and Yang, Xulei and Wu, Min
               and Li, Xiaoli and Lin, Weisi},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}""",
    ),
    "magnitude": MethodInfo(
        name="Magnitude (weight-norm) importance",
        paper="DepGraph: Towards Any Structural Pruning (Fang et al., CVPR 2023)",
        url="https://arxiv.org/abs/2301.12900",
        bibtex=_DEPGRAPH_BIBTEX,
    ),
    "taylor": MethodInfo(
        name="Taylor (first-order) importance",
        paper="DepGraph: Towards Any Structural Pruning (Fang et al., CVPR 2023)",
        url="https://arxiv.org/abs/2301.12900",
        bibtex=_DEPGRAPH_BIBTEX,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Model cards


def template_path(name: str = TEMPLATE_NAME) -> Path:
    """The card template `name`: `model_cards/` next to the package (source checkout, editable install), else the
    data files a wheel installs under `<prefix>/share/hf_vitprune/model_cards/`."""
    candidates = [
        Path(__file__).resolve().parent.parent / "model_cards" / name,
        Path(sysconfig.get_path("data")) / "share" / "hf_vitprune" / "model_cards" / name,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model card template {name!r} not found; looked in {[str(c) for c in candidates]}.")


def render_model_card(
    model: PrunedViTPreTrainedModel | PrunedViTConfig,
    *,
    dense_config: PrunedViTConfig | None = None,
    method: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    split: str = "validation",
    metrics: Mapping[str, float] | None = None,
    latency: Mapping[str, Any] | None = None,
    license: str | None = None,
    reported: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    chart: str | None = CHART_NAME,
) -> ModelCard:
    """The model card of a PrunedViT, from the template and `model.config.pruning` (what is missing there is left
    out of the card rather than guessed).

    Args:
        model: the pruned model (or its config; then MACs/params are those of the classification model).
        dense_config: the dense model's `PrunedViTConfig` (e.g. `to_pruned_vit(dense).config`): dense dims in the
            per-block table and chart, and the dense MACs/params (default: `config.pruning["dense_macs"]`, ...).
        method: pruning method name (default `config.pruning["method"]`); known ones (`METHOD_INFO`) get their
            paper link and BibTeX. None and no record: a plain conversion.
        base_model: Hub id of the source model, for the `base_model` metadata (default `config.pruning["source"]`
            when it is a Hub id rather than a local path).
        dataset: Hub dataset id or local folder the `metrics` were measured on.
        split: dataset split of `metrics`.
        metrics: measured results, `{"top_1_accuracy": 0.81, "top_5_accuracy": 0.95}` (fractions; other keys,
            such as `num_samples`, are ignored): `model-index` entries and the results table.
        latency: measured latency, `{"seconds": median seconds per batch, "batch_size": int, "device": str}` and
            optionally `"dense_seconds"` (same batch and device).
        license: licence id; default: the authors' licence when the model is converted from a method's released
            checkpoint (NViT: cc-by-nc-sa-4.0), else apache-2.0.
        reported: accuracy reported in the method's paper, same keys as `metrics` plus optional `"dataset"`
            (default `dataset`, else ImageNet-1k), `"split"`, `"source"`, `"source_url"`; labelled as reported.
        model_name: the card title and `model-index` name (default derived from the source and method).
        repo_id: Hub id used in the loading snippets (default `your-username/<model_name>`, which `push` replaces).
        chart: file name of the architecture chart the card shows (`write_model_card` writes it), or None.
    """
    config = model if isinstance(model, PrunedViTConfig) else getattr(model, "config", None)
    if not isinstance(config, PrunedViTConfig):
        raise TypeError(
            f"model must be a PrunedViT model or PrunedViTConfig, got {type(model).__name__}; "
            "convert other ViTs with hf_vitprune.to_pruned_vit first."
        )
    if dense_config is not None:
        if not isinstance(dense_config, PrunedViTConfig):
            raise TypeError(f"dense_config must be a PrunedViTConfig, got {type(dense_config).__name__}.")
        if dense_config.num_hidden_layers != config.num_hidden_layers:
            raise ValueError(
                f"dense_config has {dense_config.num_hidden_layers} blocks, the model {config.num_hidden_layers}."
            )
    pruning = dict(config.pruning or {})
    method = method or pruning.get("method")
    info = METHOD_INFO.get(method) if method else None
    source = str(pruning.get("source") or "")
    if base_model is None and is_repo_id(source):
        base_model = source
    if base_model is not None and not is_repo_id(base_model):
        raise ValueError(f"base_model must be a Hub model id ('owner/name'), got {base_model!r}.")
    released = _released_checkpoint_method(pruning)
    license = license or (METHOD_INFO[released].checkpoint_license if released else DEFAULT_LICENSE)
    model_name = model_name or _default_model_name(base_model or source, method)
    repo_id = repo_id or f"{PLACEHOLDER_USER}/{model_name}"

    measured = _results(metrics, dataset, split) if metrics else []
    reported_results = _reported_results(reported, dataset, info) if reported else []
    eval_results = _model_index(measured, reported_results)
    datasets = sorted({r.dataset_type for r in measured + reported_results if is_repo_id(r.dataset_type)})
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction" if isinstance(model, PrunedViTModel) else "image-classification",
        license=license,
        base_model=base_model,
        datasets=datasets or None,
        tags=["vision", "vit", "pruning", "hf_vitprune", *([method] if method else [])],
        model_name=model_name,
        eval_results=eval_results or None,
    )

    macs, params = count_macs(model), count_params(model)
    if dense_config is not None:
        dense_macs, dense_params = count_macs(dense_config), count_params(dense_config)
    else:
        dense_macs, dense_params = pruning.get("dense_macs"), pruning.get("dense_params")
    source_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else _short_source(source)
    template_kwargs = dict(
        model_name=model_name,
        summary=_summary(info.name if info else method, source_text, macs, dense_macs, params, dense_params),
        method_line=f"{info.name}: [{info.paper}]({info.url})" if info else (method or "none (dense conversion)"),
        source_line=source_text or "unknown",
        num_blocks=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_labels=config.num_labels,
        architecture_notes=_architecture_notes(config),
        license=license,
        license_note=f" (the licence of the {METHOD_INFO[released].name} authors' released checkpoints)"
        if released and license == METHOD_INFO[released].checkpoint_license
        else "",
        cost_rows=[
            _cost_row("MACs per image", dense_macs, macs),
            _cost_row("Parameters", dense_params, params),
        ],
        target=_target_text(pruning),
        latency_section=_latency_markdown(latency),
        chart=chart,
        block_legend=_block_legend(method, dense_config is not None),
        block_rows=_block_rows(model, config, dense_config),
        results_section=_results_markdown(measured),
        reported_section=_results_markdown(reported_results) if reported_results else "",
        repo_id=repo_id,
        citations=[info.bibtex] if info else [],
        citation_intro=f"If you use this model, please cite the pruning method's paper, {info.paper}:" if info else "",
    )
    return ModelCard.from_template(card_data, template_path=str(template_path()), **template_kwargs)


def write_model_card(
    folder: str | os.PathLike, model: PrunedViTPreTrainedModel | PrunedViTConfig, **kwargs: Any
) -> ModelCard:
    """Render the card (`render_model_card(model, **kwargs)`) into `folder/README.md` and draw the architecture
    chart it shows into `folder/architecture.png`; returns the card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("chart", CHART_NAME)
    card = render_model_card(model, **kwargs)
    if kwargs["chart"]:
        config = model if isinstance(model, PrunedViTConfig) else model.config
        save_architecture_chart(config, folder / kwargs["chart"], dense_config=kwargs.get("dense_config"))
    card.save(folder / CARD_NAME)
    return card


def update_card_results(
    folder: str | os.PathLike,
    metrics: Mapping[str, float] | None = None,
    *,
    dataset: str | None = None,
    split: str = "validation",
    latency: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Put newly measured results into the card of `folder`, leaving the rest of it as it is.

    Measured `model-index` entries for the same dataset and split are replaced (other datasets are kept) and the
    card's table of measured results is redrawn; reported results stay in the card's body, and in `model-index`
    where no measured result shares their dataset and split (see `_model_index`). `latency`, when given, replaces
    the latency paragraph.
    """
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write a card first (hf_vitprune.hub.write_model_card).")
    card = ModelCard.load(path)
    if metrics:
        new = _results(metrics, dataset, split)
        replaced = {r.unique_identifier for r in new}
        old = card.data.eval_results or []
        measured = [r for r in old if not r.source_name and r.unique_identifier not in replaced] + new
        card.data.eval_results = _model_index(measured, [r for r in old if r.source_name])
        card.data.datasets = (
            sorted(set(card.data.datasets or []) | {r.dataset_type for r in new if is_repo_id(r.dataset_type)}) or None
        )
        if not card.data.model_name:  # model-index needs one; a hand-written card may lack it: take its title
            title = re.search(r"^# (.+)$", card.text, re.MULTILINE)
            card.data.model_name = title.group(1).strip() if title else Path(folder).resolve().name
        card.text = _replace_region(card.text, "results", _results_markdown(measured))
    if latency is not None:
        card.text = _replace_region(card.text, "latency", _latency_markdown(latency))
    card.save(path)
    return card


def save_architecture_chart(
    config: PrunedViTConfig, path: str | os.PathLike, dense_config: PrunedViTConfig | None = None
) -> Path:
    """A PNG bar chart of the per-block heads, Q/K and V dims per head, MLP width and block (embedding) dim,
    dense beside pruned when `dense_config` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [
        ("heads", "heads_per_layer"),
        ("Q/K dim per head", "qk_head_dims"),
        ("V dim per head", "v_head_dims"),
        ("MLP width", "intermediate_sizes"),
        ("block (embedding) dim", "block_dims"),
    ]
    blocks = list(range(config.num_hidden_layers))
    series = [("dense", dense_config, "#b0b0b0")] if dense_config is not None else []
    series.append(("pruned", config, "#ff9d00"))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), constrained_layout=True)
    for axis, (title, attribute) in zip(axes, panels):
        for j, (label, series_config, color) in enumerate(series):
            x = [b + (j - (len(series) - 1) / 2) * width for b in blocks]
            axis.bar(x, getattr(series_config, attribute), width, color=color, label=label)
        axis.set_title(title)
        axis.set_xlabel("block")
        axis.set_xticks(blocks if len(blocks) <= 12 else blocks[:: math.ceil(len(blocks) / 12)])
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    embedding = f"embedding dim E = {config.hidden_size}"
    if dense_config is not None and dense_config.hidden_size != config.hidden_size:
        embedding += f" (dense {dense_config.hidden_size})"
    axes[-1].axhline(config.hidden_size, color="#444444", linestyle="--", label=embedding)
    figure.legend(*axes[-1].get_legend_handles_labels(), loc="outside lower center", ncol=len(series) + 1)
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def is_repo_id(value: str | None) -> bool:
    """A Hub id (`org/name`) rather than a local path or a class name."""
    if not value or "/" not in value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(value)
    except ValueError:
        return False
    return not value.endswith((".pth", ".pt", ".bin", ".safetensors"))


def _short_source(source: str) -> str:
    """A local checkpoint path reduced to its file name (cards are public), in backticks."""
    if not source:
        return ""
    return f"`{Path(source).name if os.sep in source else source}`"


def _released_checkpoint_method(pruning: Mapping[str, Any]) -> str | None:
    """The method whose released checkpoint the model was converted from (`config.pruning["source_class"]`)."""
    source_class = str(pruning.get("source_class", "")).lower()
    for key, info in METHOD_INFO.items():
        if info.checkpoint_license and source_class.startswith(info.name.lower()):
            return key
    return None


def _default_model_name(source: str, method: str | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).stem if source else "vit").strip("-") or "vit"
    return f"{stem}-{method}-pruned" if method else f"{stem}-pruned-vit"


def _architecture_notes(config: PrunedViTConfig) -> str:
    notes = ""
    if config.use_distillation_token:
        notes += ", with a DeiT distillation token (logits: mean of the class and distillation heads)"
    sparsity = getattr(config, "block_sparsity", None)
    if sparsity:
        notes += ", block-sparse weights in {}x{} blocks (LPViT-style)".format(*sparsity["block_size"])
    return notes


def _block_legend(method: str | None, has_dense: bool) -> str:
    if not has_dense:
        return "Dense dims not recorded."
    return "Each cell: pruned / dense." if method else "Each cell: this model / the source model (not pruned)."


def _human(value: float | None) -> str:
    if value is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value:g}"


def _cost_row(name: str, dense: float | None, pruned: float) -> dict[str, str]:
    ratio = f"{pruned / dense:.1%}" if dense else "—"
    return {"name": name, "dense": _human(dense), "pruned": _human(pruned), "ratio": ratio}


def _summary(method: str | None, source: str, macs: int, dense_macs, params: int, dense_params) -> str:
    source = source or "a Vision Transformer"
    if not method:
        return (
            f"{source} converted to PrunedViT with hf_vitprune. It is not pruned: it computes what the source model "
            "computes, and is ready for pruning or publishing."
        )
    kept = []
    if dense_macs:
        kept.append(f"{macs / dense_macs:.1%} of the dense MACs")
    if dense_params:
        kept.append(f"{params / dense_params:.1%} of the parameters")
    keeping = f", keeping {' and '.join(kept)}" if kept else ""
    return f"A structurally pruned Vision Transformer: {method} applied to {source}{keeping}. Made with hf_vitprune."


def _target_text(pruning: Mapping[str, Any]) -> str:
    """`{"target": {"macs": 0.5}}` (prune()) or `target_macs_ratio: 0.5` as `MACs <= 50% of the dense model`."""
    target = pruning.get("target")
    if not isinstance(target, Mapping):
        target = {
            key.removeprefix("target_").removesuffix("_ratio"): value
            for key, value in pruning.items()
            if key.startswith("target_") and key.endswith("_ratio")
        }
    names = {"macs": "MACs", "params": "parameters", "latency": "latency"}
    return ", ".join(
        f"{names.get(metric, metric)} <= {ratio:.0%} of the dense model"
        for metric, ratio in target.items()
        if isinstance(ratio, (int, float))
    )


def _block_rows(model, config: PrunedViTConfig, dense: PrunedViTConfig | None) -> list[dict[str, str]]:
    macs = count_macs(model, by_block=True).blocks

    def cell(attribute: str, i: int) -> str:
        value = getattr(config, attribute)[i]
        return f"{value} / {getattr(dense, attribute)[i]}" if dense is not None else str(value)

    return [
        {
            "block": str(i),
            "heads": cell("heads_per_layer", i),
            "qk": cell("qk_head_dims", i),
            "v": cell("v_head_dims", i),
            "mlp": cell("intermediate_sizes", i),
            "dim": cell("block_dims", i),
            "macs": _human(macs[i]),
        }
        for i in range(config.num_hidden_layers)
    ]


def _dataset_fields(dataset: str | None) -> tuple[str, str]:
    """(`dataset_type`, `dataset_name`) of model-index: the Hub id, or `imagefolder` and the folder name."""
    if not dataset:
        raise ValueError("dataset is required with metrics (a Hub dataset id or the evaluated folder).")
    if is_repo_id(dataset) or (not os.path.exists(dataset) and "/" not in dataset and os.sep not in dataset):
        return dataset, _DATASET_NAMES.get(dataset, dataset)
    return "imagefolder", Path(dataset).resolve().name


def _results(metrics: Mapping[str, Any], dataset: str | None, split: str, **source: str) -> list[EvalResult]:
    dataset_type, dataset_name = _dataset_fields(dataset)
    results = []
    for key, value in metrics.items():
        match = _RESULT_KEY.match(key)
        if not match:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{key} must be a fraction in [0, 1] (not a percentage), got {value!r}.")
        k = int(match.group(1))
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type="accuracy" if k == 1 else f"top_{k}_accuracy",
                metric_name=f"Top-{k} Accuracy",
                metric_value=round(float(value), 6),
                **source,
            )
        )
    if not results:
        raise ValueError(f"no top_<k>_accuracy entries in the results, got keys {sorted(metrics)}.")
    return results


def _reported_results(reported: Mapping[str, Any], dataset: str | None, info: MethodInfo | None) -> list[EvalResult]:
    source = {
        "source_name": reported.get("source") or (f"{info.name} paper (reported)" if info else "reported"),
        "source_url": reported.get("source_url") or (info.url if info else None),
    }
    return _results(
        reported,
        reported.get("dataset") or dataset or "ILSVRC/imagenet-1k",
        reported.get("split", "validation"),
        **{key: value for key, value in source.items() if value},
    )


def _model_index(measured: list[EvalResult], reported: list[EvalResult]) -> list[EvalResult]:
    """`model-index` entries: measured results, plus reported ones on a dataset and split with no measured result.

    huggingface_hub groups results by task, dataset and split and keeps one `source` per group, so a reported
    result next to a measured one would lose its label (or lend it to the measured one); the card's body keeps it.
    """
    taken = {r.unique_identifier for r in measured}
    return measured + [r for r in reported if r.unique_identifier not in taken]


def _results_markdown(results: list[EvalResult]) -> str:
    if not results:
        return (
            "No evaluation results yet. Measure them with "
            "`hf-vitprune eval --model <folder> --data <dataset> --write-card`."
        )
    lines = ["| metric | value | dataset | split | source |", "|---|---:|---|---|---|"]
    for r in results:
        if r.source_name:
            source = f"[{r.source_name}]({r.source_url})" if r.source_url else r.source_name
        else:
            source = "measured with hf_vitprune"
        lines.append(
            f"| {r.metric_name} | {100 * r.metric_value:.2f}% | {r.dataset_name} | {r.dataset_split} | {source} |"
        )
    return "\n".join(lines)


def _latency_markdown(latency: Mapping[str, Any] | None) -> str:
    if latency is None:
        return "Latency: not measured (`hf-vitprune eval` measures it)."
    if not isinstance(latency, Mapping) or not isinstance(latency.get("seconds"), (int, float)):
        raise ValueError(f"latency must be a dict with 'seconds' (median per batch), got {latency!r}.")
    batch = latency.get("batch_size")
    text = f"Measured latency: {1000 * latency['seconds']:.2f} ms per batch"
    text += f" of {batch} images" if batch else ""
    text += f" on {latency['device']}" if latency.get("device") else ""
    dense = latency.get("dense_seconds")
    if dense:
        text += f" ({latency['seconds'] / dense:.1%} of the dense model's {1000 * dense:.2f} ms)"
    return text + " (median; `torch.inference_mode`)."


def _replace_region(text: str, name: str, content: str) -> str:
    """Replace what lies between the card's `<!-- hf_vitprune:<name>:start/end -->` markers."""
    start, end = f"<!-- hf_vitprune:{name}:start -->", f"<!-- hf_vitprune:{name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"the card has no {start} ... {end} region; re-render it with write_model_card.")
    return pattern.sub(lambda _: f"{start}\n{content}\n{end}", text, count=1)


# ----------------------------------------------------------------------------------------------------------------
# Hub-ready folders and pushing


def check_hub_folder(folder: str | os.PathLike) -> list[str]:
    """Check that `folder` is a complete Hub-ready PrunedViT folder; return the files to upload (relative POSIX
    paths, sorted; hidden files and `__pycache__` excluded).

    Raises:
        FileNotFoundError: the folder, or required files (named in the message, with what each is for), are
            missing: config, weights (and shards), code files, image processor, card and the images it shows.
        ValueError: config.json is not a PrunedViT config with an `auto_map` for trust_remote_code.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder.")
    missing = [f"{name} ({why})" for name, why in REQUIRED_FILES.items() if not (root / name).is_file()]
    if not any((root / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"{' or '.join(WEIGHT_FILES)} (the weights)")
    index = root / WEIGHT_FILES[1]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing += [f"{shard} (a weight shard)" for shard in shards if not (root / shard).is_file()]
    if (root / "config.json").is_file():
        config = json.loads((root / "config.json").read_text())
        if config.get("model_type") != PrunedViTConfig.model_type:
            raise ValueError(f"{root / 'config.json'} has model_type {config.get('model_type')!r}, not 'pruned_vit'.")
        auto_map = config.get("auto_map") or {}
        needed = {"AutoConfig", "AutoModelForImageClassification"} - set(auto_map)
        if needed:
            raise ValueError(f"{root / 'config.json'} auto_map lacks {sorted(needed)}: trust_remote_code would fail.")
        for reference in auto_map.values():
            module = reference.split("--")[-1].rsplit(".", 1)[0]
            if "--" not in reference and f"{module}.py" not in REQUIRED_FILES and not (root / f"{module}.py").is_file():
                missing.append(f"{module}.py (named by auto_map)")
    if (root / CARD_NAME).is_file():
        for link in _IMAGE_LINK.findall((root / CARD_NAME).read_text()):
            if "://" not in link and not (root / link).is_file():
                missing.append(f"{link} (shown by the model card)")
    if missing:
        raise FileNotFoundError(
            f"{root} is not a complete Hub folder for a PrunedViT; missing: {', '.join(missing)}. "
            "Write it with hf_vitprune.hub.save_hub_folder (or `hf-vitprune convert`)."
        )
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts)
    )


def write_folder_atomically(folder: str | os.PathLike, save: Callable[[Path], None]) -> Path:
    """Call `save(tmp)` on a new sibling folder, then move it to `folder`. An existing `folder` is replaced only
    once the new one is complete, and is restored if the move fails, so `folder` is never half-written."""
    target = Path(folder).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    old = None
    try:
        save(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def save_hub_folder(
    model: PrunedViTPreTrainedModel, folder: str | os.PathLike, image_processor: Any = None, **card_kwargs: Any
) -> Path:
    """Write `model` as a Hub-ready folder (see the module doc): weights and code (`save_pretrained`), the image
    processor (`image_processor`, else the one the converters attach as `model.image_processor`), the model card
    and its chart (`write_model_card(..., **card_kwargs)`). Written to a temporary sibling and moved into place
    complete (`write_folder_atomically`); the result passes `check_hub_folder`."""
    if not isinstance(model, PrunedViTPreTrainedModel):
        raise TypeError(f"model must be a PrunedViT model (see hf_vitprune.to_pruned_vit), got {type(model).__name__}.")
    processor = image_processor if image_processor is not None else getattr(model, "image_processor", None)
    if processor is None:
        raise ValueError(
            "a Hub folder needs an image processor: pass image_processor= (e.g. the source model's "
            "AutoImageProcessor) or convert with hf_vitprune.to_pruned_vit, which attaches one."
        )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_model_card(tmp, model, **card_kwargs)
        check_hub_folder(tmp)

    return write_folder_atomically(folder, save)


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    dry_run: bool = False,
) -> list[str]:
    """Upload a Hub-ready folder (`check_hub_folder`) to the model repo `repo_id` in one commit; returns the
    uploaded files. The repo is created if needed. The card's `your-username/<model_name>` snippets are uploaded
    with `repo_id` filled in (the local file is not changed). `dry_run` checks and lists without any network."""
    validate_repo_id(repo_id)
    if "/" not in repo_id:
        raise ValueError(f"repo_id must be 'owner/name', got {repo_id!r}.")
    files = check_hub_folder(folder)
    if dry_run:
        return files
    root = Path(folder)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=_card_bytes(root, repo_id) if name == CARD_NAME else str(root / name)
        )
        for name in files
    ]
    info = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    logger.info("pushed %d files to %s (%s)", len(files), url, getattr(info, "commit_url", ""))
    return files


def _card_bytes(root: Path, repo_id: str) -> bytes:
    text = (root / CARD_NAME).read_text()
    model_name = ModelCard(text).data.model_name
    if model_name:
        text = text.replace(f"{PLACEHOLDER_USER}/{model_name}", repo_id)
    return text.encode()


__all__ = [
    "METHOD_INFO",
    "MethodInfo",
    "check_hub_folder",
    "is_repo_id",
    "push",
    "render_model_card",
    "save_architecture_chart",
    "save_hub_folder",
    "template_path",
    "update_card_results",
    "write_folder_atomically",
    "write_model_card",
]

"""Torch-Pruning (DepGraph) inside hf_vitprune: the baseline the methods are measured against, and the path for
timm models that are not ViTs (ConvNeXt, ResNet, ...).

For ViTs, Torch-Pruning runs on transformers' own `ViTForImageClassification` built from the PrunedViT's weights
(its examples' setting: `num_heads` mapped onto q/k/v, classifier ignored, head pruning on), then the attention
attributes Torch-Pruning leaves stale (`head_dim`) are fixed and the result is converted back to a PrunedViT, so it
is measured, saved and fine-tuned like every other model. The softmax scale is kept (Torch-Pruning's own examples
re-derive it, which changes the function, see methods/torch_pruning.md §4.4).

Other timm models are pruned by a channel ratio and saved without pickles: safetensors weights plus Torch-Pruning's
pruning history, replayed on a fresh `timm.create_model` by `load_pruned_timm`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .importance import batch_inputs

logger = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "taylor")
HISTORY_FILE = "pruning_history.json"
TIMM_CONFIG_FILE = "timm_pruned_config.json"


def _require_torch_pruning():
    try:
        import torch_pruning
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError("Torch-Pruning is needed here: pip install 'hf_vitprune[timm]'.") from error
    return torch_pruning


def _importance(name: str):
    tp = _require_torch_pruning()
    if name not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {name!r}.")
    return tp.importance.GroupMagnitudeImportance(p=2) if name == "magnitude" else tp.importance.GroupTaylorImportance()


def _accumulate_gradients(model: nn.Module, dataloader: Iterable, num_batches: int, loss_fn) -> None:
    """Torch-Pruning's Taylor recipe: gradients summed over `num_batches` batches, never zeroed in between."""
    device = next(model.parameters()).device
    model.zero_grad()
    for step, batch in enumerate(dataloader):
        if step >= num_batches:
            break
        inputs = batch_inputs(batch, device)
        loss_fn(model, inputs).backward()


def to_hf_vit(model: nn.Module):
    """The transformers `ViTForImageClassification` with the same weights as a dense PrunedViT (same names)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = model.config
    uniform = {
        name: set(values)
        for name, values in (
            ("heads", config.heads_per_layer),
            ("qk", config.qk_head_dims),
            ("v", config.v_head_dims),
            ("mlp", config.intermediate_sizes),
            ("block", config.block_dims),
        )
    }
    if any(len(v) != 1 for v in uniform.values()) or uniform["qk"] != uniform["v"] or config.use_distillation_token:
        raise ValueError("Torch-Pruning baselines start from a dense ViT (uniform dims, no distillation token).")
    if uniform["block"] != {config.hidden_size} or config.pooling != "cls":
        raise ValueError("Torch-Pruning baselines start from a dense ViT with CLS pooling.")
    hf_config = ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.heads_per_layer[0],
        intermediate_size=config.intermediate_sizes[0],
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        id2label=config.id2label,
        label2id=config.label2id,
    )
    hf_config.head_dim = config.qk_head_dims[0]
    with torch.device("meta"):
        hf_model = ViTForImageClassification(hf_config)
    hf_model.load_state_dict(model.state_dict(), strict=True, assign=True)
    for layer in hf_model.vit.layers:
        layer.attention.scaling = config.attention_scales[0]
    return hf_model.eval()


def tp_prune_vit(
    model: nn.Module,
    pruning_ratio: float,
    importance: str = "magnitude",
    dataloader: Iterable | None = None,
    num_batches: int = 8,
    global_pruning: bool = False,
    prune_num_heads: bool = True,
    round_to: int | None = None,
) -> nn.Module:
    """Prune a dense PrunedViT with Torch-Pruning as its ViT example does, and return the PrunedViT of the result.

    `pruning_ratio` is Torch-Pruning's: the fraction of channels removed per group (not of MACs); with
    `prune_num_heads` whole heads go too (`head_pruning_ratio = pruning_ratio`).
    """
    from .convert import to_pruned_vit

    tp = _require_torch_pruning()
    if not 0 <= pruning_ratio < 1:
        raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio!r}.")
    if importance == "taylor" and dataloader is None:
        raise ValueError("importance='taylor' is data-driven: pass a dataloader.")
    hf_model = to_hf_vit(model)
    device = next(model.parameters()).device
    hf_model.to(device)
    size = model.config.image_size
    example = torch.randn(1, model.config.num_channels, size, size, device=device)
    num_heads = {}
    for layer in hf_model.vit.layers:
        attention = layer.attention
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
            num_heads[proj] = attention.num_attention_heads
    pruner = tp.pruner.BasePruner(
        hf_model,
        example,
        importance=_importance(importance),
        global_pruning=global_pruning,
        pruning_ratio=pruning_ratio,
        ignored_layers=[hf_model.classifier],
        num_heads=num_heads,
        prune_num_heads=prune_num_heads,
        prune_head_dims=not prune_num_heads,
        head_pruning_ratio=pruning_ratio if prune_num_heads else 0.0,
        round_to=round_to,
        output_transform=lambda out: out.logits.sum(),
    )
    if importance == "taylor":
        _accumulate_gradients(hf_model, dataloader, num_batches, lambda m, inputs: m(**inputs).loss)
    pruner.step()
    hf_model.zero_grad(set_to_none=True)
    for layer in hf_model.vit.layers:
        attention = layer.attention
        attention.num_attention_heads = pruner.num_heads[attention.q_proj]
        attention.head_dim = attention.q_proj.out_features // attention.num_attention_heads
    pruned = to_pruned_vit(hf_model, image_processor=getattr(model, "image_processor", None))
    pruned.config.pruning = {"method": f"torch-pruning-{importance}", "pruning_ratio": pruning_ratio}
    return pruned


def tp_prune_vit_to_macs(
    model: nn.Module,
    target_macs_ratio: float,
    importance: str = "magnitude",
    dataloader: Iterable | None = None,
    tolerance: float = 0.01,
    **kwargs,
) -> nn.Module:
    """Torch-Pruning has no MACs target: bisect its `pruning_ratio` until the result keeps at most
    `target_macs_ratio` of the dense MACs (within `tolerance` below it)."""
    from .cost import count_macs

    dense = count_macs(model.config)
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        candidate = tp_prune_vit(model, ratio, importance, dataloader, **kwargs)
        kept = count_macs(candidate.config) / dense
        if kept <= target_macs_ratio:
            best, high = candidate, ratio
            if kept >= target_macs_ratio - tolerance:
                break
        else:
            low = ratio
    if best is None:
        raise ValueError(f"Torch-Pruning could not reach target_macs_ratio={target_macs_ratio}.")
    best.config.pruning.update(target={"macs": target_macs_ratio}, macs_ratio=count_macs(best.config) / dense)
    return best


def tp_prune_timm(
    model: nn.Module,
    pruning_ratio: float,
    input_size: tuple[int, int, int] = (3, 224, 224),
    global_pruning: bool = False,
    round_to: int | None = 8,
):
    """Prune any timm model by channel ratio with magnitude importance (Torch-Pruning's timm example).

    Returns `(pruned_model, pruning_history)`; the model is pruned in place.
    """
    tp = _require_torch_pruning()
    if not 0 < pruning_ratio < 1:
        raise ValueError(f"pruning_ratio must be in (0, 1), got {pruning_ratio!r}.")
    device = next(model.parameters()).device
    example = torch.randn(1, *input_size, device=device)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [m for m in [classifier] if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=_importance("magnitude"),
        global_pruning=global_pruning,
        pruning_ratio=pruning_ratio,
        ignored_layers=ignored,
        round_to=round_to,
    )
    pruner.step()
    return model, pruner.pruning_history()


def save_pruned_timm(model: nn.Module, history, folder: str | os.PathLike, model_name: str, model_args: dict) -> None:
    """Write safetensors weights, the pruning history and the timm model name to `folder` (atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        (tmp / HISTORY_FILE).write_text(json.dumps(history))
        (tmp / TIMM_CONFIG_FILE).write_text(json.dumps({"model_name": model_name, "model_args": model_args}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_pruned_timm(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a timm model pruned by `hf-vitprune prune --pruning-ratio`: create it unpruned, replay the pruning
    history on its dependency graph, then load the weights (no pickle involved)."""
    import timm
    from safetensors.torch import load_file

    tp = _require_torch_pruning()
    folder = Path(folder)
    spec = json.loads((folder / TIMM_CONFIG_FILE).read_text())
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["model_args"])
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *size))
    graph.load_pruning_history(json.loads((folder / HISTORY_FILE).read_text()))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


def count_timm_cost(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, float]:
    """(MACs, params) of any model, by Torch-Pruning's counter (for models outside the PrunedViT family)."""
    tp = _require_torch_pruning()
    device = next(model.parameters()).device
    example = torch.randn(1, *input_size, device=device)
    return tp.utils.count_ops_and_params(model, example)

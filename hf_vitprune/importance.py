"""Importance scorers shared by every method: one score per prunable unit, higher = more important.

Scores are `{kind: [tensor per layer]}` in the layout of `structure.unit_counts`. Data-driven scorers read the
gradients of the loss with respect to the gates at 1 (`structure.enable_gates`): dL/dg_u = sum over the unit's
activations of a * dL/da, i.e. the first-order Taylor term of removing the unit. Under accelerate/torch.distributed
each process scores its own shard and the sums are reduced across processes before averaging, so every rank gets
the same scores and prunes the same units.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .structure import base_model, check_kinds, enable_gates, remove_gates

logger = logging.getLogger(__name__)

Scores = dict[str, list[torch.Tensor]]


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum tensors over all processes (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return out


def batch_inputs(batch, device: torch.device) -> dict[str, torch.Tensor]:
    """`pixel_values` and `labels` from a dict batch (datasets + image processor) or an `(images, labels)` pair."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch or "labels" not in batch:
            raise ValueError(f"a batch needs 'pixel_values' and 'labels', got keys {sorted(batch)}.")
        pixel_values, labels = batch["pixel_values"], batch["labels"]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        pixel_values, labels = batch
    else:
        raise TypeError("a batch must be a dict with 'pixel_values' and 'labels' or an (images, labels) pair.")
    return {"pixel_values": pixel_values.to(device), "labels": labels.to(device)}


def _limited(dataloader: Iterable, num_batches: int | None, description: str):
    total = num_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)
    for step, batch in enumerate(tqdm(dataloader, total=total, desc=description, disable=not is_main_process())):
        if num_batches is not None and step >= num_batches:
            break
        yield batch


@torch.no_grad()
def magnitude_scores(model: nn.Module, kinds: tuple[str, ...], p: float = 2.0) -> Scores:
    """L_p norm of all weights a unit owns (rows it writes and columns it reads); biases are not counted."""
    check_kinds(kinds)
    vit = base_model(model)
    config = vit.config

    def power(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().abs().pow(p)

    scores: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    embed = power(vit.embeddings.patch_embeddings.projection.weight).flatten(1).sum(1)
    for i, layer in enumerate(vit.layers):
        attn, mlp = layer.attention, layer.mlp
        heads, qk, v = config.heads_per_layer[i], config.qk_head_dims[i], config.v_head_dims[i]
        q_w = power(attn.q_proj.weight).view(heads, qk, -1)
        k_w = power(attn.k_proj.weight).view(heads, qk, -1)
        v_w = power(attn.v_proj.weight).view(heads, v, -1)
        o_w = power(attn.o_proj.weight).view(-1, heads, v)
        fc1, fc2 = power(mlp.fc1.weight), power(mlp.fc2.weight)
        per_kind = {
            "head": (q_w + k_w).sum((1, 2)) + v_w.sum((1, 2)) + o_w.sum((0, 2)),
            "qk": (q_w + k_w).sum((0, 2)),
            "v": v_w.sum((0, 2)) + o_w.sum((0, 1)),
            "mlp": fc1.sum(1) + fc2.sum(0),
        }
        channel = (q_w + k_w).sum((0, 1)) + v_w.sum((0, 1)) + fc1.sum(0) + o_w.sum((1, 2)) + fc2.sum(1)
        per_kind["channel"] = channel
        index = layer.channel_index
        embed = embed.index_add(0, index, channel) if index is not None else embed + channel
        for kind in kinds:
            if kind != "embed":
                scores[kind].append(per_kind[kind].pow(1 / p).cpu())
    if "embed" in kinds:
        for head in _classifiers(model):
            embed = embed + power(head.weight).sum(0)
        scores["embed"].append(embed.pow(1 / p).cpu())
    return scores


def _classifiers(model: nn.Module) -> list[nn.Linear]:
    names = ("classifier", "cls_classifier", "distillation_classifier")
    return [m for m in (getattr(model, n, None) for n in names) if isinstance(m, nn.Linear)]


def _gate_gradient_scores(
    model: nn.Module,
    dataloader: Iterable,
    kinds: tuple[str, ...],
    num_batches: int | None,
    micro_batch_size: int | None,
    description: str,
) -> Scores:
    """Mean over (micro-)batches of (dL/dg)^2, reduced over processes."""
    check_kinds(kinds)
    if dataloader is None:
        raise ValueError(f"{description} scores are data-driven: pass a dataloader.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gates = enable_gates(model, kinds)
    flat_gates = [g for kind in kinds for g in gates[kind]]
    sums = [torch.zeros_like(g, dtype=torch.float64) for g in flat_gates]
    count = 0
    try:
        for batch in _limited(dataloader, num_batches, description):
            inputs = batch_inputs(batch, device)
            size = inputs["labels"].shape[0]
            step = micro_batch_size or size
            for start in range(0, size, step):
                chunk = {k: v[start : start + step] for k, v in inputs.items()}
                loss = model(**chunk).loss
                grads = torch.autograd.grad(loss, flat_gates, allow_unused=True)
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total += grad.detach().double().square()
                count += 1
    finally:
        remove_gates(model)
        model.train(was_training)
    *sums, total_count = all_reduce_sum([*sums, torch.tensor([float(count)], device=device, dtype=torch.float64)])
    if total_count.item() == 0:
        raise ValueError("the dataloader gave no batch to score with.")
    means = iter([(s / total_count).float().cpu() for s in sums])
    return {kind: [next(means) for _ in gates[kind]] for kind in kinds}


def taylor_scores(
    model: nn.Module, dataloader: Iterable, kinds: tuple[str, ...], num_batches: int | None = None
) -> Scores:
    """First-order Taylor importance: per batch (sum over the unit's activations of a * dL/da)^2 = (dL/dg)^2,
    averaged over batches (Molchanov et al. 2019; the saliency NViT uses)."""
    return _gate_gradient_scores(model, dataloader, kinds, num_batches, None, "taylor")


def fisher_scores(
    model: nn.Module,
    dataloader: Iterable,
    kinds: tuple[str, ...],
    num_batches: int | None = None,
    micro_batch_size: int = 1,
) -> Scores:
    """Empirical Fisher diagonal of the gates, E_n[(dl_n/dg)^2] over samples (micro-batches of
    `micro_batch_size`; 1 = per sample): the Gauss-Newton approximation of the Hessian diagonal."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
    return _gate_gradient_scores(model, dataloader, kinds, num_batches, micro_batch_size, "fisher")

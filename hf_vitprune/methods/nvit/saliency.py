"""NViT's saliency (spec §2.2): per unit, (scale · Σ w·dL/dw over the unit's criterion parameters)², per batch.

The paper's criterion for a group S with gate g_S is (dL/dg_S)² = (Σ_{s∈S} w_s·dL/dw_s)², the squared Taylor term
of the whole group. NViT's code sums w·dL/dw over *criterion parameters* that are not the zeroed parameters of a
unit, and scales the sums before squaring (spec §10.2):

- embed channel c (scale 1/12): patch-embedding row c and bias; in every block the Q, K, V and fc1 input columns
  c (weights only), the o_proj and fc2 output rows c and biases. Not the LayerNorms, tokens or classifiers.
- head h (1/12): the Q, K and V rows of head h and their biases; not o_proj.
- Q/K index j (1/2): the Q rows (h, j) of every head h and their biases; Q only, not K.
- V index j (1/2): the V rows (h, j) of every head h and their biases; not o_proj.
- MLP neuron m (1): fc1 row m and its bias; not fc2.

These sums are computed from the weights and their gradients, not from PrunedViT's gates, because the gates act
elsewhere for three of the kinds: the head gate scales the attention output (its gradient is the V part only), the
neuron gate scales the activation output (GELU lies between it and fc1's rows), and the embedding gate scales the
residual stream including LayerNorm statistics. For Q/K and V the sums equal the gate gradients exactly (the
`qk_gate` and `v_gate` scale q and v after their bias), which the tests check.

The gradient is that of the training loss on one batch (in the Trainer: of the optimizer step, averaged over
processes by DDP, unscaled from AMP). NViT multiplies it by the weights *after* the optimizer step and the re-zeroing
of pruned weights, a quirk the callback keeps (the difference is one learning-rate step); one-shot scoring uses the
weights the gradient was taken at. Non-finite per-batch scores are replaced by 0, as in NViT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ...importance import Scores, _limited, all_reduce_sum, batch_inputs
from ...structure import base_model, unit_counts

Gradient = Callable[[torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def criterion_sums(model: nn.Module, gradient: Gradient, kinds: tuple[str, ...], scale: dict[str, float]) -> Scores:
    """Per unit, `scale[kind]` times the sum of w·dL/dw over its criterion parameters (table in the module doc).

    Args:
        model: a PrunedViT (masked or not).
        gradient: maps a parameter to its gradient (or None: no gradient, counts as 0), e.g. `lambda p: p.grad`.
        kinds: kinds to return, among "embed", "head", "qk", "v", "mlp".
        scale: factor per kind, applied before the caller squares.
    """
    vit = base_model(model)
    config = vit.config

    def product(parameter: torch.Tensor | None) -> torch.Tensor | None:
        grad = None if parameter is None else gradient(parameter)
        if grad is None:
            return None if parameter is None else torch.zeros_like(parameter, dtype=torch.float32)
        return parameter.detach().float() * grad.detach().float()

    def rows(parameter: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | float:
        value = product(parameter)
        return 0.0 if value is None else value.reshape(*shape, -1).sum(-1)

    scores: Scores = {kind: [] for kind in kinds}
    projection = vit.embeddings.patch_embeddings.projection
    embed = rows(projection.weight, (config.hidden_size,)) + rows(projection.bias, (config.hidden_size,))
    for i, layer in enumerate(vit.layers):
        attn, mlp = layer.attention, layer.mlp
        heads, qk, v = config.heads_per_layer[i], config.qk_head_dims[i], config.v_head_dims[i]
        q = rows(attn.q_proj.weight, (heads, qk)) + rows(attn.q_proj.bias, (heads, qk))
        k = rows(attn.k_proj.weight, (heads, qk)) + rows(attn.k_proj.bias, (heads, qk))
        values = rows(attn.v_proj.weight, (heads, v)) + rows(attn.v_proj.bias, (heads, v))
        per_kind = {
            "head": q.sum(1) + k.sum(1) + values.sum(1),
            "qk": q.sum(0),
            "v": values.sum(0),
            "mlp": rows(mlp.fc1.weight, (mlp.fc1.out_features,)) + rows(mlp.fc1.bias, (mlp.fc1.out_features,)),
        }
        for kind in kinds:
            if kind != "embed":
                scores[kind].append(scale[kind] * per_kind[kind])
        if "embed" in kinds:
            columns = sum(product(p).sum(0) for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
            channel = columns + product(mlp.fc1.weight).sum(0)
            for linear in (attn.o_proj, mlp.fc2):
                outputs = (linear.out_features,)
                channel = channel + rows(linear.weight, outputs) + rows(linear.bias, outputs)
            index = layer.channel_index
            embed = embed.index_add(0, index, channel) if index is not None else embed + channel
    if "embed" in kinds:
        scores["embed"].append(scale["embed"] * embed)
    return scores


class SaliencyAccumulator:
    """Sum of per-batch squared criterion sums and the batch count, averaged over all processes on `mean()`.

    Under DDP the gradients are already averaged, so every rank adds the same values and the all-reduced mean is
    the local one; without DDP (one-shot scoring, each rank on its own shard) it is the mean over every batch of
    every rank, i.e. what one process computes on the union of the data.

    Args:
        counts: units per layer of every kind to accumulate (`structure.unit_counts(config)` restricted to kinds).
        device: where the sums live (the model's device, so that NCCL or gloo can reduce them).
    """

    def __init__(self, counts: dict[str, list[int]], device: torch.device | str = "cpu") -> None:
        self.counts, self.device = counts, device
        self.reset()

    def reset(self) -> None:
        self.sums = {
            kind: [torch.zeros(n, dtype=torch.float64, device=self.device) for n in sizes]
            for kind, sizes in self.counts.items()
        }
        self.count = 0

    def add(self, criteria: Scores) -> None:
        """Add one batch: the squares of its criterion sums (non-finite values count as 0)."""
        for kind, layers in self.sums.items():
            for total, criterion in zip(layers, criteria[kind]):
                total += torch.nan_to_num(criterion.double().square(), nan=0.0, posinf=0.0, neginf=0.0)
        self.count += 1

    def mean(self) -> Scores:
        """Mean over all batches of all processes (float32, on CPU), then reset. Every process must call it."""
        kinds = list(self.sums)
        flat = [s for kind in kinds for s in self.sums[kind]]
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=flat[0].device)
        *flat, count = all_reduce_sum([*flat, count])
        if count.item() == 0:
            raise ValueError("no batch was accumulated: the saliency needs at least one backward pass.")
        means = iter([(s / count).float().cpu() for s in flat])
        self.reset()
        return {kind: [next(means) for _ in self.counts[kind]] for kind in kinds}


def saliency_scores(
    model: nn.Module,
    dataloader: Iterable,
    kinds: tuple[str, ...],
    scale: dict[str, float],
    num_batches: int | None = None,
) -> Scores:
    """One-shot NViT saliency: the mean over batches of the squared criterion sums, reduced over processes.

    The model runs in eval mode (deterministic; NViT's first interval ran in train mode with drop-path) and its
    weights and `.grad` are left untouched; parameters that do not require grad get a gradient for scoring anyway.
    """
    if dataloader is None:
        raise ValueError("nvit saliency is data-driven: pass a dataloader.")
    device = next(model.parameters()).device
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    was_training = model.training
    model.eval()
    counts = unit_counts(base_model(model).config)
    accumulator = SaliencyAccumulator({kind: counts[kind] for kind in kinds}, device)
    try:
        for p in parameters:
            p.requires_grad_(True)
        for batch in _limited(dataloader, num_batches, "nvit"):
            loss = model(**batch_inputs(batch, device)).loss
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            by_id = {id(p): g for p, g in zip(parameters, grads)}
            accumulator.add(criterion_sums(model, lambda p, by_id=by_id: by_id.get(id(p)), kinds, scale))
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return accumulator.mean()  # every rank joins the reduction, even one whose shard was empty

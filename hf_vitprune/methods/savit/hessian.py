"""SAViT's collaborative (structure-aware) part: a 3x3 summary Ĥ of the Hessian of the loss in the gates, by
Hessian-vector products (double backward on the gates).

Per batch, with g = dL/dm taken with `create_graph=True` (m = the head, MLP and embedding gates, all at 1):

1. draw one block l (torch generator seeded with `seed`); the head and MLP rows use block l, the embedding row its
   single gate (paired with block 0, as in the original);
2. for every row component p and column component q, draw the column block uniformly in [0, row block] (the same
   or an earlier block) and take h = d<g_p, 1>/dm_q, so sum(h) = 1ᵀ H_qp 1, the sum of that Hessian block;
3. add sum(h) / (n_p n_q) to Ĥ[p, q], with n = (hidden_size, intermediate_size of the block,
   hidden_size·L·κ) (hidden_size, not the head count, for heads: a head gate spans hidden_size features in DeiT).

Ĥ is the mean over batches (summed over processes first, so every rank gets the same Ĥ). It is not symmetric,
since rows and columns are sampled differently; the allocation uses its upper triangle, as the original does.

Deviations from the original code, on purpose: the three HVPs of a row share one `autograd.grad` call (3 double
backward calls per batch instead of 9; the same numbers); Ĥ is averaged over the same batches as the scores
(the original ran one extra batch); the loss is the model's own loss on the batch's labels (the original used
Mixup/CutMix soft targets, which is a property of the data pipeline here). The MLP gate multiplies the GELU
output (the original gated its input; a 0 gate removes the neuron either way) and the embedding gate also takes
LayerNorm statistics over active channels, so Ĥ is the Hessian of this library's exactly-pruned function.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ...importance import _limited, all_reduce_sum, batch_inputs
from ...structure import base_model, enable_gates, remove_gates
from .config import SAVIT_KINDS

Gates = dict[str, list[torch.Tensor]]


@contextmanager
def double_backward_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, eager attention (fused SDPA kernels have no double backward) and frozen weights (only gate
    gradients are needed, so no weight gradient is computed); all restored on exit."""
    was_training = model.training
    implementation = model.config._attn_implementation
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.eval()
    model.config._attn_implementation = "eager"
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.config._attn_implementation = implementation
        model.train(was_training)


def sample_layers(generator: torch.Generator, num_layers: int) -> dict[tuple[str, str], tuple[int, int]]:
    """(row layer, column layer) of each entry (p, q) of Ĥ for one batch, drawn as described in the module doc.

    The embedding component has a single layer (index 0), which is also the bound of its columns' draws.
    """

    def draw(bound: int) -> int:
        return int(torch.randint(bound + 1, (1,), generator=generator))

    block = draw(num_layers - 1)
    pairs = {}
    for p in SAVIT_KINDS:
        row = 0 if p == "embed" else block
        for q in SAVIT_KINDS:
            pairs[p, q] = (row, 0 if q == "embed" else draw(row))
    return pairs


def hessian_block_sums(gates: Gates, grads: Gates, pairs: dict[tuple[str, str], tuple[int, int]]) -> torch.Tensor:
    """Raw 1ᵀ H_qp 1 for the sampled layers: `grads` must be gate gradients taken with `create_graph=True`."""
    sums = torch.zeros(3, 3, dtype=torch.float64)
    for i, p in enumerate(SAVIT_KINDS):
        row = pairs[p, p][0]
        columns = [gates[q][pairs[p, q][1]] for q in SAVIT_KINDS]
        products = torch.autograd.grad(grads[p][row].sum(), columns, retain_graph=True, allow_unused=True)
        for j, product in enumerate(products):
            if product is not None:
                sums[i, j] = product.detach().double().sum().cpu()
    return sums


def _normaliser(model: nn.Module, hessian_embed_factor: float):
    config = base_model(model).config
    sizes = {
        "head": [config.hidden_size] * config.num_hidden_layers,
        "mlp": config.intermediate_sizes,
        "embed": [config.hidden_size * config.num_hidden_layers * hessian_embed_factor],
    }

    def normaliser(pairs: dict[tuple[str, str], tuple[int, int]]) -> torch.Tensor:
        return torch.tensor(
            [[sizes[p][pairs[p, q][0]] * sizes[q][pairs[p, q][1]] for q in SAVIT_KINDS] for p in SAVIT_KINDS],
            dtype=torch.float64,
        )

    return normaliser


def _hessian_step(model: nn.Module, gates: Gates, inputs: dict, generator: torch.Generator, normaliser) -> torch.Tensor:
    """One batch's normalised contribution to Ĥ."""
    flat = [gate for kind in SAVIT_KINDS for gate in gates[kind]]
    loss = model(**inputs).loss
    flat_grads = iter(torch.autograd.grad(loss, flat, create_graph=True))
    grads = {kind: [next(flat_grads) for _ in gates[kind]] for kind in SAVIT_KINDS}
    pairs = sample_layers(generator, len(gates["head"]))
    return hessian_block_sums(gates, grads, pairs) / normaliser(pairs)


def collaborative_hessian(
    model: nn.Module,
    dataloader: Iterable,
    num_batches: int | None = None,
    *,
    seed: int = 0,
    hessian_embed_factor: float = 6.0,
) -> tuple[torch.Tensor, int]:
    """Ĥ (3x3, float64, rows/columns head, mlp, embed) over `num_batches` batches (None: all), and the number of
    batches it averages (over all processes). The model is left as it was (gates removed, mode restored)."""
    if dataloader is None:
        raise ValueError("the SAViT Hessian is data-driven: pass a dataloader.")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    normaliser = _normaliser(model, hessian_embed_factor)
    total = torch.zeros(3, 3, dtype=torch.float64)
    count = 0
    with double_backward_mode(model):
        gates = enable_gates(model, SAVIT_KINDS)
        try:
            for batch in _limited(dataloader, num_batches, "savit hessian"):
                total += _hessian_step(model, gates, batch_inputs(batch, device), generator, normaliser)
                count += 1
        finally:
            remove_gates(model)
    total, batches = all_reduce_sum([total.to(device), torch.tensor([float(count)], device=device)])
    if batches.item() == 0:
        raise ValueError("the dataloader gave no batch to estimate the SAViT Hessian with.")
    return (total / batches).cpu(), int(batches.item())


def hessian_cost_ratio(model: nn.Module, batch, repeats: int = 3) -> float:
    """Wall time of one batch of the Hessian pass (forward, gate gradients with `create_graph`, the Hessian-vector
    products) over one plain training step on the same batch (forward, backward into every weight, SGD step, on
    a copy of the model). Medians of `repeats` timings after a warm-up; the model is not modified."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}.")
    device = next(model.parameters()).device
    inputs = batch_inputs(batch, device)
    student = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)

    def training_step() -> None:
        student(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    generator = torch.Generator().manual_seed(0)
    normaliser = _normaliser(model, 6.0)
    with double_backward_mode(model):
        gates = enable_gates(model, SAVIT_KINDS)
        try:
            times = [
                _median_seconds(step, repeats)
                for step in (training_step, lambda: _hessian_step(model, gates, inputs, generator, normaliser))
            ]
        finally:
            remove_gates(model)
    return times[1] / times[0]


def _median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    timings = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)

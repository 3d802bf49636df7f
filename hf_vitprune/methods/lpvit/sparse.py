"""Export block-masked linears to PyTorch block-sparse (BSR) weights, for inference.

`to_block_sparse` stores only the kept blocks (`Tensor.to_sparse_bsr`) and computes `addmm(b, W_bsr, x^T)`, which
on CUDA with fp16/bf16 dispatches to PyTorch's Triton block-sparse kernels (power-of-two blocks >= 16). On CPU the
kernels are MKL sparse ones, float32 only, and at LPViT's ~50 % block sparsity they are several times slower than
a dense matmul (see the README's measurements); give `benchmark_tokens` to convert only the layers that are
measured faster on the model's device. Layers whose shape is not a multiple of the block size (partial edge
blocks) and convolutions stay masked dense layers.

BSR weights are non-persistent buffers (safetensors stores no sparse tensors): save the masked model, and convert
after loading.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time

import torch
from torch import nn

from ...modeling_pruned_vit import BlockMaskedLinear, block_masked_weight
from .masks import masked_modules

logger = logging.getLogger(__name__)


class BSRLinear(nn.Module):
    """Inference-only nn.Linear replacement whose weight is a sparse BSR tensor holding the kept blocks."""

    def __init__(self, linear: BlockMaskedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = linear.block_size
        weight = block_masked_weight(linear).detach().to_sparse_bsr(linear.block_size)
        self.register_buffer("weight", weight, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # y^T = W x^T (+ b) with the sparse operand first: the form CPU supports under inference_mode (F.linear
        # fails there on 2-D or strided inputs in torch 2.14) and CUDA runs with its Triton BSR kernels
        flat = input.reshape(-1, self.in_features).T
        if self.bias is None:
            out = torch.mm(self.weight, flat)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, flat)
        return out.T.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"


def _divisible(module: BlockMaskedLinear) -> bool:
    return module.out_features % module.block_size[0] == 0 and module.in_features % module.block_size[1] == 0


@torch.no_grad()
def _median_seconds(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    layer(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def to_block_sparse(model: nn.Module, benchmark_tokens: int | None = None, repeats: int = 5) -> nn.Module:
    """A copy of `model` in which block-masked nn.Linear layers compute with BSR weights (same function, to
    float rounding). `model` is not modified.

    Args:
        model: a model with block masks (e.g. from `hf_vitprune.prune(model, "lpvit", ...)`).
        benchmark_tokens: if given, time each layer dense (masked weight) and BSR on a random input of this many
            tokens (e.g. batch x sequence length) and convert only the layers that are faster as BSR.
        repeats: timed runs per layer (median) when benchmarking.
    """
    if benchmark_tokens is not None and (isinstance(benchmark_tokens, bool) or benchmark_tokens < 1):
        raise ValueError(f"benchmark_tokens must be a positive integer or None, got {benchmark_tokens!r}.")
    if not masked_modules(model):
        raise ValueError("the model has no block masks; prune it with lpvit or load a block-sparse checkpoint.")
    sparse = copy.deepcopy(model)
    converted = 0
    for name, module in masked_modules(sparse).items():
        if not isinstance(module, BlockMaskedLinear):
            continue
        if not _divisible(module):
            logger.info("%s: %s does not divide %s, left dense", name, module.block_size, tuple(module.weight.shape))
            continue
        replacement = BSRLinear(module)
        if benchmark_tokens is not None:
            x = torch.randn(1, benchmark_tokens, module.in_features, device=module.weight.device)
            x = x.to(module.weight.dtype)
            dense_s, sparse_s = _median_seconds(module, x, repeats), _median_seconds(replacement, x, repeats)
            logger.info("%s: dense %.3g ms, BSR %.3g ms", name, 1e3 * dense_s, 1e3 * sparse_s)
            if sparse_s >= dense_s:
                continue
        parent, _, child = name.rpartition(".")
        setattr(sparse.get_submodule(parent) if parent else sparse, child, replacement)
        converted += 1
    logger.info("to_block_sparse: %d layers converted to BSR", converted)
    return sparse

"""NViT (Yang et al., CVPR 2023): global, latency-aware structured pruning with Hessian-aware saliency.

- `NViTConfig`, `NViTMethod` (registered as "nvit"): NViT's saliency (squared, scaled Σ w·dL/dw per unit) over
  embedding channels, heads, Q/K and V dims (aligned across heads) and MLP neurons, in hardware-aligned groups,
  ranked globally with a latency (or MACs) credit; one-shot through `hf_vitprune.prune(model, "nvit", ...)`.
- `NViTCallback`: the paper's prune-while-training schedule inside `transformers.Trainer`.
- `revit_config`: ReViT, the parameter-redistribution rule derived from NViT's pruned models.
- Latency tables: `hf_vitprune.latency.LatencyTable`; NViT checkpoints: `hf_vitprune.convert.from_nvit_checkpoint`.

The callback is imported lazily: it builds on `hf_vitprune.callbacks`, which imports the method registry.
"""

from .config import ALIGNMENT, DEIT_B_GROUPS, NVIT_CRITERION_SCALE, NVIT_KINDS, NViTConfig, nvit_group_sizes
from .grouping import CostModel, analytic_cost_model, cost_model_for
from .method import NViTMethod
from .revit import REVIT_RULES, revit_config, revit_dims
from .saliency import SaliencyAccumulator, criterion_sums, saliency_scores


def __getattr__(name: str):
    if name in ("NViTCallback", "zero_pruned_units"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALIGNMENT",
    "DEIT_B_GROUPS",
    "NVIT_CRITERION_SCALE",
    "NVIT_KINDS",
    "REVIT_RULES",
    "CostModel",
    "NViTCallback",
    "NViTConfig",
    "NViTMethod",
    "SaliencyAccumulator",
    "analytic_cost_model",
    "cost_model_for",
    "criterion_sums",
    "nvit_group_sizes",
    "revit_config",
    "revit_dims",
    "saliency_scores",
    "zero_pruned_units",
]

"""SAViT (Zheng et al., NeurIPS 2022): structure-aware ViT pruning by collaborative optimisation.

- `SAViTConfig`, `SAViTMethod` (registered as "savit"): gate-Fisher unit scores, the 3x3 collaborative Hessian,
  ratio allocation by evolution strategy or exact grid under a MACs/params target.
- `SAViTCallback`: the same inside `transformers.Trainer` (masks while fine-tuning, `compact` after).
- `collaborative_hessian`, `hessian_cost_ratio`, `SAViTImportance` (statistics on disk, no pickles).

The callback is imported lazily: it builds on `hf_vitprune.callbacks`, which imports the method registry.
"""

from .allocation import Allocation, RatioProblem, evolution_search, grid_search
from .config import SAVIT_KINDS, SAViTConfig
from .hessian import collaborative_hessian, hessian_cost_ratio
from .importance_io import SAViTImportance
from .method import SAViTMethod


def __getattr__(name: str):
    if name == "SAViTCallback":
        from .callback import SAViTCallback

        return SAViTCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SAVIT_KINDS",
    "Allocation",
    "RatioProblem",
    "SAViTCallback",
    "SAViTConfig",
    "SAViTImportance",
    "SAViTMethod",
    "collaborative_hessian",
    "evolution_search",
    "grid_search",
    "hessian_cost_ratio",
]

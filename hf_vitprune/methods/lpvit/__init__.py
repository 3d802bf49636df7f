"""LPViT: low-power block-semi-structured pruning of ViTs (Xu et al., ECCV 2024), as a method of this library.

Units are weight blocks of every linear (fused Q/K/V as one layer, o_proj, fc1, fc2; patch embedding and heads
optional), ranked by first-order Taylor saliency; per-layer block sparsities come from LPViT's rate-distortion
allocation (Taylor distortion curves with the second-order term, optional smoothing and power term, equal slopes
bisected to a MACs target). Masks are persistent buffers that `from_pretrained` restores; `LPViTCallback` keeps
them during fine-tuning; emptied rows and columns compact exactly, and `to_block_sparse` exports BSR weights.
"""

from .allocation import BlockStats, LPViTScores
from .callback import LPViTCallback
from .compaction import compact_block_sparse
from .config import LAYER_TYPES, LPViTConfig
from .masks import (
    BlockMaskPlan,
    apply_block_masks,
    block_masks,
    fold_block_masks,
    lpvit_layers,
    masked_fraction,
    remove_block_masks,
)
from .method import LPViTMethod
from .sparse import BSRLinear, to_block_sparse

__all__ = [
    "LAYER_TYPES",
    "BSRLinear",
    "BlockMaskPlan",
    "BlockStats",
    "LPViTCallback",
    "LPViTConfig",
    "LPViTMethod",
    "LPViTScores",
    "apply_block_masks",
    "block_masks",
    "compact_block_sparse",
    "fold_block_masks",
    "lpvit_layers",
    "masked_fraction",
    "remove_block_masks",
    "to_block_sparse",
]

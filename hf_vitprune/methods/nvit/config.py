"""Options of NViT (Yang et al., CVPR 2023) and its hardware-aligned group sizes.

Names say what an option does; the original's flag or constant is in brackets in the docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...configuration_pruned_vit import PrunedViTConfig
from ...structure import unit_counts
from ..base import PruningMethodConfig

#: The five structures NViT prunes (spec §1.2): embedding channels, heads, per-head Q/K dims and V dims (aligned
#: across the heads of a block), MLP neurons.
NVIT_KINDS = ("embed", "head", "qk", "v", "mlp")

#: NViT's group sizes on DeiT-B and the unit counts they were chosen for (spec §1.4): 16 of 768 embedding
#: channels, 2 of 12 heads, 8 of 64 Q/K and V dims per head, 16 of 3072 MLP neurons.
DEIT_B_GROUPS = {"embed": (16, 768), "head": (2, 12), "qk": (8, 64), "v": (8, 64), "mlp": (16, 3072)}

#: NViT's constant factors applied to a unit's sum of w·dL/dw before squaring (spec §2.2; code only, not in the
#: paper): EMB /12, heads /6 then /2, QK /2, V /2, MLP 1.
NVIT_CRITERION_SCALE = {"embed": 1 / 12, "head": 1 / 12, "qk": 1 / 2, "v": 1 / 2, "mlp": 1.0}


#: The smallest group of a kind that is a matrix dimension (embedding, Q/K and V dims, MLP): kept dims stay
#: multiples of 8, which GEMM kernels need to run at full speed (on this project's CPU a linear layer of an
#: unaligned width costs ~1.5x more per output than an aligned one); heads have no such constraint.
ALIGNMENT = 8


def nvit_group_sizes(config: PrunedViTConfig) -> dict[str, int]:
    """Group size per kind for `config`: NViT's DeiT-B sizes scaled by the kind's largest per-layer unit count,
    rounded down to a power of two, and at least `ALIGNMENT` (8) for everything but heads (at least 1).

    DeiT-B gets exactly NViT's 16/2/8/8/16. The 6-block, 128-wide digits ViT (4 heads of 32, MLP 512) gets embed
    8, head 1, qk 8, v 8, mlp 8.
    """
    counts = unit_counts(config)
    sizes = {}
    for kind, (size, units) in DEIT_B_GROUPS.items():
        scaled = int(size * max(counts[kind]) / units)
        sizes[kind] = max(1 << max(scaled.bit_length() - 1, 0), 1 if kind == "head" else ALIGNMENT)
    return sizes


@dataclass
class NViTConfig(PruningMethodConfig):
    """NViT: global, latency-aware structured pruning with Hessian-aware (squared Taylor) group saliency.

    Args:
        kinds: structures to prune, a subset of ("embed", "head", "qk", "v", "mlp") (all five in NViT).
        round_to: units removed together per kind, the hardware-aligned groups (an int for every kind, or a dict
            per kind); None picks `nvit_group_sizes(model.config)`, NViT's 16/2/8/8/16 on DeiT-B [hard-coded by
            layer position in `group_criteria`]. The last group of a layer always stays
            [`leave_at_least_one_group`].
        num_batches: batches of the dataloader to score with in one-shot pruning (None: all). NViT averages the
            per-batch saliency over the 100 batches between pruning steps [`--interval_prune 100`].
        latency_regularization: η, the weight of the cost saved by a unit, subtracted from its saliency
            [`--latency_regularization 5e-4`]. Here the cost saved is a fraction of the dense model's cost, so one
            η fits latency tables of any device and the MACs model; NViT's η = 5e-4 per second on its V100 table,
            whose 12 DeiT-B blocks take 0.97 s, is η = 5e-4 x 0.97 = 4.85e-4 here. Saliency scales with the loss
            (NViT's loss carries a 1e5 KL term), so η is retuned with the loss: the default 1e-5 suits a
            cross-entropy loss on small models (on the digits ViT the summed saliency of all units is ~6e-3; η
            up to ~1e-4 trades accuracy for cost, beyond that the credit outweighs the saliency). 0 ranks by
            saliency alone (the target still applies).
        criterion_scale: factor per kind on a unit's sum of w·dL/dw before squaring (NViT's /12, /12, /2, /2, 1).

    `scope` must stay "global": NViT ranks every group of every layer in one list.
    """

    kinds: tuple[str, ...] = NVIT_KINDS
    round_to: int | dict[str, int] | None = None
    num_batches: int | None = None
    latency_regularization: float = 1e-5
    criterion_scale: dict[str, float] = field(default_factory=lambda: dict(NVIT_CRITERION_SCALE))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not set(self.kinds) <= set(NVIT_KINDS):
            raise ValueError(f"kinds must be a subset of {NVIT_KINDS}, got {list(self.kinds)}.")
        if self.scope != "global":
            raise ValueError(f"scope must be 'global' for nvit (one ranking over all layers), got {self.scope!r}.")
        if self.round_to is not None:
            values = self.round_to.values() if isinstance(self.round_to, dict) else [self.round_to]
            if isinstance(self.round_to, dict) and not set(self.round_to) <= set(NVIT_KINDS):
                raise ValueError(f"round_to keys must be in {NVIT_KINDS}, got {sorted(self.round_to)}.")
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"round_to must be None, a positive int or a dict of them, got {self.round_to!r}.")
        if self.num_batches is not None and (
            isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches < 1
        ):
            raise ValueError(f"num_batches must be None or a positive integer, got {self.num_batches!r}.")
        eta = self.latency_regularization
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"latency_regularization must be a number >= 0, got {eta!r}.")
        scale = {**NVIT_CRITERION_SCALE, **self.criterion_scale}
        if set(scale) != set(NVIT_KINDS) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in scale.values()
        ):
            raise ValueError(
                f"criterion_scale must map kinds of {NVIT_KINDS} to positive numbers, got {self.criterion_scale!r}."
            )
        self.criterion_scale = scale

    def group_sizes(self, config: PrunedViTConfig) -> dict[str, int]:
        """The group size of every kind for a model with `config` (`round_to` resolved)."""
        if self.round_to is None:
            return nvit_group_sizes(config)
        if isinstance(self.round_to, int):
            return dict.fromkeys(NVIT_KINDS, self.round_to)
        return {**nvit_group_sizes(config), **self.round_to}

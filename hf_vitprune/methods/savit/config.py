"""Options of SAViT (Zheng et al., NeurIPS 2022), named after what they do; the original's flag is in brackets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..base import PruningMethodConfig

#: The components SAViT prunes, in the index order of its 3x3 matrix Ĥ (heads, MLP hidden, embedding).
SAVIT_KINDS = ("head", "mlp", "embed")
SEARCHES = ("evolution", "grid")


def _number(name: str, value, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> None:
    """Raise a ValueError naming `name` unless `value` is a real number in the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass
class SAViTConfig(PruningMethodConfig):
    """SAViT: gate-Fisher unit scores within each component, a 3x3 cross-component Hessian Ĥ, and the pruning
    ratios of the components chosen jointly under the cost target by minimising the quadratic model of Ĥ.

    Args:
        kinds: components to prune, a subset of ("head", "mlp", "embed") containing "mlp": the MLP count is solved
            from the target in closed form [SAViT prunes all three, `--pruning_layers 3`; other values crash there].
        calibration_fraction: fraction of the dataloader's batches used for the statistics, in (0, 1]
            [`--pruning_feed_percent`: 0.1 of an ImageNet epoch, 4003 batches of 32]. The default 1.0 uses the
            whole calibration loader given to `prune()`; the recipes score `--num_score_batches` training batches.
        tolerance: the allocation must land between `target - tolerance` and `target` (fractions of the dense
            cost), never above the target [`--pruning_flops_threshold`: argparse default 1e-3, used the band
            target ± tolerance].
        need_hessian: estimate Ĥ from the data [`--need_hessian`]. False is allowed only with `importance_from`
            holding a saved Ĥ: without Ĥ every candidate scores 0 and the original allocated arbitrarily (defect).
        hessian_embed_factor: κ in the embedding normaliser hidden_size·L·κ of Ĥ [`--hessian_embed`, 6.0].
        importance_from: statistics saved by `importance_to` (.safetensors, or .json) to use instead of scoring
            [`--pruning_pickle_from`, a folder of pickles there]. Ĥ is re-estimated when `need_hessian`.
        importance_to: where to write the statistics after scoring (.safetensors or .json).
        search: "evolution", the original's (μ+λ) evolution strategy, or "grid", the exhaustive search over the
            (heads, embedding) counts: the exact minimiser, deterministic, milliseconds.
        population_size, num_offspring, num_generations: μ, λ and the generations of the evolution strategy
            [module constants 100, 50, 100 there].
        seed: seeds the block sampling of Ĥ (torch) and the evolution strategy (numpy) [`--seed 0`].
        protect_fraction: in every layer the max(⌊protect_fraction·n⌋, 1) best-scored units are never pruned
            [`--pruning_protect`, 0.05; its implementation scrambled unit identities, fixed here].

    `scope` and `round_to` of the base config do not apply (the allocation is SAViT's own search over units);
    anything but their defaults is rejected.
    """

    kinds: tuple[str, ...] = SAVIT_KINDS
    calibration_fraction: float = 1.0
    tolerance: float = 1e-3
    need_hessian: bool = True
    hessian_embed_factor: float = 6.0
    importance_from: str | os.PathLike | None = None
    importance_to: str | os.PathLike | None = None
    search: str = "evolution"
    population_size: int = 100
    num_offspring: int = 50
    num_generations: int = 100
    seed: int = 0
    protect_fraction: float = 0.05
    round_to: int | dict[str, int] = 1  # not used: the method allocates dims itself

    def __post_init__(self) -> None:
        super().__post_init__()
        if not set(self.kinds) <= set(SAVIT_KINDS) or "mlp" not in self.kinds:
            raise ValueError(
                f"kinds must be a subset of {SAVIT_KINDS} containing 'mlp' (solved from the target), "
                f"got {list(self.kinds)}."
            )
        if self.scope != "global":
            raise ValueError(
                f"scope does not apply to savit (it allocates by search); leave it 'global', not {self.scope!r}."
            )
        if self.round_to != 1:
            raise ValueError(f"round_to does not apply to savit; leave it 1, got {self.round_to!r}.")
        _number("calibration_fraction", self.calibration_fraction, 0, 1, high_open=False)
        _number("tolerance", self.tolerance, 0, 1)
        _number("hessian_embed_factor", self.hessian_embed_factor, 0, float("inf"))
        _number("protect_fraction", self.protect_fraction, 0, 1, low_open=False)
        if not isinstance(self.need_hessian, bool):
            raise ValueError(f"need_hessian must be True or False, got {self.need_hessian!r}.")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}.")
        _integer("population_size", self.population_size, 2)
        _integer("num_offspring", self.num_offspring, 1)
        _integer("num_generations", self.num_generations, 1)
        _integer("seed", self.seed, 0)
        if self.importance_from is not None and not Path(self.importance_from).is_file():
            raise ValueError(f"importance_from={str(self.importance_from)!r} is not a file.")
        if self.importance_from is None and not self.need_hessian:
            raise ValueError(
                "need_hessian=False needs importance_from with a saved Hessian: without Ĥ the allocation would be "
                "arbitrary."
            )

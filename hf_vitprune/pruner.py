"""`prune()`: one-shot structured pruning of any supported ViT to a cost target."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .budget import make_budget
from .configuration_pruned_vit import PrunedViTConfig
from .methods import PruningMethod, get_method
from .modeling_pruned_vit import PrunedViTPreTrainedModel
from .structure import PruningPlan

logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    method: str | PruningMethod = "taylor",
    target_macs_ratio: float | None = None,
    dataloader: Iterable | None = None,
    *,
    target_params_ratio: float | None = None,
    target_latency_ratio: float | None = None,
    latency_model: Callable[[PrunedViTConfig], float] | None = None,
    return_plan: bool = False,
    **method_kwargs: Any,
) -> PrunedViTPreTrainedModel | tuple[PrunedViTPreTrainedModel, PruningPlan]:
    """Prune `model` once and return the compact PrunedViT (with `config.pruning` filled in).

    Args:
        model: an HF ViT/DeiT, a timm ViT or a PrunedViT (converted losslessly first; the input is not modified).
        method: a registered method name (`hf_vitprune.methods.METHODS`) or a `PruningMethod` instance.
        target_macs_ratio: fraction of the dense MACs to keep, in (0, 1). Or give `target_params_ratio`, or
            `target_latency_ratio` with a `latency_model(config) -> seconds`.
        dataloader: batches of `pixel_values` and `labels`; required by data-driven methods.
        return_plan: also return the `PruningPlan` (kept unit indices of the source model).
        method_kwargs: the method's options (see its config dataclass), e.g. `kinds=("head", "mlp")`.

    Everything that can be checked is checked before any scoring: method name and options, the target, the
    presence of data, and that the target is reachable with the chosen kinds.
    """
    from .convert import to_pruned_vit
    from .cost import cost_record, count_macs, count_params

    pruning_method = get_method(method, **method_kwargs)
    budget = make_budget(target_macs_ratio, target_params_ratio, target_latency_ratio, latency_model)
    if pruning_method.data_driven and dataloader is None:
        raise ValueError(f"method {pruning_method.name!r} is data-driven: pass a dataloader.")
    source = to_pruned_vit(model)
    pruning_method.check_reachable(source, budget)

    start = time.perf_counter()
    scores = pruning_method.score(source, dataloader)
    plan = pruning_method.select(source, scores, budget)
    pruned = pruning_method.compact(source, plan)
    seconds = time.perf_counter() - start

    previous = source.config.pruning or {}  # a PrunedViT pruned again keeps its original dense reference
    dense_macs = previous.get("dense_macs", count_macs(source))
    dense_params = previous.get("dense_params", count_params(source))
    record = cost_record(pruned, dense_macs=dense_macs, dense_params=dense_params)
    macs, params = record["macs"], record["params"]
    pruned.config.pruning = {
        "method": pruning_method.name,
        "source": previous.get("source", getattr(source.config, "_name_or_path", "") or type(model).__name__),
        "target": {budget.metric: budget.ratio},
        **record,
        "kinds": list(pruning_method.config.kinds),
        "seconds": round(seconds, 3),
    }
    logger.info(
        "%s: MACs %.4g G => %.4g G (%.1f%%), params %.4g M => %.4g M in %.1f s",
        pruning_method.name,
        dense_macs / 1e9,
        macs / 1e9,
        100 * macs / dense_macs,
        dense_params / 1e6,
        params / 1e6,
        seconds,
    )
    return (pruned, plan) if return_plan else pruned

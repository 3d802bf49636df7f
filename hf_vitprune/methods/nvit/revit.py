"""ReViT: NViT's parameter-redistribution rule as a `PrunedViTConfig` (paper §5, Table 6; spec §8).

NViT's pruned models show that heads, Q/K dims and MLP width scale with the embedding width while V stays ~64, that
the budget is better spent on the MLP than on attention, and that blocks are largest in the middle of the network
("less-more-less"). ReViT turns this into a design rule for training from scratch:

- `rule="code"` (default, `revit/revit_scratch.py`, which trained the published ReViT-S/T): with a = round(0.005 E)
  and b = round(0.05 E / 8), heads [10, 2a, 2a, 4a x 6, 2a, 2a, 10], Q/K per head [16b, 8b, 8b, 16b x 6, 8b, 8b,
  16b], V 64, MLP [3E x 3, 6E x 6, 3E x 3]. ReViT-S (E = 384): heads [10, 4, 4, 8 x 6, 4, 4, 10], Q/K [32, 16, 16,
  32 x 6, 16, 16, 32], MLP [1152 x 3, 2304 x 6, 1152 x 3].
- `rule="paper"` (Table 6): ε = 2 in blocks 4-9 (1-indexed) and 1 elsewhere; heads = ε E / 100 rounded to the
  nearest even number, Q/K per head = ε E / 20 rounded to a multiple of 8, V = 64, MLP = 3 ε E.

The rule is stated for 12 blocks. Other depths keep its shape: the middle half (blocks depth // 4 to
depth - depth // 4 - 1, 0-indexed) is doubled and, for the code rule, the first and last blocks are special.
"""

from __future__ import annotations

from typing import Any

from ...configuration_pruned_vit import PrunedViTConfig

REVIT_RULES = ("code", "paper")


def _nearest_multiple(value: float, multiple: int) -> int:
    """`value` rounded to the nearest positive multiple of `multiple` (halves round up)."""
    return max(multiple, multiple * int(value / multiple + 0.5))


def revit_dims(embed_dim: int, depth: int = 12, rule: str = "code") -> dict[str, list[int]]:
    """Per-block heads, Q/K and V dims per head and MLP widths of the ReViT rule for embedding width `embed_dim`."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}.")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 3:
        raise ValueError(f"depth must be an integer >= 3 (first, middle and last blocks), got {depth!r}.")
    if rule not in REVIT_RULES:
        raise ValueError(f"rule must be one of {REVIT_RULES}, got {rule!r}.")
    middle = range(depth // 4, depth - depth // 4)
    epsilon = [2 if i in middle else 1 for i in range(depth)]
    if rule == "paper":
        heads = [_nearest_multiple(e * embed_dim / 100, 2) for e in epsilon]
        qk = [_nearest_multiple(e * embed_dim / 20, 8) for e in epsilon]
    else:
        a = max(round(0.005 * embed_dim), 1)
        b = max(round(0.05 * embed_dim / 8), 1)
        heads = [10 if i in (0, depth - 1) else 2 * e * a for i, e in enumerate(epsilon)]
        qk = [16 * b if i in (0, depth - 1) else 8 * e * b for i, e in enumerate(epsilon)]
    return {
        "num_attention_heads": heads,
        "qk_head_dim": qk,
        "v_head_dim": [64] * depth,
        "intermediate_size": [3 * e * embed_dim for e in epsilon],
    }


def revit_config(
    embed_dim: int,
    depth: int = 12,
    *,
    rule: str = "code",
    attention_scale: float = 64**-0.5,
    **config_kwargs: Any,
) -> PrunedViTConfig:
    """A ReViT `PrunedViTConfig` (DeiT-style: distillation token, LayerNorm eps 1e-6, 224 px, patch 16, unless
    overridden in `config_kwargs`).

    Args:
        embed_dim: the embedding width E (ReViT-S: 384, ReViT-T: 176).
        depth: number of blocks (12 in the paper).
        rule: "code" (the released `revit_scratch.py`, default) or "paper" (Table 6); see the module doc.
        attention_scale: softmax scale of every block. ReViT is built on NViT's per-block-dims model, whose scale
            is fixed at 64^-0.5 whatever the Q/K dim.
        config_kwargs: any other `PrunedViTConfig` argument (e.g. `num_labels`, `image_size`).
    """
    kwargs: dict[str, Any] = {
        "use_distillation_token": True,
        "layer_norm_eps": 1e-6,
        "image_size": 224,
        "patch_size": 16,
        **config_kwargs,
    }
    return PrunedViTConfig(
        hidden_size=embed_dim,
        num_hidden_layers=depth,
        attention_scale=attention_scale,
        **revit_dims(embed_dim, depth, rule),
        **kwargs,
    )

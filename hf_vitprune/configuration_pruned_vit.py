"""Configuration of PrunedViT: a ViT whose blocks may each have their own geometry.

This file is self-contained (it imports only transformers) because it is copied next to the weights by
`save_pretrained`, so that `trust_remote_code=True` loads a pruned model without hf_vitprune installed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from transformers import PretrainedConfig

#: Per-block attributes. They live in transformers 5's native `per_layer_config` (one dict per block that
#: differs from the global value), so any tool that understands heterogeneous configs reads the geometry.
PER_LAYER_ATTRIBUTES = (
    "num_attention_heads",
    "qk_head_dim",
    "v_head_dim",
    "intermediate_size",
    "block_dim",
    "attention_scale",
)
_INT_ATTRIBUTES = PER_LAYER_ATTRIBUTES[:-1]
POOLING_CHOICES = ("cls", "avg")


class PrunedViTConfig(PretrainedConfig):
    r"""Configuration of a (possibly structurally pruned) Vision Transformer.

    A dense ViT is the special case where every per-block value is the same. Per block `i`:

    - `num_attention_heads[i]`: heads of block i.
    - `qk_head_dim[i]`, `v_head_dim[i]`: per-head query/key and value widths (shared by all heads of a block).
    - `intermediate_size[i]`: MLP hidden width.
    - `block_dim[i]`: residual channels that block i reads and writes (`<= hidden_size`; the chosen channel
      indices are a saved buffer of the block).
    - `attention_scale[i]`: softmax scale, kept from the source model (e.g. `64 ** -0.5`), so that pruning Q/K
      dims leaves the function of the remaining dims unchanged.

    Each of them accepts a scalar (broadcast to every block) or a list of length `num_hidden_layers`. They are
    stored in transformers 5's `per_layer_config` (sparse overrides of a global value, the most common one)
    rather than in ad-hoc lists: that is the native home made for pruned and NAS architectures, and it serialises
    to a compact `config.json`. Read them as lists through `config.layer_values(name)` or the plural properties
    (`heads_per_layer`, `qk_head_dims`, `v_head_dims`, `intermediate_sizes`, `block_dims`, `attention_scales`);
    reading `config.num_attention_heads` on a heterogeneous config raises, as transformers intends.

    Args:
        hidden_size: residual (embedding) width E, shared by all blocks.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads, qk_head_dim, v_head_dim, intermediate_size, block_dim, attention_scale: per block,
            see above. `qk_head_dim`/`v_head_dim` default to `hidden_size // num_attention_heads`,
            `block_dim` to `hidden_size`, `attention_scale` to `qk_head_dim ** -0.5`.
        image_size, patch_size, num_channels: input geometry.
        qkv_bias: whether Q/K/V projections have a bias.
        hidden_act: MLP activation (`"gelu"` is exact GELU, as timm and HF ViT).
        layer_norm_eps: LayerNorm epsilon (1e-12 for HF ViT, 1e-6 for timm/DeiT).
        use_distillation_token: DeiT-style distillation token after the CLS token.
        pooling: `"cls"` (final LayerNorm, then the CLS token) or `"avg"` (mean of patch tokens, then the final
            LayerNorm, as timm's `global_pool="avg"`).
        pooler_output_size, pooler_act: the optional pooler of HF `ViTModel` (dense + activation on the pooled
            token); `PrunedViTModel` has one when `pooler_output_size` is set.
        pruning: free-form record of how the model was obtained (method, source, target, achieved cost).
    """

    model_type = "pruned_vit"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int | list[int] = 12,
        qk_head_dim: int | list[int] | None = None,
        v_head_dim: int | list[int] | None = None,
        intermediate_size: int | list[int] = 3072,
        block_dim: int | list[int] | None = None,
        attention_scale: float | list[float] | None = None,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        use_distillation_token: bool = False,
        pooling: str = "cls",
        pooler_output_size: int | None = None,
        pooler_act: str = "tanh",
        pruning: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        per_layer_config = kwargs.pop("per_layer_config", None)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_hidden_layers = _positive_int("num_hidden_layers", num_hidden_layers)
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = _positive_int("image_size", image_size)
        self.patch_size = _positive_int("patch_size", patch_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
        self.num_channels = _positive_int("num_channels", num_channels)
        self.qkv_bias = qkv_bias
        self.use_distillation_token = use_distillation_token
        if pooling not in POOLING_CHOICES:
            raise ValueError(f"pooling must be one of {POOLING_CHOICES}, got {pooling!r}.")
        self.pooling = pooling
        self.pooler_output_size = pooler_output_size
        self.pooler_act = pooler_act
        self.pruning = pruning

        values = self._resolve_layer_values(
            per_layer_config,
            num_attention_heads=num_attention_heads,
            qk_head_dim=qk_head_dim,
            v_head_dim=v_head_dim,
            intermediate_size=intermediate_size,
            block_dim=block_dim,
            attention_scale=attention_scale,
        )
        overrides: dict[int, dict[str, Any]] = {}
        for name, per_block in values.items():
            common = Counter(per_block).most_common(1)[0][0]
            setattr(self, name, common)
            for i, value in enumerate(per_block):
                if value != common:
                    overrides.setdefault(i, {})[name] = value
        kwargs["per_layer_config"] = overrides or None
        super().__init__(**kwargs)

    def _resolve_layer_values(self, per_layer_config: dict | None, **given: Any) -> dict[str, list]:
        """Broadcast scalars, apply `per_layer_config` overrides (from config.json), fill defaults, validate."""
        n = self.num_hidden_layers
        values: dict[str, list] = {}
        for name in ("num_attention_heads", "intermediate_size", "qk_head_dim", "v_head_dim", "block_dim"):
            value = given[name]
            if value is None:
                value = self.hidden_size if name == "block_dim" else None
            if value is None:  # head dims default to hidden_size // heads, block by block
                value = [self.hidden_size // h for h in values["num_attention_heads"]]
            values[name] = _broadcast(name, value, n)
        scale = given["attention_scale"]
        values["attention_scale"] = _broadcast(
            "attention_scale", [d**-0.5 for d in values["qk_head_dim"]] if scale is None else scale, n
        )
        for key, layer in (per_layer_config or {}).items():
            i = int(key)
            if not 0 <= i < n:
                raise ValueError(f"per_layer_config has block {key}, but num_hidden_layers is {n}.")
            for name, value in layer.items():
                if name not in PER_LAYER_ATTRIBUTES:
                    raise ValueError(f"per_layer_config[{key}] has {name!r}; allowed keys: {PER_LAYER_ATTRIBUTES}.")
                values[name][i] = value
        for name in _INT_ATTRIBUTES:
            values[name] = [_positive_int(f"{name}[{i}]", v) for i, v in enumerate(values[name])]
        for i, dim in enumerate(values["block_dim"]):
            if dim > self.hidden_size:
                raise ValueError(f"block_dim[{i}] = {dim} exceeds hidden_size = {self.hidden_size}.")
        for i, scale in enumerate(values["attention_scale"]):
            if not isinstance(scale, (int, float)) or scale <= 0:
                raise ValueError(f"attention_scale[{i}] must be a positive number, got {scale!r}.")
        return values

    def layer_values(self, name: str) -> list:
        """The per-block list of a per-layer attribute, e.g. `config.layer_values("intermediate_size")`."""
        if name not in PER_LAYER_ATTRIBUTES:
            raise ValueError(f"name must be one of {PER_LAYER_ATTRIBUTES}, got {name!r}.")
        if not self.is_heterogeneous:
            return [getattr(self, name)] * self.num_hidden_layers
        return [getattr(layer, name) for layer in self.per_layer_config]

    @property
    def heads_per_layer(self) -> list[int]:
        return self.layer_values("num_attention_heads")

    @property
    def qk_head_dims(self) -> list[int]:
        return self.layer_values("qk_head_dim")

    @property
    def v_head_dims(self) -> list[int]:
        return self.layer_values("v_head_dim")

    @property
    def intermediate_sizes(self) -> list[int]:
        return self.layer_values("intermediate_size")

    @property
    def block_dims(self) -> list[int]:
        return self.layer_values("block_dim")

    @property
    def attention_scales(self) -> list[float]:
        return self.layer_values("attention_scale")

    @property
    def num_prefix_tokens(self) -> int:
        """CLS (+ distillation) tokens before the patch tokens."""
        return 2 if self.use_distillation_token else 1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _broadcast(name: str, value: Any, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values, but num_hidden_layers is {n}.")
        return list(value)
    return [value] * n


__all__ = ["PrunedViTConfig"]

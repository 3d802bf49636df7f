"""Helpers shared by the converters: a source block described in PrunedViT's terms, its state-dict entries,
and the construction of the PrunedViT that receives them.

Converters only read the source; every tensor they hand over is cloned, so the source stays untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configuration_pruned_vit import PrunedViTConfig
from ..modeling_pruned_vit import PrunedViTPreTrainedModel

#: A linear map as (weight [out, in], bias [out] or None).
Affine = tuple[torch.Tensor, torch.Tensor | None]


def linear_params(linear: nn.Linear) -> Affine:
    return linear.weight, linear.bias


@dataclass
class BlockWeights:
    """One pre-norm transformer block (x + attn(norm1(x)), then x + mlp(norm2(x))) in PrunedViT's terms.

    `q`, `k`, `v` rows are head-major (head h owns rows h*d:(h+1)*d); `attention_scale` is the factor the source
    applies to q·k, kept as is so the converted block computes the same function.
    """

    norm1: nn.LayerNorm
    q: Affine
    k: Affine
    v: Affine
    o: Affine
    norm2: nn.LayerNorm
    fc1: Affine
    fc2: Affine
    num_heads: int
    attention_scale: float

    def geometry(self) -> dict[str, Any]:
        """Per-block `PrunedViTConfig` values, read from the tensor shapes."""
        q_rows, v_rows = self.q[0].shape[0], self.v[0].shape[0]
        if q_rows % self.num_heads or v_rows % self.num_heads or self.k[0].shape[0] != q_rows:
            raise ValueError(
                f"q/k/v have {q_rows}/{self.k[0].shape[0]}/{v_rows} rows, which do not split into "
                f"{self.num_heads} heads."
            )
        return {
            "num_attention_heads": self.num_heads,
            "qk_head_dim": q_rows // self.num_heads,
            "v_head_dim": v_rows // self.num_heads,
            "intermediate_size": self.fc1[0].shape[0],
            "attention_scale": float(self.attention_scale),
        }


def blocks_config_kwargs(blocks: list[BlockWeights]) -> dict[str, Any]:
    """`PrunedViTConfig` kwargs describing `blocks`: per-block lists, depth and whether Q/K/V have a bias."""
    geometries = [block.geometry() for block in blocks]
    kwargs: dict[str, Any] = {name: [g[name] for g in geometries] for name in geometries[0]}
    kwargs["num_hidden_layers"] = len(blocks)
    kwargs["qkv_bias"] = any(part[1] is not None for block in blocks for part in (block.q, block.k, block.v))
    return kwargs


def common_layer_norm_eps(norms: list[nn.Module]) -> float:
    """The epsilon shared by all LayerNorms of the source; PrunedViT has a single `layer_norm_eps`."""
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm):
            raise TypeError(f"only LayerNorm normalisation is supported, found {type(norm).__name__}.")
        if tuple(norm.normalized_shape) != tuple(norms[0].normalized_shape):
            raise ValueError(f"LayerNorm shapes differ: {norm.normalized_shape} vs {norms[0].normalized_shape}.")
    eps = {norm.eps for norm in norms}
    if len(eps) != 1:
        raise ValueError(f"the source's LayerNorms use different epsilons {sorted(eps)}; PrunedViT has one.")
    return eps.pop()


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def put_linear(state: dict[str, torch.Tensor], name: str, params: Affine, with_bias: bool = True) -> None:
    """Add `name.weight` (and `name.bias`, zeros when the source has none) to `state`."""
    weight, bias = params
    state[f"{name}.weight"] = _clone(weight)
    if with_bias:
        state[f"{name}.bias"] = _clone(bias) if bias is not None else weight.new_zeros(weight.shape[0])


def put_norm(state: dict[str, torch.Tensor], name: str, norm: nn.LayerNorm) -> None:
    """Add a LayerNorm's affine parameters (ones/zeros when the source has none)."""
    reference = norm.weight if norm.weight is not None else norm.bias
    like = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    weight = norm.weight if norm.weight is not None else torch.ones(norm.normalized_shape, **like)
    bias = norm.bias if norm.bias is not None else torch.zeros(norm.normalized_shape, **like)
    state[f"{name}.weight"] = _clone(weight)
    state[f"{name}.bias"] = _clone(bias)


def encoder_state(
    *,
    cls_token: torch.Tensor,
    distillation_token: torch.Tensor | None,
    position_embeddings: torch.Tensor,
    patch_projection: nn.Conv2d,
    blocks: list[BlockWeights],
    final_norm: nn.LayerNorm,
    qkv_bias: bool,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """State dict of a `PrunedViTModel` (keys under `prefix`, e.g. `"vit."`), without the pooler."""
    state = {
        f"{prefix}embeddings.cls_token": _clone(cls_token),
        f"{prefix}embeddings.position_embeddings": _clone(position_embeddings),
    }
    if distillation_token is not None:
        state[f"{prefix}embeddings.distillation_token"] = _clone(distillation_token)
    projection = (patch_projection.weight, patch_projection.bias)
    put_linear(state, f"{prefix}embeddings.patch_embeddings.projection", projection)
    for i, block in enumerate(blocks):
        layer = f"{prefix}layers.{i}"
        put_norm(state, f"{layer}.layernorm_before", block.norm1)
        for name, params in (("q_proj", block.q), ("k_proj", block.k), ("v_proj", block.v)):
            put_linear(state, f"{layer}.attention.{name}", params, with_bias=qkv_bias)
        put_linear(state, f"{layer}.attention.o_proj", block.o)
        put_norm(state, f"{layer}.layernorm_after", block.norm2)
        put_linear(state, f"{layer}.mlp.fc1", block.fc1)
        put_linear(state, f"{layer}.mlp.fc2", block.fc2)
    put_norm(state, f"{prefix}layernorm", final_norm)
    return state


def head_num_labels(head: nn.Module) -> int:
    """Number of classes of a classification head (0 for `nn.Identity`, i.e. a feature extractor)."""
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Identity):
        return 0
    raise TypeError(f"the classification head must be nn.Linear or nn.Identity, found {type(head).__name__}.")


def put_heads(state: dict[str, torch.Tensor], heads: dict[str, nn.Module]) -> None:
    """Add classification heads (`{"classifier": linear}`); an `nn.Identity` head has no weights."""
    for name, head in heads.items():
        if isinstance(head, nn.Linear):
            put_linear(state, name, linear_params(head))


def label_kwargs(id2label: dict[int, str], label2id: dict[str, int] | None = None) -> dict[str, Any]:
    """`id2label`/`label2id` config kwargs; `label2id` is derived from `id2label` when missing and names are unique."""
    if label2id is None and len(set(id2label.values())) == len(id2label):
        label2id = {name: i for i, name in id2label.items()}
    return {"id2label": dict(id2label), "label2id": label2id}


def square_size(name: str, value: Any) -> int:
    """An image or patch size as one int; PrunedViT handles square images and patches only."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{name} must be square for PrunedViT, got {tuple(value)}.")
        value = value[0]
    return int(value)


def build_pruned_model(
    model_class: type[PrunedViTPreTrainedModel],
    config: PrunedViTConfig,
    state: dict[str, torch.Tensor],
    source: nn.Module,
    image_processor: Any,
) -> PrunedViTPreTrainedModel:
    """Instantiate `model_class` without random initialisation and load `state` strictly (every parameter must
    come from the source). The result lives on the source's device and dtype, in the source's train/eval mode."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    reference = next(source.parameters(), None)
    if reference is not None:  # parameters made up here (e.g. absent LayerNorm affines) follow the source
        model.to(device=reference.device)
    model.train(source.training)
    model.image_processor = image_processor
    return model


def source_record(source_id: str, source: nn.Module) -> dict[str, str]:
    """The minimal `config.pruning` of a converted (not yet pruned) model: where it came from."""
    cls = type(source)
    return {"source": source_id or cls.__name__, "source_class": f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"}


def check_image_processor(image_processor: Any) -> None:
    """An image processor must at least save itself: `PrunedViTPreTrainedModel.save_pretrained` calls it."""
    if image_processor is not None and not callable(getattr(image_processor, "save_pretrained", None)):
        raise TypeError(
            f"image_processor must be an image processor with save_pretrained (e.g. ViTImageProcessor), "
            f"got {type(image_processor).__name__}."
        )

"""PrunedViT: a Vision Transformer whose blocks each have their own heads, Q/K and V head dims, MLP width and
residual channels, with optional gates on every prunable unit.

Module and weight names follow transformers 5's ViT (`vit.layers.i.attention.q_proj`, `mlp.fc1`, ...), and the
checkpoint conversion mapping of ViT is registered for `pruned_vit`, so a PrunedViT saves in exactly HF ViT's
on-disk layout (a dense one loads into `ViTForImageClassification`) and reads HF ViT checkpoints.

Gates are per-unit multipliers, absent (None) by default. They are non-persistent buffers: never saved, never
seen by the optimizer. All-ones gates give the plain forward; a zero gate gives exactly the model without that
unit, including LayerNorm statistics, which are taken over active embedding channels only. Gradients of the loss
with respect to gates at 1 are the raw material of the importance scores.

Block-sparse (LPViT) weights: `config.block_sparsity = {"block_size": [b0, b1], "target_modules": [...]}` gives
every matching nn.Linear/nn.Conv2d a persistent block-mask buffer at construction (`add_block_mask`), so
`from_pretrained` restores saved masks and a reloaded model stays sparse.

NViT checkpoints (`hf_vitprune.convert.from_nvit_checkpoint`): `config.qkv_token_scale = True` gives every attention
a learned per-token multiplier `token_scale` [tokens, 1] of q, k and v after their biases (NViT's `token_mask`);
such a model takes exactly `num_prefix_tokens + num_patches` tokens.

This file imports only torch and transformers: it is copied next to the weights for `trust_remote_code=True`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_pruned_vit import PrunedViTConfig


def gated_layer_norm(hidden_states: torch.Tensor, norm: nn.LayerNorm, gate: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm whose statistics are taken over active channels only (weights `gate`), output re-gated.

    With `gate` all ones this is `norm(hidden_states)`; with a 0/1 gate it equals the LayerNorm of the compact
    model that lacks the gated-off channels, which is what makes compaction exact.
    """
    if gate is None:
        return norm(hidden_states)
    gate = gate.to(hidden_states.dtype)
    total = gate.sum()
    mean = (hidden_states * gate).sum(-1, keepdim=True) / total
    centred = hidden_states - mean
    var = (centred.square() * gate).sum(-1, keepdim=True) / total
    normed = centred * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        normed = normed * norm.weight + norm.bias
    return normed * gate


#: Persistent buffer of a block-sparse layer: uint8 [ceil(rows / b0), ceil(cols / b1)], 1 = block kept.
BLOCK_MASK_BUFFER = "weight_block_mask"


def expand_block_mask(mask: torch.Tensor, block_size: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Element mask of a 2-D `shape` from its block mask: blocks tile the matrix from the top-left corner, partial
    edge blocks are cropped (LPViT's tiling)."""
    rows, cols = shape
    return mask.repeat_interleave(block_size[0], 0)[:rows].repeat_interleave(block_size[1], 1)[:, :cols]


def block_masked_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight` times its upsampled block mask; a conv weight is masked on its (out, in*kh*kw) view."""
    weight, (b0, b1) = module.weight, module.block_size
    rows, cols = weight.shape[0], weight[0].numel()
    mask = getattr(module, BLOCK_MASK_BUFFER).to(weight.dtype)
    if rows % b0 or cols % b1:  # partial edge blocks
        return (weight.reshape(rows, cols) * expand_block_mask(mask, (b0, b1), (rows, cols))).view_as(weight)
    return (weight.reshape(rows // b0, b0, cols // b1, b1) * mask[:, None, :, None]).view_as(weight)


class BlockMaskedLinear(nn.Linear):
    """nn.Linear computing with `weight * mask` (masked weights get no gradient); made by `add_block_mask`."""

    block_size: tuple[int, int]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, block_masked_weight(self), self.bias)


class BlockMaskedConv2d(nn.Conv2d):
    """nn.Conv2d computing with `weight * mask`; made by `add_block_mask`."""

    block_size: tuple[int, int]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, block_masked_weight(self), self.bias)


_BLOCK_MASKED_CLASSES = {nn.Linear: BlockMaskedLinear, nn.Conv2d: BlockMaskedConv2d}


def add_block_mask(module: nn.Module, block_size: tuple[int, int], mask: torch.Tensor | None = None) -> None:
    """Make an nn.Linear or nn.Conv2d block-sparse in place: a persistent uint8 buffer `weight_block_mask` (all
    ones unless `mask` is given), upsampled to `block_size` tiles, multiplies the weight in every forward.

    The class is swapped to its masked subclass (as torch.nn.utils.parametrize does), so the parameters, their
    names and the optimizer's references are unchanged and the state dict only gains the buffer.
    """
    if type(module) not in _BLOCK_MASKED_CLASSES:
        raise TypeError(f"block masks apply to nn.Linear and nn.Conv2d, got {type(module).__name__}.")
    if len(block_size) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block_size):
        raise ValueError(f"block_size must be two positive integers (rows, cols), got {block_size!r}.")
    rows, cols = module.weight.shape[0], module.weight[0].numel()
    shape = (-(-rows // block_size[0]), -(-cols // block_size[1]))
    if mask is None:
        mask = torch.ones(shape, dtype=torch.uint8, device=module.weight.device)
    elif tuple(mask.shape) != shape:
        raise ValueError(f"a {rows}x{cols} weight in {block_size} blocks needs a {shape} mask, got {list(mask.shape)}.")
    module.register_buffer(BLOCK_MASK_BUFFER, mask.to(device=module.weight.device, dtype=torch.uint8), persistent=True)
    module.block_size = tuple(block_size)
    module.__class__ = _BLOCK_MASKED_CLASSES[type(module)]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; returns (batch, tokens, heads, v_dim) and the attention probabilities."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class PrunedViTPatchEmbeddings(nn.Module):
    def __init__(self, config: PrunedViTConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the model expects {self.num_channels}."
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class PrunedViTEmbeddings(nn.Module):
    """CLS token, optional distillation token, patch embeddings and learned position embeddings."""

    def __init__(self, config: PrunedViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        )
        self.patch_embeddings = PrunedViTPatchEmbeddings(config)
        self.num_prefix_tokens = config.num_prefix_tokens
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, config.num_patches + self.num_prefix_tokens, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = config.patch_size
        self.image_size = config.image_size

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Bicubic resize of the patch position embeddings to a `height` x `width` input (as HF ViT)."""
        prefix = self.position_embeddings[:, : self.num_prefix_tokens]
        patch = self.position_embeddings[:, self.num_prefix_tokens :]
        side = int(math.sqrt(patch.shape[1]))
        dim = patch.shape[-1]
        patch = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(
            patch, size=(height // self.patch_size, width // self.patch_size), mode="bicubic", align_corners=False
        )
        return torch.cat((prefix, patch.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)
        tokens = [self.cls_token.expand(batch_size, -1, -1)]
        if self.distillation_token is not None:
            tokens.append(self.distillation_token.expand(batch_size, -1, -1))
        embeddings = torch.cat((*tokens, embeddings), dim=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(height, width)
        else:
            if height != self.image_size or width != self.image_size:
                raise ValueError(
                    f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size});"
                    " pass interpolate_pos_encoding=True to resize the position embeddings."
                )
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


class PrunedViTAttention(nn.Module):
    """Multi-head self-attention with per-block head count and separate Q/K and V head widths."""

    def __init__(self, config: PrunedViTConfig, layer_idx: int):
        super().__init__()
        self.config = config  # the global config: `_attn_implementation` changes must reach every layer
        self.layer_idx = layer_idx
        self.num_heads = config.heads_per_layer[layer_idx]
        self.qk_head_dim = config.qk_head_dims[layer_idx]
        self.v_head_dim = config.v_head_dims[layer_idx]
        self.scaling = config.attention_scales[layer_idx]
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        dim = config.block_dims[layer_idx]
        self.q_proj = nn.Linear(dim, self.num_heads * self.qk_head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, self.num_heads * self.qk_head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, self.num_heads * self.v_head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, dim)
        self.register_buffer("head_gate", None, persistent=False)
        self.register_buffer("qk_gate", None, persistent=False)
        self.register_buffer("v_gate", None, persistent=False)
        # NViT's learned per-token multiplier of q, k and v (its `token_mask`), only when the config asks for it
        tokens = config.num_prefix_tokens + config.num_patches
        self.token_scale = nn.Parameter(torch.ones(tokens, 1)) if getattr(config, "qkv_token_scale", False) else None

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, tokens, _ = hidden_states.shape
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.token_scale is not None:
            if tokens != self.token_scale.shape[0]:
                raise ValueError(f"qkv_token_scale models take {self.token_scale.shape[0]} tokens, got {tokens}.")
            query, key, value = query * self.token_scale, key * self.token_scale, value * self.token_scale
        query = query.view(batch_size, tokens, self.num_heads, self.qk_head_dim).transpose(1, 2)
        key = key.view(batch_size, tokens, self.num_heads, self.qk_head_dim).transpose(1, 2)
        value = value.view(batch_size, tokens, self.num_heads, self.v_head_dim).transpose(1, 2)
        if self.qk_gate is not None:
            query = query * self.qk_gate
        if self.v_gate is not None:
            value = value * self.v_gate
        implementation = self.config._attn_implementation
        # torch's CPU SDPA takes a math path 2x slower than eager when the q/k and v head dims differ
        if implementation == "sdpa" and query.device.type == "cpu" and self.qk_head_dim != self.v_head_dim:
            implementation = "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        if self.head_gate is not None:
            output = output * self.head_gate.view(1, 1, -1, 1)
        output = self.o_proj(output.reshape(batch_size, tokens, self.num_heads * self.v_head_dim))
        return output, weights


class PrunedViTMLP(nn.Module):
    def __init__(self, config: PrunedViTConfig, layer_idx: int):
        super().__init__()
        dim, hidden = config.block_dims[layer_idx], config.intermediate_sizes[layer_idx]
        self.fc1 = nn.Linear(dim, hidden)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, dim)
        self.register_buffer("neuron_gate", None, persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        if self.neuron_gate is not None:
            hidden_states = hidden_states * self.neuron_gate
        return self.fc2(hidden_states)


class PrunedViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block. When `block_dim < hidden_size` it reads and writes only the residual channels
    listed in its `channel_index` buffer (LayerNorm still normalises the whole stream)."""

    def __init__(self, config: PrunedViTConfig, layer_idx: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = PrunedViTAttention(config, layer_idx)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PrunedViTMLP(config, layer_idx)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        block_dim = config.block_dims[layer_idx]
        index = torch.arange(block_dim) if block_dim < config.hidden_size else None
        self.register_buffer("channel_index", index, persistent=True)
        self.register_buffer("channel_gate", None, persistent=False)

    def _read(self, normed: torch.Tensor) -> torch.Tensor:
        if self.channel_index is not None:
            normed = normed.index_select(-1, self.channel_index)
        return normed if self.channel_gate is None else normed * self.channel_gate

    def _write(self, residual: torch.Tensor, update: torch.Tensor, embed_gate: torch.Tensor | None) -> torch.Tensor:
        if self.channel_gate is not None:
            update = update * self.channel_gate
        update = self.dropout(update)
        if self.channel_index is not None:
            hidden_states = residual.index_add(-1, self.channel_index, update)
        else:
            hidden_states = residual + update
        return hidden_states if embed_gate is None else hidden_states * embed_gate

    def forward(
        self, hidden_states: torch.Tensor, embed_gate: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_input = self._read(gated_layer_norm(hidden_states, self.layernorm_before, embed_gate))
        attn_output, weights = self.attention(attn_input, **kwargs)
        hidden_states = self._write(hidden_states, attn_output, embed_gate)
        mlp_output = self.mlp(self._read(gated_layer_norm(hidden_states, self.layernorm_after, embed_gate)))
        return self._write(hidden_states, mlp_output, embed_gate), weights


class PrunedViTPreTrainedModel(PreTrainedModel):
    config_class = PrunedViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["PrunedViTEmbeddings", "PrunedViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def post_init(self) -> None:
        """Give the modules named by `config.block_sparsity` their (all-ones) block masks before transformers'
        post-init, so `from_pretrained` loads saved masks into them. Module names match by suffix, as peft's
        `target_modules` (e.g. "fc1" matches "vit.layers.0.mlp.fc1")."""
        sparsity = getattr(self.config, "block_sparsity", None)
        if sparsity:
            targets = sparsity["target_modules"]
            for name, module in self.named_modules():
                if type(module) in _BLOCK_MASKED_CLASSES and any(name == t or name.endswith("." + t) for t in targets):
                    add_block_mask(module, tuple(sparsity["block_size"]))
        super().post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, BLOCK_MASK_BUFFER, None) is not None:
            init.ones_(getattr(module, BLOCK_MASK_BUFFER))
        if isinstance(module, PrunedViTAttention) and module.token_scale is not None:
            init.ones_(module.token_scale)
        if isinstance(module, PrunedViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
            if module.distillation_token is not None:
                init.trunc_normal_(module.distillation_token, mean=0.0, std=self.config.initializer_range)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained` with a complete `auto_map` (transformers writes only the saved class),
        plus the image processor attached by the converters, if any."""
        self.config.auto_map = {
            "AutoConfig": "configuration_pruned_vit.PrunedViTConfig",
            "AutoModel": "modeling_pruned_vit.PrunedViTModel",
            "AutoModelForImageClassification": "modeling_pruned_vit.PrunedViTForImageClassification",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        processor = getattr(self, "image_processor", None)
        if processor is not None and kwargs.get("is_main_process", True):
            processor.save_pretrained(save_directory)


class PrunedViTModel(PrunedViTPreTrainedModel):
    """The bare PrunedViT encoder. `pooler_output` is the classifier's input: the pooler's output when the model
    has one (HF `ViTModel`), else the pooled, normalised features (CLS token or mean of patch tokens).

    `add_pooling_layer` defaults to `config.pooler_output_size is not None`, so `AutoModel` on a classification
    checkpoint gives its features rather than a freshly initialised pooler."""

    def __init__(self, config: PrunedViTConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = config.pooler_output_size is not None
        self.embeddings = PrunedViTEmbeddings(config)
        self.layers = nn.ModuleList([PrunedViTLayer(config, i) for i in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = PrunedViTPooler(config) if add_pooling_layer else None
        self.register_buffer("embed_gate", None, persistent=False)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings(pixel_values.to(dtype), interpolate_pos_encoding=bool(interpolate_pos_encoding))
        gate = self.embed_gate
        if gate is not None:
            hidden_states = hidden_states * gate
        all_hidden, all_attentions = [hidden_states], []
        attention_kwargs = {"output_attentions": True} if output_attentions else {}
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, gate, **attention_kwargs)
            all_hidden.append(hidden_states)
            all_attentions.append(weights)
        if self.config.pooling == "avg":
            sequence_output = hidden_states
            pooled = gated_layer_norm(
                hidden_states[:, self.embeddings.num_prefix_tokens :].mean(1), self.layernorm, gate
            )
        else:
            sequence_output = gated_layer_norm(hidden_states, self.layernorm, gate)
            pooled = sequence_output[:, 0]
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return outputs if return_dict else outputs.to_tuple()


class PrunedViTPooler(nn.Module):
    """HF ViT's pooler: dense + activation on the pooled token."""

    def __init__(self, config: PrunedViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size or config.hidden_size)
        self.activation = ACT2FN[config.pooler_act]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(pooled))


def classification_loss(
    labels: torch.Tensor, logits: torch.Tensor, config: PrunedViTConfig, num_items_in_batch: int | None = None
) -> torch.Tensor:
    """transformers' image-classification loss: regression, single- or multi-label by `config.problem_type`.

    Cross-entropy is summed and divided by `num_items_in_batch` when the Trainer passes it, so gradient
    accumulation scales it the way transformers does.
    """
    labels = labels.to(logits.device)
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    logits = logits.view(-1, config.num_labels).float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels.view(-1), ignore_index=-100)
    loss = F.cross_entropy(logits, labels.view(-1), ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class PrunedViTForImageClassification(PrunedViTPreTrainedModel):
    """PrunedViT with a linear classifier on the pooled features (CLS token or average pooling)."""

    def __init__(self, config: PrunedViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = PrunedViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None if labels is None else classification_loss(labels, logits, self.config, num_items_in_batch)
        result = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict else result.to_tuple()


@dataclass
class PrunedViTForImageClassificationWithTeacherOutput(ModelOutput):
    """`logits` is the mean of the CLS-head and distillation-head logits, as DeiT predicts."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cls_logits: torch.Tensor | None = None
    distillation_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class PrunedViTForImageClassificationWithTeacher(PrunedViTPreTrainedModel):
    """DeiT-distilled PrunedViT: a classifier on the CLS token and one on the distillation token.

    With `labels` the loss is the cross-entropy of the averaged logits, as NViT's base loss; distillation against
    a teacher is added by `hf_vitprune.distill` on `cls_logits` and `distillation_logits`.
    """

    def __init__(self, config: PrunedViTConfig):
        super().__init__(config)
        if not config.use_distillation_token:
            raise ValueError("PrunedViTForImageClassificationWithTeacher needs use_distillation_token=True.")
        self.num_labels = config.num_labels
        self.vit = PrunedViTModel(config, add_pooling_layer=False)
        make_head = (lambda: nn.Linear(config.hidden_size, config.num_labels)) if config.num_labels > 0 else nn.Identity
        self.cls_classifier = make_head()
        self.distillation_classifier = make_head()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | None = None,
        **kwargs,
    ) -> PrunedViTForImageClassificationWithTeacherOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        cls_logits = self.cls_classifier(outputs.last_hidden_state[:, 0])
        distillation_logits = self.distillation_classifier(outputs.last_hidden_state[:, 1])
        logits = (cls_logits + distillation_logits) / 2
        loss = None if labels is None else classification_loss(labels, logits, self.config, num_items_in_batch)
        result = PrunedViTForImageClassificationWithTeacherOutput(
            loss=loss,
            logits=logits,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


try:  # save in HF ViT's on-disk (4.x) key layout and read it back, with or without hf_vitprune installed
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    register_checkpoint_conversion_mapping(
        PrunedViTConfig.model_type, get_checkpoint_conversion_mapping("ViTModel"), overwrite=True
    )
except ImportError:
    pass


__all__ = [
    "PrunedViTForImageClassification",
    "PrunedViTForImageClassificationWithTeacher",
    "PrunedViTModel",
    "PrunedViTPreTrainedModel",
]

"""Converters: transformers/timm ViTs -> PrunedViT compute the same outputs, save and reload, and reject what
PrunedViT cannot reproduce."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, PILImageResampling

import hf_vitprune  # noqa: F401  (registers the Auto classes)
from hf_vitprune import (
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
    PrunedViTModel,
    to_pruned_vit,
)

HF_KWARGS = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)
TIMM_KWARGS = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere (default inits have unit LayerNorms, zero biases and near-zero tokens, which
    would hide swapped or dropped tensors); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    with torch.no_grad():
        for param in model.parameters():
            noise = 0.2 * torch.randn(param.shape, generator=generator)
            param.copy_(1 + noise if id(param) in norm_weights else noise)
    return model.eval()


def hf(cls, config_cls=ViTConfig, **overrides):
    return randomise_(cls(config_cls(**{**HF_KWARGS, "num_labels": 5, **overrides})))


def timm_vit(name="vit_tiny_patch16_224", **overrides):
    return randomise_(timm.create_model(name, **{**TIMM_KWARGS, **overrides}))


def timm_manual_attention():
    """Unfused attention with a non-default scale: the converter must keep `attn.scale`."""
    model = timm_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.scale = 0.3
    return model


SOURCES = {
    "hf_vit": (lambda: hf(ViTForImageClassification), PrunedViTForImageClassification),
    "hf_deit": (lambda: hf(DeiTForImageClassification, DeiTConfig), PrunedViTForImageClassification),
    "hf_deit_teacher": (
        lambda: hf(DeiTForImageClassificationWithTeacher, DeiTConfig),
        PrunedViTForImageClassificationWithTeacher,
    ),
    "hf_vit_no_qkv_bias": (lambda: hf(ViTForImageClassification, qkv_bias=False), PrunedViTForImageClassification),
    "timm_vit": (timm_vit, PrunedViTForImageClassification),
    "timm_vit_no_qkv_bias": (lambda: timm_vit(qkv_bias=False), PrunedViTForImageClassification),
    "timm_vit_avg": (lambda: timm_vit(global_pool="avg"), PrunedViTForImageClassification),
    "timm_vit_manual_attention": (timm_manual_attention, PrunedViTForImageClassification),
    "timm_deit_distilled": (
        lambda: timm_vit("deit_tiny_distilled_patch16_224"),
        PrunedViTForImageClassificationWithTeacher,
    ),
}


def logits_of(model, pixel_values):
    with torch.no_grad():
        out = model(pixel_values)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", SOURCES)
def test_converted_logits_equal_source_and_survive_reload(name, pixel_values, tmp_path):
    make_source, expected_class = SOURCES[name]
    source = make_source()
    pruned = to_pruned_vit(source)
    assert type(pruned) is expected_class
    assert not pruned.training
    expected = logits_of(source, pixel_values)
    torch.testing.assert_close(logits_of(pruned, pixel_values), expected, atol=1e-5, rtol=1e-5)

    pruned.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    if expected_class is PrunedViTForImageClassificationWithTeacher:  # not an Auto class: load it by name
        reloaded = PrunedViTForImageClassificationWithTeacher.from_pretrained(tmp_path)
    else:
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is expected_class
    torch.testing.assert_close(logits_of(reloaded.eval(), pixel_values), expected, atol=1e-5, rtol=1e-5)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is type(pruned.image_processor)


@pytest.mark.parametrize("name", ["hf_deit_teacher", "timm_deit_distilled"])
def test_distilled_heads_map_to_cls_and_distillation_classifiers(name, pixel_values):
    source = SOURCES[name][0]()
    pruned = to_pruned_vit(source)
    with torch.no_grad():
        out = pruned(pixel_values)
        if name.startswith("timm"):
            features = source.forward_features(pixel_values)
            cls_logits, dist_logits = source.head(features[:, 0]), source.head_dist(features[:, 1])
        else:
            reference = source(pixel_values)
            cls_logits, dist_logits = reference.cls_logits, reference.distillation_logits
    torch.testing.assert_close(out.cls_logits, cls_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.distillation_logits, dist_logits, atol=1e-5, rtol=1e-5)
    assert pruned.config.use_distillation_token


@pytest.mark.parametrize("add_pooling_layer", [True, False])
def test_vit_model_converts_to_pruned_vit_model(add_pooling_layer, pixel_values, tmp_path):
    source = randomise_(ViTModel(ViTConfig(**HF_KWARGS), add_pooling_layer=add_pooling_layer))
    pruned = to_pruned_vit(source)
    assert type(pruned) is PrunedViTModel
    assert (pruned.pooler is not None) == add_pooling_layer
    with torch.no_grad():
        expected, got = source(pixel_values), pruned(pixel_values)
        pruned.save_pretrained(tmp_path)
        reloaded = AutoModel.from_pretrained(tmp_path).eval()(pixel_values)
    for output in (got, reloaded):
        torch.testing.assert_close(output.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
        if add_pooling_layer:
            torch.testing.assert_close(output.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


def test_dense_converted_hf_vit_loads_back_into_transformers_vit(pixel_values, tmp_path):
    source = hf(ViTForImageClassification)
    to_pruned_vit(source).save_pretrained(tmp_path)
    vit = ViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(vit, pixel_values), logits_of(source, pixel_values), atol=1e-5, rtol=1e-5)


def test_config_carries_source_settings():
    id2label = {i: name for i, name in enumerate(["cat", "dog", "eel", "fox", "gnu"])}
    pruned = to_pruned_vit(hf(ViTForImageClassification, id2label=id2label, layer_norm_eps=1e-9))
    config = pruned.config
    assert config.id2label == id2label and config.label2id == {v: k for k, v in id2label.items()}
    assert config.layer_norm_eps == 1e-9
    assert config.attention_scales == [8**-0.5] * 2 and config.heads_per_layer == [4, 4]
    assert config.pruning == {
        "source": "ViTForImageClassification",
        "source_class": "transformers.ViTForImageClassification",
    }

    timm_config = to_pruned_vit(timm_vit(global_pool="avg")).config
    assert timm_config.layer_norm_eps == 1e-6 and timm_config.pooling == "avg"
    assert timm_config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert timm_config.pruning["source_class"] == "timm.VisionTransformer"
    assert timm_config.pruning["source"].startswith("timm/vit_tiny_patch16_224")


def test_timm_imagenet_head_gets_imagenet_label_names():
    config = to_pruned_vit(timm_vit(num_classes=1000)).config
    assert config.num_labels == 1000 and config.id2label[0] == "tench, Tinca tinca"


def test_pruned_sources_convert_with_per_block_geometry(pixel_values):
    """Physically pruned sources: block 0 keeps heads (1, 3) and 48 MLP neurons; geometry comes from shapes."""
    heads, neurons, head_dim = torch.tensor([1, 3]), torch.arange(48), 8
    rows = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()

    def sliced(linear, out_index=None, in_index=None):
        weight = linear.weight
        weight = weight[out_index] if out_index is not None else weight
        weight = weight[:, in_index] if in_index is not None else weight
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
        new.weight.data.copy_(weight)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias[out_index] if out_index is not None else linear.bias)
        return new

    hf_source = hf(ViTForImageClassification)
    layer = hf_source.vit.layers[0]
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(layer.attention, name, sliced(getattr(layer.attention, name), out_index=rows))
    layer.attention.o_proj = sliced(layer.attention.o_proj, in_index=rows)

    timm_source = timm_vit()
    attn = timm_source.blocks[0].attn
    attn.qkv = sliced(attn.qkv, out_index=torch.cat([rows + part * 32 for part in range(3)]))
    attn.proj = sliced(attn.proj, in_index=rows)
    attn.num_heads, attn.attn_dim = 2, 16

    for source, mlp in ((hf_source, layer.mlp), (timm_source, timm_source.blocks[0].mlp)):
        source_intermediate = mlp.fc1.out_features
        mlp.fc1, mlp.fc2 = sliced(mlp.fc1, out_index=neurons), sliced(mlp.fc2, in_index=neurons)
        pruned = to_pruned_vit(source)
        assert pruned.config.heads_per_layer == [2, 4]
        assert pruned.config.intermediate_sizes == [48, source_intermediate]
        expected = logits_of(source, pixel_values)
        torch.testing.assert_close(logits_of(pruned, pixel_values), expected, atol=1e-5, rtol=1e-5)


def test_conversion_copies_and_leaves_the_source_untouched(pixel_values):
    source = timm_vit()
    before = logits_of(source, pixel_values)
    pruned = to_pruned_vit(source)
    with torch.no_grad():
        for param in pruned.parameters():
            param.zero_()
    torch.testing.assert_close(logits_of(source, pixel_values), before, atol=0, rtol=0)


def test_default_image_processors_follow_the_source():
    vit = to_pruned_vit(hf(ViTForImageClassification)).image_processor
    assert type(vit) is ViTImageProcessor and vit.size.height == 32 and list(vit.image_mean) == [0.5, 0.5, 0.5]

    deit = to_pruned_vit(hf(DeiTForImageClassification, DeiTConfig)).image_processor
    assert type(deit) is DeiTImageProcessor and deit.crop_size.height == 32 and deit.size.height == 37
    assert list(deit.image_mean) == list(IMAGENET_DEFAULT_MEAN) and deit.resample == PILImageResampling.BICUBIC

    # timm's eval transform at 224 px (resize 248, crop 224): HF's centre crop rounds odd margins differently
    # (one pixel), so the comparison uses an even margin.
    source = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    processor = to_pruned_vit(source).image_processor
    assert type(processor) is DeiTImageProcessor and processor.crop_size.height == 224
    transform = create_transform(**resolve_model_data_config(source))
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 400, 3), dtype=np.uint8))
    ours = processor(image, return_tensors="pt").pixel_values[0]
    assert ours.shape == (3, 224, 224)
    assert (ours - transform(image)).abs().mean() < 1e-3


def test_given_image_processor_is_attached_and_pruned_vit_passes_through(tmp_path):
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3])
    pruned = to_pruned_vit(timm_vit(), image_processor=processor)
    assert pruned.image_processor is processor
    assert to_pruned_vit(pruned) is pruned
    pruned.save_pretrained(tmp_path)
    assert list(AutoImageProcessor.from_pretrained(tmp_path).image_mean) == [0.1, 0.2, 0.3]
    with pytest.raises(TypeError, match="image_processor"):
        to_pruned_vit(pruned, image_processor="vit")


@pytest.mark.parametrize(
    "model",
    [nn.Linear(2, 2), ViTForMaskedImageModeling(ViTConfig(**HF_KWARGS))],
    ids=["linear", "vit_masked_image_modeling"],
)
def test_unsupported_class_raises_type_error_listing_supported(model):
    with pytest.raises(TypeError, match="supported") as error:
        to_pruned_vit(model)
    for name in (
        "transformers.ViTForImageClassification",
        "transformers.DeiTForImageClassificationWithTeacher",
        "timm.models.vision_transformer.VisionTransformer",
        "VisionTransformerDistilled",
    ):
        assert name in str(error.value)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"reg_tokens": 2}, ValueError, "reg_tokens"),
        ({"class_token": False, "global_pool": "avg"}, ValueError, "class_token"),
        ({"qk_norm": True}, ValueError, "qk_norm"),
        ({"init_values": 1e-5}, ValueError, "layer scale"),
        ({"pre_norm": True}, ValueError, "pre_norm"),
        ({"no_embed_class": True}, ValueError, "no_embed_class"),
        ({"global_pool": "map"}, ValueError, "global_pool"),
        ({"global_pool": "max"}, ValueError, "global_pool"),
        ({"global_pool": "token", "fc_norm": True}, ValueError, "fc_norm"),
        ({"act_layer": "quick_gelu"}, ValueError, "activation"),
        ({"mlp_layer": timm.layers.SwiGLU}, TypeError, "Mlp"),
    ],
)
def test_timm_features_without_pruned_vit_equivalent_are_rejected(overrides, error, message):
    with pytest.raises(error, match=message):
        to_pruned_vit(timm.create_model("vit_tiny_patch16_224", **{**TIMM_KWARGS, **overrides}))

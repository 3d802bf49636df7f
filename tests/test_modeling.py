"""PrunedViT config and models: validation, gates, exact compaction, save/reload (native and remote code)."""

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from hf_vitprune import (
    PrunedViTConfig,
    PrunedViTForImageClassification,
    PrunedViTForImageClassificationWithTeacher,
    PrunedViTModel,
)
from hf_vitprune.structure import KINDS, PruningPlan, apply_masks, compact, enable_gates, remove_gates

IRREGULAR = dict(
    num_attention_heads=[4, 2, 3],
    qk_head_dim=[8, 16, 8],
    v_head_dim=[16, 8, 24],
    intermediate_size=[128, 64, 96],
    block_dim=[64, 40, 64],
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (LayerNorm affine and tokens included), so equalities mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        for layer in model.vit.layers if hasattr(model, "vit") else model.layers:
            if layer.channel_index is not None:
                size = layer.channel_index.numel()
                layer.channel_index = torch.randperm(64, generator=generator)[:size].sort().values
    return model.eval()


def random_plan(config: PrunedViTConfig, model, seed: int) -> PruningPlan:
    rng = random.Random(seed)
    vit = model.vit
    while True:
        plan = PruningPlan.full(config)
        for kind in KINDS:
            plan.keep[kind] = [sorted(rng.sample(range(size), rng.randint(1, size))) for size in plan.sizes[kind]]
        index = [layer.channel_index if layer.channel_index is not None else torch.arange(64) for layer in vit.layers]
        try:
            plan.validate(config, index)
            return plan
        except ValueError:
            continue


def test_config_broadcast_lists_and_json_roundtrip():
    config = tiny_config(**IRREGULAR)
    assert config.heads_per_layer == [4, 2, 3]
    assert config.qk_head_dims == [8, 16, 8] and config.v_head_dims == [16, 8, 24]
    assert config.block_dims == [64, 40, 64] and config.intermediate_sizes == [128, 64, 96]
    assert config.attention_scales == [8**-0.5, 16**-0.5, 8**-0.5]
    data = json.loads(config.to_json_string())
    assert "per_layer_config" in data  # the geometry lives in transformers' native per-layer config
    reloaded = PrunedViTConfig.from_dict(data)
    for name in ("heads_per_layer", "qk_head_dims", "v_head_dims", "intermediate_sizes", "block_dims"):
        assert getattr(reloaded, name) == getattr(config, name)
    assert reloaded.per_layer_config[1].num_attention_heads == 2
    dense = tiny_config()
    assert dense.heads_per_layer == [4, 4, 4] and dense.qk_head_dims == [16, 16, 16]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_attention_heads=[4, 4]), "num_attention_heads"),
        (dict(intermediate_size=[128, 0, 128]), "intermediate_size"),
        (dict(qk_head_dim=-1), "qk_head_dim"),
        (dict(block_dim=[64, 65, 64]), "block_dim"),
        (dict(attention_scale=0.0), "attention_scale"),
        (dict(pooling="max"), "pooling"),
        (dict(image_size=30), "image_size"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_all_ones_gates_give_the_plain_forward(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)))
    plain = model(pixel_values).logits
    gates = enable_gates(model)
    gated = model(pixel_values).logits
    torch.testing.assert_close(gated, plain, atol=1e-5, rtol=0)
    gated.sum().backward()
    for kind in KINDS:
        assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates[kind]), kind
    remove_gates(model)
    assert model.vit.embed_gate is None and model.vit.layers[0].attention.head_gate is None


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "model_class, overrides",
    [
        (PrunedViTForImageClassification, {}),
        (PrunedViTForImageClassification, dict(IRREGULAR, pooling="avg", qkv_bias=False)),
        (PrunedViTForImageClassificationWithTeacher, dict(IRREGULAR, use_distillation_token=True)),
    ],
)
def test_compact_equals_masked(model_class, overrides, seed, pixel_values):
    config = tiny_config(**overrides)
    model = randomize(model_class(config), seed)
    plan = random_plan(config, model, seed)
    dense = model(pixel_values).logits
    apply_masks(model, plan)
    masked = model(pixel_values).logits
    small = compact(model, plan)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the plan really removes something
    torch.testing.assert_close(small(pixel_values).logits, masked, atol=1e-5, rtol=0)
    assert small.config.heads_per_layer == plan.num_kept("head")
    assert small.config.hidden_size == len(plan.kept("embed", 0))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_compact_of_full_plan_is_identity(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)))
    plan = PruningPlan.full(model.config)
    assert plan.is_full()
    small = compact(model, plan)
    torch.testing.assert_close(small(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)


def test_compact_model_saves_and_reloads_through_auto_classes(tmp_path, pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)))
    small = compact(model, random_plan(model.config, model, 7))
    small.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert (tmp_path / "modeling_pruned_vit.py").exists() and (tmp_path / "configuration_pruned_vit.py").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PrunedViTConfig)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, PrunedViTForImageClassification)
    torch.testing.assert_close(reloaded(pixel_values).logits, small(pixel_values).logits, atol=1e-6, rtol=0)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, PrunedViTModel)
    torch.testing.assert_close(
        base(pixel_values).pooler_output, small.vit(pixel_values).pooler_output, atol=1e-6, rtol=0
    )


def test_trust_remote_code_loads_without_hf_vitprune(tmp_path, pixel_values):
    """A fresh process in which `import hf_vitprune` fails loads the folder through auto_map alone."""
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR)))
    small = compact(model, random_plan(model.config, model, 3))
    small.save_pretrained(tmp_path / "model")
    torch.save({"x": pixel_values, "logits": small(pixel_values).logits.detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hf_vitprune" or name.startswith("hf_vitprune."):
                    raise ImportError("hf_vitprune is blocked in this test")
        sys.meta_path.insert(0, Block())
        try:
            import hf_vitprune  # noqa
            raise SystemExit("hf_vitprune should not be importable here")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForImageClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        diff = (model.eval()(io["x"]).logits - io["logits"]).abs().max().item()
        print("DIFF", diff)
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("DIFF")[-1])
    assert diff < 1e-6


def test_eager_and_sdpa_agree_and_teacher_logits_are_the_mean(pixel_values):
    model = randomize(PrunedViTForImageClassificationWithTeacher(tiny_config(**IRREGULAR, use_distillation_token=True)))
    model.set_attn_implementation("eager")
    eager = model(pixel_values, output_attentions=True)
    assert len(eager.attentions) == 3 and eager.attentions[1].shape == (2, 2, 18, 18)
    model.set_attn_implementation("sdpa")
    sdpa = model(pixel_values)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa.logits, (sdpa.cls_logits + sdpa.distillation_logits) / 2)


def test_loss_gradient_checkpointing_and_interpolated_positions(pixel_values):
    model = randomize(PrunedViTForImageClassification(tiny_config(**IRREGULAR))).train()
    labels = torch.tensor([1, 7])
    reference = model(pixel_values, labels=labels)
    torch.testing.assert_close(reference.loss, torch.nn.functional.cross_entropy(reference.logits, labels))
    model.gradient_checkpointing_enable()
    loss = model(pixel_values, labels=labels).loss
    loss.backward()
    assert model.vit.layers[0].gradient_checkpointing
    assert model.vit.layers[0].attention.q_proj.weight.grad is not None
    big = torch.randn(1, 3, 48, 48)
    assert model.eval()(big, interpolate_pos_encoding=True).logits.shape == (1, 10)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(big)


def test_plan_json_roundtrip_and_validation(tmp_path):
    config = tiny_config()
    plan = PruningPlan.full(config)
    plan.keep["head"] = [[0, 2], [1], [0, 1, 2, 3]]
    plan.save(tmp_path / "plan.json")
    loaded = PruningPlan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.num_kept("head") == [2, 1, 4]
    bad = PruningPlan.full(config)
    bad.keep["mlp"] = [[], [0], [1]]
    with pytest.raises(ValueError, match="at least one"):
        bad.validate(config)
    bad.keep["mlp"] = [[3, 1], [0], [1]]
    with pytest.raises(ValueError, match="sorted"):
        bad.validate(config)
    with pytest.raises(ValueError, match="unit counts"):
        plan.validate(tiny_config(num_hidden_layers=2))

"""Distillation losses on hand-computed cases, the Trainer subclass under gradient accumulation, and finetune()."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import RandomImages, tiny_config
from test_modeling import randomize
from transformers import TrainingArguments

from hf_vitprune import PrunedViTForImageClassification
from hf_vitprune.distill import (
    DistillationTrainer,
    decay_parameter_groups,
    distillation_loss,
    finetune,
    kl_to_parent_loss,
)


def softmax(values, tau=1.0):
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


STUDENT, TEACHER = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
LABELS = torch.tensor([0])


def test_soft_distillation_hand_computed():
    tau, alpha = 2.0, 0.25
    ce = -math.log(softmax([1.0, 0.0])[0])
    soft = kl(softmax([0.0, 1.0], tau), softmax([1.0, 0.0], tau)) * tau**2
    loss = distillation_loss(STUDENT, TEACHER, LABELS, distillation_type="soft", alpha=alpha, tau=tau)
    assert loss.item() == pytest.approx((1 - alpha) * ce + alpha * soft, rel=1e-6)


def test_hard_distillation_uses_the_teacher_argmax():
    loss = distillation_loss(STUDENT, TEACHER, LABELS, distillation_type="hard", alpha=0.5)
    ce_label, ce_teacher = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    assert loss.item() == pytest.approx(0.5 * ce_label + 0.5 * ce_teacher, rel=1e-6)


def test_two_head_student_base_on_cls_teacher_on_distillation_head():
    outputs = SimpleNamespace(
        logits=torch.tensor([[0.5, 0.5]]), cls_logits=STUDENT, distillation_logits=torch.tensor([[0.0, 2.0]])
    )
    loss = distillation_loss(outputs, TEACHER, LABELS, distillation_type="hard", alpha=0.5)
    expected = 0.5 * math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.exp(-2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # "none": plain cross-entropy of the averaged logits, the teacher is not needed
    none = distillation_loss(outputs, None, LABELS, distillation_type="none")
    assert none.item() == pytest.approx(math.log(2), rel=1e-6)


def test_num_items_in_batch_sums_and_soft_labels_match_indices():
    student = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    teacher = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 1, 4])
    mean = distillation_loss(student, teacher, labels, tau=3.0)
    summed = distillation_loss(student, teacher, labels, tau=3.0, num_items_in_batch=8)
    torch.testing.assert_close(summed, mean * 4 / 8)
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    torch.testing.assert_close(distillation_loss(student, teacher, one_hot, tau=3.0), mean)


def test_kl_to_parent_hand_computed():
    parent = SimpleNamespace(
        logits=torch.tensor([[0.0, 1.0]]), cls_logits=TEACHER, distillation_logits=torch.tensor([[1.0, 1.0]])
    )
    student = SimpleNamespace(logits=STUDENT, cls_logits=STUDENT, distillation_logits=torch.tensor([[0.0, 0.0]]))
    # NViT pruning: one KL of the averaged logits, 'mean' over batch x classes, no tau^2, times the weight
    loss = kl_to_parent_loss(student, parent, temperature=3.0, weight=10.0)
    expected = 10.0 * kl(softmax([0.0, 1.0], 3), softmax([1.0, 0.0], 3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # NViT fine-tuning: per head, averaged; 'batchmean' keeps the per-sample KL
    loss = kl_to_parent_loss(student, parent, temperature=3.0, weight=1.0, per_head=True, reduction="batchmean")
    expected = (kl(softmax([0.0, 1.0], 3), softmax([1.0, 0.0], 3)) + kl([0.5, 0.5], [0.5, 0.5])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="distillation_type must be one of"):
        distillation_loss(STUDENT, TEACHER, LABELS, distillation_type="kd")
    with pytest.raises(ValueError, match="alpha must be in"):
        distillation_loss(STUDENT, TEACHER, LABELS, alpha=1.5)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distillation_loss(STUDENT, None, LABELS, distillation_type="soft")
    with pytest.raises(ValueError, match="per_head=True"):
        kl_to_parent_loss(STUDENT, TEACHER, per_head=True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        kl_to_parent_loss(STUDENT, TEACHER, reduction="sum")


def test_no_weight_decay_on_biases_norms_and_tokens(tiny_model):
    decay, no_decay = decay_parameter_groups(tiny_model, 0.05)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "vit.embeddings.cls_token" in exempt and "classifier.bias" in exempt
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def trainer_step(tmp_path, batch_size, accumulation, model, teacher):
    args = TrainingArguments(
        output_dir=str(tmp_path / f"ga{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=RandomImages(extra_column=True),
        teacher=teacher,
        distillation_type="soft",
        alpha=0.7,
        tau=2.0,
    )
    trainer.train()
    return model


def test_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    teacher = randomize(PrunedViTForImageClassification(tiny_config()), seed=1).eval()
    student = randomize(PrunedViTForImageClassification(tiny_config(hidden_size=32, num_attention_heads=2)), seed=2)
    one = trainer_step(tmp_path, 8, 1, copy.deepcopy(student), teacher)
    two = trainer_step(tmp_path, 4, 2, copy.deepcopy(student), teacher)
    moved = False
    for (name, start), a, b in zip(student.named_parameters(), one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
        moved |= not torch.allclose(a, start)
    assert moved
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_finetune_improves_the_student_and_leaves_the_teacher_alone():
    teacher = randomize(PrunedViTForImageClassification(tiny_config()), seed=1).eval()
    student = randomize(PrunedViTForImageClassification(tiny_config(hidden_size=32, num_attention_heads=2)), seed=2)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = teacher(images).logits.argmax(-1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16, shuffle=True)
    teacher_state = copy.deepcopy(teacher.state_dict())

    def loss() -> float:
        with torch.no_grad():
            return distillation_loss(student(images), teacher(images).logits, labels, tau=2.0).item()

    before, steps = loss(), []
    result = finetune(
        student, teacher, loader, steps=30, lr=2e-3, tau=2.0, warmup_steps=3, callbacks=[lambda s, _: steps.append(s)]
    )
    assert result is student and steps == list(range(1, 31))
    assert loss() < 0.8 * before
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[name])
    assert not teacher.training


def test_finetune_rejects_missing_teacher_and_bad_steps(tiny_model):
    with pytest.raises(ValueError, match="needs a teacher"):
        finetune(tiny_model, None, [], steps=1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        finetune(tiny_model, tiny_model, [], steps=0)

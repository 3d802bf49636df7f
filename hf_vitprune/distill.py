"""Knowledge distillation for fine-tuning pruned ViTs: DeiT hard/soft distillation, NViT's KL to the dense parent,
a `transformers.Trainer` subclass and a compact accelerate loop (`finetune`).

Losses are per-sample terms reduced in one place (`_reduce`): a mean over the batch, or, when the Trainer passes
`num_items_in_batch`, a sum divided by it. The second is how transformers 5 scales the model's own cross-entropy
under gradient accumulation (HF_NOTES §2.5), so every distillation term gets exactly the same scale as the
classification term, whatever the accumulation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, get_scheduler

from .importance import batch_inputs

logger = logging.getLogger(__name__)

DISTILLATION_TYPES = ("none", "soft", "hard")
KL_REDUCTIONS = ("mean", "batchmean")


def output_logits(outputs: Any, name: str = "logits") -> torch.Tensor:
    """`outputs.<name>` of a transformers output (or dict), or the tensor itself (timm models return logits)."""
    if torch.is_tensor(outputs):
        return outputs
    value = outputs[name] if isinstance(outputs, dict) else getattr(outputs, name, None)
    if value is None:
        raise TypeError(f"model outputs of type {type(outputs).__name__} have no {name!r}.")
    return value


def _has_two_heads(outputs: Any) -> bool:
    """True for DeiT-distilled outputs, which carry `cls_logits` and `distillation_logits`."""
    return not torch.is_tensor(outputs) and all(
        (outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)) is not None
        for name in ("cls_logits", "distillation_logits")
    )


def _reduce(per_sample: torch.Tensor, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch, or sum / `num_items_in_batch` (the Trainer's count over the accumulated batch)."""
    if num_items_in_batch is None:
        return per_sample.mean()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(per_sample.device)
    return per_sample.sum() / num_items_in_batch


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy with class indices (-100 ignored: 0) or soft targets (mixup/cutmix)."""
    labels = labels.to(logits.device)
    if labels.is_floating_point():
        return F.cross_entropy(logits.float(), labels.float(), reduction="none")
    return F.cross_entropy(logits.float(), labels.view(-1), reduction="none", ignore_index=-100)


def _kl_per_sample(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(teacher/tau) || softmax(student/tau)) of every sample (summed over classes)."""
    log_student = F.log_softmax(student.float() / tau, dim=-1)
    log_teacher = F.log_softmax(teacher.detach().float().to(student.device) / tau, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def distillation_loss(
    student_outputs: Any,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    distillation_type: str = "soft",
    alpha: float = 0.5,
    tau: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """DeiT's distillation loss (Touvron et al. 2021): `(1 - alpha) * CE(base, labels) + alpha * KD`.

    Args:
        student_outputs: the student's outputs (or logits). A DeiT-distilled student
            (`PrunedViTForImageClassificationWithTeacher`) is distilled through its `distillation_logits` and its
            base term uses `cls_logits`, as in DeiT; other students use `logits` for both.
        teacher_logits: the teacher's logits on the same images (unused for "none").
        labels: class indices `[B]` (-100 = ignored) or soft targets `[B, C]` (mixup/cutmix).
        distillation_type: "soft" (KL at temperature `tau`, times tau^2, per sample), "hard" (cross-entropy to the
            teacher's argmax) or "none" (plain cross-entropy of `logits`, the mean of both heads for DeiT).
        alpha: weight of the distillation term, in [0, 1].
        tau: softmax temperature of the soft term.
        num_items_in_batch: the Trainer's sample count over the accumulated batch (sum / it instead of a mean).
    """
    if distillation_type not in DISTILLATION_TYPES:
        raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}.")
    if distillation_type == "none":
        return _reduce(_cross_entropy(output_logits(student_outputs), labels), num_items_in_batch)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    _check_positive("tau", tau)
    if teacher_logits is None:
        raise ValueError(f"distillation_type={distillation_type!r} needs teacher_logits.")
    two_heads = _has_two_heads(student_outputs)
    base_logits = output_logits(student_outputs, "cls_logits" if two_heads else "logits")
    distill_logits = output_logits(student_outputs, "distillation_logits" if two_heads else "logits")
    if distillation_type == "soft":
        teacher_term = _kl_per_sample(distill_logits, teacher_logits, tau) * tau**2
    else:
        teacher_term = _cross_entropy(distill_logits, teacher_logits.argmax(-1))
    per_sample = (1 - alpha) * _cross_entropy(base_logits, labels) + alpha * teacher_term
    return _reduce(per_sample, num_items_in_batch)


def kl_to_parent_loss(
    student_outputs: Any,
    parent_outputs: Any,
    *,
    temperature: float = 3.0,
    weight: float = 1e5,
    per_head: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """NViT's full-model distillation to the dense parent (methods/nvit.md §6): `weight * KL(parent || student)`
    at `temperature`, without a tau^2 factor.

    Args:
        student_outputs, parent_outputs: outputs (or logits) of the pruned student and of its dense parent.
        temperature: NViT uses 3 while pruning and 20 (`--distillation-tau`) while fine-tuning.
        weight: NViT's `kl_loss_coeff` = 1e5 (with `reduction="mean"`, i.e. 100 x the per-sample KL on 1000
            classes).
        per_head: KL of the class heads and of the distillation heads, averaged (NViT fine-tuning); False: one KL
            of the averaged `logits` (NViT pruning). Needs DeiT-distilled outputs on both sides.
        reduction: "mean" as torch's `KLDivLoss()` default NViT uses (averaged over samples and classes) or
            "batchmean" (per-sample KL averaged over samples).
        num_items_in_batch: see `distillation_loss`.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}.")
    _check_positive("temperature", temperature)
    if per_head:
        if not (_has_two_heads(student_outputs) and _has_two_heads(parent_outputs)):
            raise ValueError("per_head=True needs DeiT-distilled outputs (cls_logits, distillation_logits) on both.")
        pairs = [
            (output_logits(student_outputs, n), output_logits(parent_outputs, n))
            for n in ("cls_logits", "distillation_logits")
        ]
    else:
        pairs = [(output_logits(student_outputs), output_logits(parent_outputs))]
    per_sample = sum(_kl_per_sample(student, parent, temperature) for student, parent in pairs) / len(pairs)
    if reduction == "mean":
        per_sample = per_sample / pairs[0][0].shape[-1]
    return weight * _reduce(per_sample, num_items_in_batch)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, pixel_values: torch.Tensor) -> Any:
    """The frozen teacher's outputs on `pixel_values`, moved to the teacher's device and dtype (HF or timm)."""
    parameter = next(teacher.parameters())
    return teacher(pixel_values.to(device=parameter.device, dtype=parameter.dtype))


#: Keyword options of `DistillationLoss` (also taken by `DistillationTrainer`).
LOSS_OPTIONS = ("distillation_type", "alpha", "tau", "parent_kl_weight", "parent_kl_tau", "parent_kl_per_head")


class DistillationLoss:
    """The training loss of a student: `distillation_loss` against `teacher` plus, when `parent_kl_weight > 0`,
    NViT's `kl_to_parent_loss` against `parent` (the dense model the student was pruned from; default: the
    teacher, run once for both). It runs the frozen models itself, so `DistillationTrainer` and `finetune` compute
    exactly the same thing.

    Args:
        teacher: frozen classifier for the DeiT term (needed unless `distillation_type="none"`).
        parent: frozen dense parent for the KL term (default `teacher`).
        distillation_type, alpha, tau: see `distillation_loss`.
        parent_kl_weight, parent_kl_tau, parent_kl_per_head: `weight`, `temperature`, `per_head` of
            `kl_to_parent_loss` (NViT fine-tuning: 1e5, 20, True).
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        parent: nn.Module | None = None,
        *,
        distillation_type: str = "soft",
        alpha: float = 0.5,
        tau: float = 1.0,
        parent_kl_weight: float = 0.0,
        parent_kl_tau: float = 20.0,
        parent_kl_per_head: bool = False,
    ) -> None:
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}.")
        if parent_kl_weight < 0:
            raise ValueError(f"parent_kl_weight must be >= 0, got {parent_kl_weight!r}.")
        if distillation_type != "none" and teacher is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher.")
        if parent_kl_weight > 0 and parent is None and teacher is None:
            raise ValueError("parent_kl_weight > 0 needs a parent (or a teacher to use as the parent).")
        self.teacher = teacher if distillation_type != "none" else None
        self.parent = (parent if parent is not None else teacher) if parent_kl_weight > 0 else None
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau
        self.parent_kl_weight, self.parent_kl_tau = parent_kl_weight, parent_kl_tau
        self.parent_kl_per_head = parent_kl_per_head

    def frozen_models(self) -> list[nn.Module]:
        """The teacher and the parent, each once."""
        models = [m for m in (self.teacher, self.parent) if m is not None]
        return [m for i, m in enumerate(models) if all(m is not other for other in models[:i])]

    def replace_frozen(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the teacher and parent by `fn(model)` (e.g. prepared by accelerate), keeping a shared one shared."""
        new = {id(m): fn(m) for m in self.frozen_models()}
        self.teacher = new[id(self.teacher)] if self.teacher is not None else None
        self.parent = new[id(self.parent)] if self.parent is not None else None

    def __call__(
        self,
        student_outputs: Any,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        teacher = teacher_outputs(self.teacher, pixel_values) if self.teacher is not None else None
        loss = distillation_loss(
            student_outputs,
            output_logits(teacher) if teacher is not None else None,
            labels,
            distillation_type=self.distillation_type,
            alpha=self.alpha,
            tau=self.tau,
            num_items_in_batch=num_items_in_batch,
        )
        if self.parent is not None:
            parent = teacher if self.parent is self.teacher else teacher_outputs(self.parent, pixel_values)
            loss = loss + kl_to_parent_loss(
                student_outputs,
                parent,
                temperature=self.parent_kl_tau,
                weight=self.parent_kl_weight,
                per_head=self.parent_kl_per_head,
                num_items_in_batch=num_items_in_batch,
            )
        return loss


class DistillationTrainer(Trainer):
    """`transformers.Trainer` whose loss distils a frozen `teacher` into the model (`DistillationLoss`).

    The teacher (and parent) are put in eval mode, frozen and moved to the student's device. Only `pixel_values`
    and `labels` are read from the inputs, so image datasets can keep `remove_unused_columns=False` (needed for
    `with_transform` pipelines, HF_NOTES §0.5). With gradient accumulation the whole loss is normalised by the
    Trainer's `num_items_in_batch` exactly like the model's own cross-entropy (and `Trainer` does not divide it
    again); when the model does not accept loss kwargs it is a per-batch mean, which `Trainer` divides by the
    accumulation steps.

    Args:
        teacher, parent, distillation_type, alpha, tau, parent_kl_weight, parent_kl_tau, parent_kl_per_head:
            see `DistillationLoss`.
        *args, **kwargs: `Trainer`'s (`compute_loss_func` is not supported: the loss is this class's).
    """

    def __init__(self, *args, teacher: nn.Module | None = None, parent: nn.Module | None = None, **kwargs) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss; do not pass compute_loss_func.")
        loss_options = {name: kwargs.pop(name) for name in LOSS_OPTIONS if name in kwargs}
        self.loss_fn = DistillationLoss(teacher, parent, **loss_options)
        super().__init__(*args, **kwargs)
        device = next(self.model.parameters()).device
        self.loss_fn.replace_frozen(lambda model: model.eval().requires_grad_(False).to(device))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs["pixel_values"]
        outputs = model(pixel_values=pixel_values)
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # the Trainer did not count: per-batch means, divided by GA by the Trainer
        loss = self.loss_fn(outputs, pixel_values, inputs["labels"], num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's samples and DDP averages gradients: undo the average.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as DeiT/timm: no weight decay on biases, norms (1-D tensors) and the embeddings' tokens."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith(("cls_token", "distillation_token", "position_embeddings"))
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainingProgress:
    """Optimizer steps done, saved by `accelerator.save_state` and restored by `load_state`."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def _keep_out_of_checkpoints(accelerator, module: nn.Module) -> list:
    """Hooks that leave the frozen `module` (prepared like a model, but never changed) out of `save_state` and
    `load_state`, so checkpoints hold only what training changes. It must be prepared after the student."""

    def drop_weights(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if models[i] is module and i < len(weights):
                del weights[i]

    def drop_model(models, input_dir):
        models[:] = [m for m in models if m is not module]

    return [
        accelerator.register_save_state_pre_hook(drop_weights),
        accelerator.register_load_state_pre_hook(drop_model),
    ]


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train_dataloader: Iterable,
    *,
    steps: int,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    distillation_type: str = "soft",
    alpha: float = 0.5,
    tau: float = 1.0,
    accelerator=None,
    max_grad_norm: float | None = 1.0,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] | None = None,
    scheduler_type: str = "cosine",
    parent: nn.Module | None = None,
    parent_kl_weight: float = 0.0,
    parent_kl_tau: float = 20.0,
    parent_kl_per_head: bool = False,
    mixup_fn: Callable | None = None,
    resume_from_checkpoint: str | None = None,
) -> nn.Module:
    """Fine-tune `student` for `steps` optimizer steps with distillation from `teacher`; returns the student.

    A compact accelerate loop: AdamW (no decay on biases and norms), cosine schedule with linear warm-up, gradient
    accumulation and mixed precision as configured on `accelerator` (default: a new `Accelerator()`), gradient
    clipping, a progress bar on the main process. The dataloader is cycled as often as needed.

    Args:
        student: the model to train (in place).
        teacher: frozen classifier (may be None with `distillation_type="none"`); not modified (its mode is
            restored; under mixed precision accelerate's autocast wrapper is removed again).
        train_dataloader: batches of `pixel_values`/`labels` (dicts or pairs); a `DataLoader` is sharded by
            `accelerator.prepare`.
        scheduler_type: a transformers scheduler name (`get_scheduler`), with `warmup_steps` of linear warm-up.
        distillation_type, alpha, tau, parent, parent_kl_*: the loss (`DistillationLoss`; `parent` defaults to the
            teacher).
        callbacks: called on every process after each optimizer step as `callback(step, logs)` with
            `logs = {"loss", "lr"}`; recipes checkpoint and log through them.
        mixup_fn: applied to each batch as `pixel_values, labels = mixup_fn(pixel_values, labels)` (timm `Mixup`).
        resume_from_checkpoint: an `accelerator.save_state` folder of this loop: restores model, optimizer,
            scheduler, RNG and the step count, and skips the batches already seen.
    """
    from accelerate import Accelerator

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    loss_fn = DistillationLoss(
        teacher,
        parent,
        distillation_type=distillation_type,
        alpha=alpha,
        tau=tau,
        parent_kl_weight=parent_kl_weight,
        parent_kl_tau=parent_kl_tau,
        parent_kl_per_head=parent_kl_per_head,
    )
    accelerator = accelerator if accelerator is not None else Accelerator()
    ga = accelerator.gradient_accumulation_steps
    optimizer = torch.optim.AdamW(decay_parameter_groups(student, weight_decay), lr=lr)
    # A prepared scheduler steps once per process on each optimizer step (accelerate), hence the factor.
    scheduler = get_scheduler(
        scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps * accelerator.num_processes,
        num_training_steps=steps * accelerator.num_processes,
    )
    student_mode = student.training
    model, optimizer, dataloader, scheduler = accelerator.prepare(student, optimizer, train_dataloader, scheduler)
    frozen_modes = [(frozen, frozen.training) for frozen in loss_fn.frozen_models()]
    loss_fn.replace_frozen(lambda frozen: accelerator.prepare_model(frozen.eval(), evaluation_mode=True))
    hooks = [hook for frozen in loss_fn.frozen_models() for hook in _keep_out_of_checkpoints(accelerator, frozen)]
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    if resume_from_checkpoint:
        accelerator.load_state(resume_from_checkpoint)
        logger.info("resumed from %s at step %d", resume_from_checkpoint, progress.step)

    steps_per_epoch = math.ceil(len(dataloader) / ga) if hasattr(dataloader, "__len__") else None
    epoch, skip = (
        (progress.step // steps_per_epoch, (progress.step % steps_per_epoch) * ga) if steps_per_epoch else (0, 0)
    )
    if progress.step and steps_per_epoch is None:
        logger.warning("the dataloader has no length: a resumed run starts a new pass over the data.")
    bar = tqdm(total=steps, initial=progress.step, desc="fine-tuning", disable=not accelerator.is_local_main_process)
    model.train()
    running, micro = 0.0, 0
    try:
        while progress.step < steps:
            if hasattr(dataloader, "set_epoch"):
                dataloader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            seen = False
            for batch in batches:
                seen = True
                inputs = batch_inputs(batch, accelerator.device)
                pixel_values, labels = inputs["pixel_values"], inputs["labels"]
                if mixup_fn is not None:
                    pixel_values, labels = mixup_fn(pixel_values, labels)
                with accelerator.accumulate(model):
                    outputs = model(pixel_values=pixel_values)
                    loss = loss_fn(outputs, pixel_values, labels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                running, micro = running + loss.detach().item(), micro + 1
                if accelerator.sync_gradients:
                    progress.step += 1
                    logs = {"loss": running / micro, "lr": scheduler.get_last_lr()[0]}
                    running, micro = 0.0, 0
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                    for callback in callbacks or ():
                        callback(progress.step, logs)
                    if progress.step >= steps:
                        break
            if not seen and not skip:
                raise ValueError("train_dataloader gave no batch.")
            epoch, skip = epoch + 1, 0
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
    for prepared in loss_fn.frozen_models():
        accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    for frozen, mode in frozen_modes:
        frozen.train(mode)
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False).train(student_mode)


__all__ = [
    "DISTILLATION_TYPES",
    "DistillationLoss",
    "DistillationTrainer",
    "TrainingProgress",
    "decay_parameter_groups",
    "distillation_loss",
    "finetune",
    "kl_to_parent_loss",
    "output_logits",
    "teacher_outputs",
]

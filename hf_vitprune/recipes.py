"""Machinery shared by the `accelerate launch` recipes in `recipes/`: arguments, and `run(args, prune_fn)`.

`run` follows transformers' `run_image_classification_no_trainer.py`: an `Accelerator` (gradient accumulation,
mixed precision, trackers), the data through `hf_vitprune.data`, the model converted to PrunedViT, then

1. prune with the recipe's `prune_fn(model, dataloader, accelerator) -> (compact model, plan)`: every process
   scores its shard of the scoring batches and the scorers all-reduce, so all ranks choose the same plan (checked
   by hash); the compact model and the plan are saved to `<output_dir>/pruned`, where a resumed run starts from;
2. fine-tune with distillation from the dense model (`hf_vitprune.distill.finetune`), with `accelerator.save_state`
   every `--checkpointing_steps` into `<output_dir>/checkpoints/step_<n>` (plus the plan JSON), resuming
   automatically from the latest one;
3. evaluate top-1/top-5 with `gather_for_metrics` and the `evaluate` metric module shipped in the package;
4. write the Hub-ready folder `<output_dir>/model` atomically (weights, code, image processor, model card,
   `all_results.json`) and push it when asked.

Settings can come from a YAML/JSON file (`--config recipes/configs/nvit_b.yaml`); command-line flags win.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data, hub
from .callbacks import PLAN_FILE
from .cost import count_macs, count_params
from .distill import DISTILLATION_TYPES, finetune, output_logits
from .importance import batch_inputs
from .metrics import TOP_K_ACCURACY
from .modeling_pruned_vit import BLOCK_MASK_BUFFER, PrunedViTPreTrainedModel
from .structure import PruningPlan

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/deit-base-distilled-patch16-224"
#: DeiT's rule: the learning rate given is for a global batch of 512 and scales linearly with it.
REFERENCE_BATCH_SIZE = 512
CHECKPOINTS_DIR, PRUNED_DIR, MODEL_DIR = "checkpoints", "pruned", "model"
RESULTS_FILE = "all_results.json"
#: Exit code of `--stop_after_step` (a simulated crash, for the resume test).
STOP_EXIT_CODE = 75
#: A pruning function: (dense PrunedViT, scoring dataloader, accelerator) -> (compact model, plan).
PruneFn = Callable[[nn.Module, Iterable, Any], tuple[PrunedViTPreTrainedModel, Any]]
#: `prune()`'s target arguments for (dense model, accelerator), e.g. a latency target priced by a table measured on
#: the run's device; without one, `method_prune_fn` prunes to `--target_macs_ratio`.
TargetFn = Callable[[nn.Module, Any], dict[str, Any]]


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments every recipe shares (model, data, optimisation, checkpoints, distillation, Hub)."""
    add = parser.add_argument
    add("--config", help="YAML/JSON file of argument values (keys = argument names); command-line flags win.")
    add(
        "--model_name_or_path",
        default=DEFAULT_MODEL,
        help="Hub id or folder of a transformers ViT/DeiT or PrunedViT classifier, or 'timm/<name>' for timm.",
    )
    add("--dataset_name", default=data.DEFAULT_DATASET, help="Hub dataset id with train/validation splits.")
    add("--train_dir", help="imagefolder root (with train/ and validation/, or class folders only) instead.")
    add("--validation_dir", help="imagefolder of the validation images (default: --train_dir's validation/).")
    add("--streaming", action="store_true", help="stream the Hub dataset (needs --max_train_steps).")
    add("--max_train_samples", type=int, help="keep a random subset of this many training images.")
    add("--max_eval_samples", type=int, help="evaluate on the first this many validation images.")
    add("--num_score_batches", type=int, default=128, help="global batches of training images scored for pruning.")
    add("--per_device_score_batch_size", type=int, help="batch size of the scoring pass (default: the training one).")
    add("--per_device_train_batch_size", type=int, default=64)
    add("--per_device_eval_batch_size", type=int, default=64)
    add("--num_workers", type=int, default=4, help="dataloader worker processes per process.")
    add(
        "--learning_rate",
        type=float,
        default=5e-4,
        help=f"base learning rate for a global batch of {REFERENCE_BATCH_SIZE}, scaled linearly (DeiT).",
    )
    add("--weight_decay", type=float, default=0.05)
    add("--num_train_epochs", type=float, default=1.0)
    add("--max_train_steps", type=int, help="optimizer steps; overrides --num_train_epochs.")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: the accelerate config's.")
    add("--lr_scheduler_type", default="cosine", help="a transformers scheduler name (cosine, linear, constant...).")
    add("--num_warmup_steps", type=int, default=0)
    add("--num_warmup_epochs", type=float, help="warm-up in epochs (overrides --num_warmup_steps).")
    add("--max_grad_norm", type=float, help="clip gradients to this norm (DeiT and the papers: no clipping).")
    add("--auto_augment", default=data.RAND_AUGMENT, help="timm auto-augment policy ('none' to disable).")
    add("--reprob", type=float, default=0.25, help="random erasing probability.")
    add("--no_augmentation", action="store_true", help="train on the evaluation preprocessing (tiny datasets).")
    add("--mixup", type=float, default=0.8, help="mixup alpha (0 disables).")
    add("--cutmix", type=float, default=1.0, help="cutmix alpha (0 disables).")
    add("--smoothing", type=float, default=0.1, help="label smoothing (with mixup/cutmix).")
    add("--output_dir", default="output", help="run folder: pruned/, checkpoints/, model/ (the Hub-ready one).")
    add("--seed", type=int, default=42)
    add("--checkpointing_steps", type=int, help="save the training state every this many optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=2, help="checkpoints kept (oldest deleted first).")
    add(
        "--resume_from_checkpoint",
        default="latest",
        help="'latest' (the newest checkpoint in --output_dir, if any), 'none', or a checkpoint folder.",
    )
    add("--with_tracking", action="store_true", help="log to the trackers of --report_to.")
    add("--report_to", default="tensorboard", help="accelerate tracker(s): tensorboard, wandb, all...")
    add("--teacher_name_or_path", help="distillation teacher (HF id/folder or timm/<name>); default: the dense model.")
    add("--distillation_type", choices=DISTILLATION_TYPES, default="soft")
    add("--distillation_alpha", type=float, default=0.5)
    add("--distillation_tau", type=float, default=1.0)
    add("--parent_kl_weight", type=float, default=0.0, help="NViT's KL to the dense parent; 0 = off.")
    add(
        "--parent_name_or_path",
        help="dense parent of the KL term (default: the dense model if pruning, else the teacher).",
    )
    add("--parent_kl_tau", type=float, default=20.0)
    add("--parent_kl_per_head", action="store_true", help="KL per head (cls and distillation) as NViT fine-tuning.")
    add("--use_cpu", action="store_true", help="run on CPU (with torchrun or accelerate's multi-process launch).")
    add("--target_macs_ratio", type=float, default=0.5, help="fraction of the dense MACs to keep.")
    add("--method_options", type=json.loads, default={}, help="JSON options of the pruning method's config.")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", help="owner/name of the Hub repo to push to.")
    add("--stop_after_step", type=int, help=argparse.SUPPRESS)  # tests: exit like a crash after this step
    return parser


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Argument values from a YAML or JSON mapping."""
    import yaml

    values = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of argument names to values.")
    return values


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from `--config` when given (its optional `paper` mapping, the paper's setting
    and reported results, becomes `args.paper`), and check the combination of arguments."""
    args = parser.parse_args(argv)
    paper = None
    if args.config:
        values = load_config_file(args.config)
        paper = values.pop("paper", None)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {args.config} has unknown arguments {unknown}.")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    args.paper = paper
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for argument combinations that cannot work."""
    if args.streaming and not args.max_train_steps:
        raise ValueError("--streaming needs --max_train_steps (a stream has no length to count epochs with).")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id owner/name.")
    if not 0 < args.target_macs_ratio < 1:
        raise ValueError(f"--target_macs_ratio must be in (0, 1), got {args.target_macs_ratio}.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if (args.mixup > 0 or args.cutmix > 0) and args.per_device_train_batch_size % 2:
        raise ValueError("mixup/cutmix needs an even --per_device_train_batch_size (or --mixup 0 --cutmix 0).")


def load_classifier(name_or_path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """An image classifier and its image processor (None for timm): 'timm/<name>' through timm (pretrained
    weights), a PrunedViT folder through its own class (also the DeiT-distilled one), else
    `AutoModelForImageClassification`."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from . import modeling_pruned_vit

    name = str(name_or_path)
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=True), None
    config = AutoConfig.from_pretrained(name)
    if config.model_type == "pruned_vit":
        architecture = (config.architectures or ["PrunedViTForImageClassification"])[0]
        cls = getattr(modeling_pruned_vit, architecture, None)
        if not (isinstance(cls, type) and issubclass(cls, PrunedViTPreTrainedModel)):
            raise ValueError(f"{name}: unknown PrunedViT architecture {architecture!r}.")
        model = cls.from_pretrained(name)
    else:
        model = AutoModelForImageClassification.from_pretrained(name)
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError:
        processor = None
    return model, processor


def load_student(name_or_path: str | os.PathLike) -> PrunedViTPreTrainedModel:
    """`load_classifier`, converted to PrunedViT (exactly), with its image processor as `.image_processor`."""
    from .convert import to_pruned_vit

    model, processor = load_classifier(name_or_path)
    student = to_pruned_vit(model, processor)
    if getattr(student, "image_processor", None) is None:
        raise ValueError(f"{name_or_path} has no image processor (preprocessor_config.json); save one with the model.")
    return student


def plan_fingerprint(plan: Any, model: nn.Module) -> str:
    """SHA-256 of the plan (its `to_dict()`), or, when the plan has no dict form, of the compact architecture and the
    model's block masks (LPViT: what it selected lives in the masks)."""
    if hasattr(plan, "to_dict"):
        return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    skip = {"pruning", "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}
    payload = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for name, buffer in model.named_buffers():
        if name.endswith(BLOCK_MASK_BUFFER):
            digest.update(name.encode() + buffer.cpu().numpy().tobytes())
    return digest.hexdigest()


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from: 'latest' = the newest in `output_dir` (None when there is none)."""
    if resume_from_checkpoint in (None, "", "none"):
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoints(output_dir)
        return str(found[-1]) if found else None
    if not Path(resume_from_checkpoint).is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint} is not a folder.")
    return resume_from_checkpoint


def save_checkpoint(accelerator, output_dir: Path, step: int, plan_file: Path | None, total_limit: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoints/step_<step>` once complete (so a
    crash never leaves a half checkpoint to resume from), with a copy of the plan; old checkpoints are rotated."""
    root = output_dir / CHECKPOINTS_DIR
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    tmp.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if plan_file is not None and plan_file.is_file():
            shutil.copy(plan_file, tmp / PLAN_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[: -max(total_limit, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataloader: Iterable, accelerator, top_k: tuple[int, ...] = (1, 5)) -> dict:
    """Top-k accuracy over all processes: each scores its shard of a prepared dataloader, `gather_for_metrics`
    collects the ranked labels (without the samples accelerate duplicates to even out the shards) and the shipped
    `evaluate` module computes the metric. Returns `top_<k>_accuracy` (k up to the number of classes) and
    `num_samples`."""
    import evaluate

    with accelerator.main_process_first():
        metric = evaluate.load(TOP_K_ACCURACY, keep_in_memory=True)
    was_training = model.training
    model.eval()
    num_samples, num_classes = 0, None
    for batch in dataloader:
        inputs = batch_inputs(batch, accelerator.device)
        with accelerator.autocast():
            logits = output_logits(model(pixel_values=inputs["pixel_values"]))
        num_classes = logits.shape[-1]
        ranked = logits.topk(min(max(top_k), num_classes), dim=-1).indices
        ranked, labels = accelerator.gather_for_metrics((ranked, inputs["labels"]))
        metric.add_batch(predictions=ranked.cpu().tolist(), references=labels.cpu().tolist())
        num_samples += labels.numel()
    model.train(was_training)
    if num_samples == 0:
        raise ValueError("the validation set is empty.")
    return {**metric.compute(k=[k for k in top_k if k <= num_classes]), "num_samples": num_samples}


def merge_method_options(args: argparse.Namespace, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A method's options: `--method_options` updated with `options`, the recipe's own flags. None (a flag not given)
    leaves the option to `--method_options` or the config's default; lists become tuples."""
    given = {name: tuple(v) if isinstance(v, list) else v for name, v in (options or {}).items() if v is not None}
    return {**args.method_options, **given}


def method_prune_fn(
    method: str, args: argparse.Namespace, options: dict[str, Any] | None = None, targets: TargetFn | None = None
) -> PruneFn:
    """The `prune_fn` of a registered method, what a method recipe passes to `run`: `hf_vitprune.prune` (score,
    select, compact) with `merge_method_options(args, options)`, to `--target_macs_ratio` or to the targets
    `targets(model, accelerator)` returns. The options are checked here, before the model and the data are loaded."""
    from .methods import get_method
    from .pruner import prune

    method_options = merge_method_options(args, options)
    get_method(method, **method_options)

    def prune_fn(model: nn.Module, dataloader: Iterable, accelerator) -> tuple[PrunedViTPreTrainedModel, Any]:
        target = targets(model, accelerator) if targets else {"target_macs_ratio": args.target_macs_ratio}
        return prune(model, method, dataloader=dataloader, return_plan=True, **target, **method_options)

    return prune_fn


def _subset(dataset, size: int | None, seed: int | None = None):
    """The first `size` examples (after a seeded shuffle when `seed` is given); streams are taken lazily."""
    if size is None:
        return dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed, **({"buffer_size": 10_000} if data.is_streaming(dataset) else {}))
    if data.is_streaming(dataset):
        return dataset.take(size)
    return dataset.select(range(min(size, len(dataset))))


def _save_pruned(folder: Path, model: PrunedViTPreTrainedModel, processor: Any, plan: Any) -> None:
    """The compact model before fine-tuning, its image processor and the plan, written atomically."""

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if isinstance(plan, PruningPlan):
            plan.save(tmp / PLAN_FILE)

    hub.write_folder_atomically(folder, save)


def save_model_folder(
    model: PrunedViTPreTrainedModel, folder: str | os.PathLike, image_processor: Any, results: dict, **card_kwargs
) -> Path:
    """The Hub-ready folder (`hf_vitprune.hub.save_hub_folder`: weights, code, image processor, model card with
    `card_kwargs`) plus `all_results.json`, written to a temporary folder and moved into place complete."""

    def save(tmp: Path) -> None:
        hub.save_hub_folder(model, tmp, image_processor=image_processor, **card_kwargs)
        (tmp / RESULTS_FILE).write_text(json.dumps(results, indent=2))

    return hub.write_folder_atomically(folder, save)


def _full_model(accelerator, model: PrunedViTPreTrainedModel) -> PrunedViTPreTrainedModel:
    """The model with full weights on every process (FSDP shards them; gathering is collective)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return model
    state = accelerator.get_state_dict(model)
    full = type(model)(model.config)
    if accelerator.is_main_process:
        full.load_state_dict(state)
    full.image_processor = getattr(model, "image_processor", None)
    return full


def _setup_logging(accelerator) -> None:
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main = accelerator.is_local_main_process
    logging.getLogger("hf_vitprune").setLevel(logging.INFO if main else logging.ERROR)
    (transformers.utils.logging.set_verbosity_warning if main else transformers.utils.logging.set_verbosity_error)()
    (datasets.utils.logging.set_verbosity_warning if main else datasets.utils.logging.set_verbosity_error)()


def run(args: argparse.Namespace, prune_fn: PruneFn | None = None) -> dict[str, Any]:
    """Prune (when `prune_fn` is given), fine-tune with distillation, evaluate and save the Hub-ready folder;
    returns the results written to `all_results.json` (see the module docstring for the steps and folders)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # also for files a method writes while pruning
    accelerator = Accelerator(
        cpu=args.use_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=str(output_dir),
        # batch order from (seed, epoch): a resumed run sees the batches the interrupted one would have seen
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    _setup_logging(accelerator)
    logger.info("%s", accelerator.state)
    set_seed(args.seed)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)

    with accelerator.main_process_first():
        train_source = args.train_dir or args.dataset_name
        train_set = data.load_image_dataset(train_source, split="train", streaming=args.streaming)
        eval_set = data.load_image_dataset(
            args.validation_dir or train_source, split="validation", streaming=args.streaming
        )
    train_set = _subset(train_set, args.max_train_samples, args.seed)
    eval_set = _subset(eval_set, args.max_eval_samples, args.seed)

    dense = load_student(args.model_name_or_path).to(accelerator.device)
    processor, config = dense.image_processor, dense.config
    pin_memory = accelerator.device.type == "cuda"
    train_loader, eval_loader = data.make_dataloaders(
        train_set,
        eval_set,
        processor,
        train_batch_size=args.per_device_train_batch_size,
        eval_batch_size=args.per_device_eval_batch_size,
        num_workers=args.num_workers,
        pin_memory=pin_memory,
        seed=args.seed,
        auto_augment=args.auto_augment,
        re_prob=args.reprob,
        augment=not args.no_augmentation,
        model_config=config,
    )

    # 1. prune (or restart from the pruned model of an interrupted run)
    pruned_dir, plan = output_dir / PRUNED_DIR, None
    record = config.pruning or {}  # an already pruned model keeps its dense reference
    dense_macs, dense_params = (
        record.get("dense_macs", count_macs(dense)),
        record.get("dense_params", count_params(dense)),
    )
    if prune_fn is None:
        student = dense
    elif checkpoint is not None and (pruned_dir / "config.json").is_file():
        student = load_student(pruned_dir).to(accelerator.device)
        plan = PruningPlan.load(pruned_dir / PLAN_FILE) if (pruned_dir / PLAN_FILE).is_file() else None
        logger.info("resuming: the pruned model is read from %s", pruned_dir)
    else:
        score_batch_size = args.per_device_score_batch_size or args.per_device_train_batch_size
        score_loader = data.image_dataloader(
            _subset(train_set, args.num_score_batches * score_batch_size, args.seed),
            data.eval_transforms(processor),
            batch_size=score_batch_size,
            num_workers=args.num_workers,
            pin_memory=pin_memory,
            model_config=config,
        )
        student, plan = prune_fn(dense, accelerator.prepare_data_loader(score_loader), accelerator)
        student.image_processor = processor
        if accelerator.is_main_process:
            _save_pruned(pruned_dir, student, processor, plan)
        accelerator.wait_for_everyone()
    fingerprint = plan_fingerprint(plan, student)
    fingerprints = gather_object([fingerprint])
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"the processes chose different pruning plans: {fingerprints}.")

    # 2. fine-tune with distillation
    teacher = parent = dense if prune_fn is not None else None
    if args.teacher_name_or_path:
        teacher = load_classifier(args.teacher_name_or_path)[0]
    if args.parent_name_or_path:
        parent = load_classifier(args.parent_name_or_path)[0]
    if teacher is None and args.distillation_type != "none":
        raise ValueError(
            "fine-tuning without pruning distils from --teacher_name_or_path: give one, or use "
            "--distillation_type none."
        )
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * global_batch / REFERENCE_BATCH_SIZE
    steps_per_epoch = None
    if not args.streaming:
        batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    steps = args.max_train_steps or max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    warmup_steps = args.num_warmup_steps
    if args.num_warmup_epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("--num_warmup_epochs needs a dataset with a length; use --num_warmup_steps.")
        warmup_steps = round(args.num_warmup_epochs * steps_per_epoch)
    if args.with_tracking:
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("hf_vitprune", config=hparams)
    plan_file = pruned_dir / PLAN_FILE if prune_fn is not None else None
    steps_run: list[int] = []

    def on_step(step: int, logs: dict[str, float]) -> None:
        steps_run.append(step)
        if args.with_tracking:
            accelerator.log({"train_loss": logs["loss"], "lr": logs["lr"]}, step=step)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, step, plan_file, args.checkpoints_total_limit)
        if args.stop_after_step and step >= args.stop_after_step:
            logger.warning("--stop_after_step %d: exiting without cleanup", step)
            os._exit(STOP_EXIT_CODE)

    student = finetune(
        student,
        teacher,
        train_loader,
        steps=steps,
        lr=learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=warmup_steps,
        scheduler_type=args.lr_scheduler_type,
        parent=parent,
        distillation_type=args.distillation_type,
        alpha=args.distillation_alpha,
        tau=args.distillation_tau,
        parent_kl_weight=args.parent_kl_weight,
        parent_kl_tau=args.parent_kl_tau,
        parent_kl_per_head=args.parent_kl_per_head,
        accelerator=accelerator,
        max_grad_norm=args.max_grad_norm,
        callbacks=[on_step],
        mixup_fn=data.make_mixup(config.num_labels, args.mixup, args.cutmix, args.smoothing),
        resume_from_checkpoint=checkpoint,
    )

    # 3. evaluate
    metrics = evaluate_accuracy(student, accelerator.prepare_data_loader(eval_loader), accelerator)
    if args.with_tracking:
        accelerator.log({f"eval_{k}": v for k, v in metrics.items()}, step=steps)
    results = {
        **metrics,
        "world_size": accelerator.num_processes,
        "plan_hash": fingerprint,
        "plan_hashes": fingerprints,
        "train_steps": steps,
        "resumed_from": checkpoint,
        "first_step": steps_run[0] if steps_run else None,
        "global_batch_size": global_batch,
        "learning_rate": learning_rate,
        "macs": count_macs(student),
        "params": count_params(student),
        "dense_macs": dense_macs,
        "dense_params": dense_params,
    }
    logger.info("results: %s", results)

    # 4. the Hub-ready folder
    student = _full_model(accelerator, student)
    model_dir = output_dir / MODEL_DIR
    if accelerator.is_main_process:
        save_model_folder(
            student,
            model_dir,
            processor,
            results,
            dense_config=config if prune_fn is not None else None,
            dataset=args.train_dir or args.dataset_name,
            metrics=metrics,
            reported=(args.paper or {}).get("reported"),
        )
        logger.info("Hub-ready folder: %s", model_dir)
        if args.push_to_hub:
            hub.push(model_dir, args.hub_model_id)
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    return results


__all__ = [
    "DEFAULT_MODEL",
    "PruneFn",
    "TargetFn",
    "add_common_args",
    "checkpoints",
    "evaluate_accuracy",
    "load_classifier",
    "load_student",
    "merge_method_options",
    "method_prune_fn",
    "parse_args",
    "plan_fingerprint",
    "resolve_checkpoint",
    "run",
    "save_checkpoint",
    "save_model_folder",
]

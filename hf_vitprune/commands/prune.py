"""`hf-vitprune prune` and `hf-vitprune list-models`.

`prune` takes a folder, a Hub id or a timm name. ViT-family models are converted to PrunedViT and pruned by a
registered method to a MACs target; any other timm model (ConvNeXt, ResNet, ...) is pruned by Torch-Pruning's
dependency graph with `--pruning-ratio`. Both print the module diff and `MACs: a G => b G` / `Params: c M => d M`
the way Torch-Pruning's timm example does, and write the result to `--output` atomically.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..methods import METHODS

    parser = subparsers.add_parser("prune", help="prune a ViT (or, with --pruning-ratio, any timm model)")
    parser.add_argument("--model", required=True, help="a folder, a Hub id, or a timm model name (timm/<name>)")
    parser.add_argument("--method", default="taylor", choices=sorted(METHODS))
    parser.add_argument("--target-macs-ratio", type=float, help="fraction of dense MACs to keep, in (0, 1)")
    parser.add_argument("--pruning-ratio", type=float, help="non-ViT timm models: Torch-Pruning channel ratio")
    parser.add_argument("--data", help="an imagefolder directory or a dataset id (for data-driven methods)")
    parser.add_argument("--split", default="train", help="dataset split used for scoring")
    parser.add_argument("--num-samples", type=int, default=256, help="images used for scoring")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kinds", nargs="+", help="unit kinds to prune (method default if omitted)")
    parser.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--random-init", action="store_true", help="timm names: do not load pretrained weights")
    parser.set_defaults(func=run_prune)

    listing = subparsers.add_parser("list-models", help="list the timm and transformers ViTs hf-vitprune prunes")
    listing.add_argument("--filter", default="*", help="timm name pattern, e.g. 'deit*'")
    listing.set_defaults(func=run_list_models)


def load_model(name: str, pretrained: bool = True) -> tuple[nn.Module, object | None, str]:
    """(model, image processor or None, kind) for a folder, a Hub id, or a timm name; kind is "hf" or "timm"."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if Path(name).is_dir():
        if (Path(name) / "config.json").exists() and "model_type" in (Path(name) / "config.json").read_text():
            model = AutoModelForImageClassification.from_pretrained(name)
            processor = AutoImageProcessor.from_pretrained(name) if _has_processor(name) else None
            return model.eval(), processor, "hf"
        raise ValueError(f"--model {name} is a folder but not a transformers model folder (no config.json).")
    timm_name = name.removeprefix("timm/")
    import timm

    if name.startswith("timm/") or timm.is_model(timm_name):
        return timm.create_model(timm_name, pretrained=pretrained).eval(), None, "timm"
    model = AutoModelForImageClassification.from_pretrained(name)
    return model.eval(), AutoImageProcessor.from_pretrained(name), "hf"


def _has_processor(folder: str) -> bool:
    return (Path(folder) / "preprocessor_config.json").exists()


def calibration_loader(data: str, image_processor, split: str, num_samples: int, batch_size: int, model_config=None):
    """A DataLoader of `pixel_values`/`labels` over `num_samples` images of an imagefolder directory or a dataset
    id, shuffled with a fixed seed first (an imagefolder is sorted by class), preprocessed by `image_processor`."""
    from ..data import eval_transforms, image_dataloader, load_image_dataset

    dataset = load_image_dataset(data, split=split).shuffle(seed=0)
    dataset = dataset.select(range(min(num_samples, len(dataset))))
    return image_dataloader(dataset, eval_transforms(image_processor), batch_size=batch_size, model_config=model_config)


def module_lines(module: nn.Module, name: str = "", depth: int = 0) -> list[str]:
    """`repr(module)` without the collapsing of repeated blocks, one line per module, so two models of the same
    structure but different widths line up."""
    prefix = "  " * depth + (f"({name}): " if name else "")
    children = list(module.named_children())
    if not children:
        return [prefix + repr(module)]
    lines = [prefix + type(module).__name__ + "("]
    for child_name, child in children:
        lines += module_lines(child, child_name, depth + 1)
    return lines + ["  " * depth + ")"]


def module_diff(before: list[str], after: list[str]) -> str:
    """`before`, with `old => new` on every line whose module changed (Torch-Pruning's format)."""
    if len(before) != len(after):
        return "\n".join(after)
    return "\n".join(a if a == b else f"{a} => {b.strip()}" for a, b in zip(before, after))


def cost_lines(macs: tuple[float, float], params: tuple[float, float]) -> str:
    return (
        f"MACs: {macs[0] / 1e9:.4f} G => {macs[1] / 1e9:.4f} G\n"
        f"Params: {params[0] / 1e6:.4f} M => {params[1] / 1e6:.4f} M"
    )


def run_prune(args: argparse.Namespace) -> int:
    from .. import prune, to_pruned_vit
    from ..cost import count_macs, count_params
    from ..hub import save_hub_folder, write_folder_atomically
    from ..methods import get_method

    model, processor, kind = load_model(args.model, pretrained=not args.random_init)
    is_vit = True
    try:
        source = to_pruned_vit(model, image_processor=processor)
    except TypeError:
        if kind != "timm":
            raise
        is_vit = False
    if not is_vit:
        return _prune_other_timm(args, model)
    if args.target_macs_ratio is None:
        raise ValueError("--target-macs-ratio is required for ViT models (a fraction of dense MACs in (0, 1)).")
    method_kwargs = {"kinds": tuple(args.kinds)} if args.kinds else {}
    method = get_method(args.method, **method_kwargs)
    dataloader = None
    if method.data_driven:
        if not args.data:
            raise ValueError(f"--method {args.method} is data-driven: give --data (an imagefolder or dataset id).")
        dataloader = calibration_loader(
            args.data, source.image_processor, args.split, args.num_samples, args.batch_size, source.config
        )
    pruned = prune(source, method, target_macs_ratio=args.target_macs_ratio, dataloader=dataloader)
    print(module_diff(module_lines(source), module_lines(pruned)))
    print()
    print(cost_lines((count_macs(source), count_macs(pruned)), (count_params(source), count_params(pruned))))
    if getattr(pruned, "image_processor", None) is not None:
        save_hub_folder(pruned, args.output, dense_config=source.config)
    else:  # a model without an image processor cannot make a complete Hub folder (no card preprocessing)
        write_folder_atomically(args.output, pruned.save_pretrained)
    print(f"Saved to {args.output} (load with AutoModelForImageClassification.from_pretrained)")
    return 0


def _prune_other_timm(args: argparse.Namespace, model: nn.Module) -> int:
    from ..tp import count_timm_cost, save_pruned_timm, tp_prune_timm

    if args.pruning_ratio is None:
        raise ValueError(
            f"{args.model} is not a ViT hf-vitprune converts: give --pruning-ratio (Torch-Pruning channel ratio)."
        )
    input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    before = module_lines(model)
    macs, params = count_timm_cost(model, input_size)
    model, history = tp_prune_timm(model, args.pruning_ratio, input_size=input_size)
    new_macs, new_params = count_timm_cost(model, input_size)
    print(module_diff(before, module_lines(model)))
    print()
    print(cost_lines((macs, new_macs), (params, new_params)))
    name = args.model.removeprefix("timm/")
    save_pruned_timm(model, history, args.output, name, {})
    print(f"Saved to {args.output} (reload with hf_vitprune.tp.load_pruned_timm)")
    return 0


def supported_timm_models(pattern: str = "*") -> list[str]:
    """timm ViT-family architectures that `to_pruned_vit` converts (checked on meta-device instances)."""
    import timm

    from ..convert.timm import TIMM_SOURCES, check_supported

    names = []
    for name in timm.list_models(pattern):
        if not name.startswith(("vit_", "deit")):
            continue
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            if type(model) in TIMM_SOURCES:
                check_supported(model)
                names.append(name)
        except Exception:  # noqa: BLE001 - any architecture timm cannot build or we cannot convert is skipped
            continue
    return names


def run_list_models(args: argparse.Namespace) -> int:
    from ..convert.hf import HF_SOURCES

    print("transformers classes:", ", ".join(cls.__name__ for cls in HF_SOURCES))
    print("timm models:")
    for name in supported_timm_models(args.filter):
        print(f"  {name}")
    return 0

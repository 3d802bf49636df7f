"""`make demo`: prune the shipped digits ViT to 50 % of its MACs, fine-tune it briefly with distillation from the
dense model, evaluate both, time both, save the Hub-ready folder and print dense vs pruned. A few minutes on a CPU.

    python -m hf_vitprune.demo [--steps 200] [--output_dir demo_output]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from . import data
from .convert import to_pruned_vit
from .cost import count_macs, count_params
from .distill import finetune
from .evaluation import compare_latency, evaluate_model, tune_cpu_allocator
from .methods import METHODS
from .pruner import prune
from .recipes import save_model_folder

logger = logging.getLogger(__name__)


def _image_processor(model):
    processor = getattr(model, "image_processor", None)
    if processor is None:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model.name_or_path)
    return processor


def _row(name: str, accuracy: float, macs: int, params: int, seconds: float) -> str:
    cells = (f"{100 * accuracy:7.2f} %", f"{macs / 1e6:8.2f} M", f"{params / 1e6:7.3f} M", f"{1e3 * seconds:15.1f} ms")
    return f"| {name:<22} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the measured numbers (also written to the folder's `all_results.json`)."""
    from .sample import load_sample_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output", help="the Hub-ready folder goes in a subfolder.")
    parser.add_argument("--target_macs_ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning optimizer steps.")
    parser.add_argument("--calibration_batches", type=int, default=8, help="training batches scored for pruning.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # the latency columns time the models, not glibc's page faults
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)

    dense = load_sample_model().eval()
    processor = _image_processor(dense)
    method = "nvit" if "nvit" in METHODS else "taylor"
    with tempfile.TemporaryDirectory() as tmp:
        train_loader, eval_loader = data.digits_dataloaders(
            Path(tmp) / "digits", processor, batch_size=args.batch_size, seed=args.seed, model_config=dense.config
        )
        calibration = [batch for _, batch in zip(range(args.calibration_batches), train_loader)]  # shuffled

        start = time.perf_counter()
        pruned = prune(dense, method, target_macs_ratio=args.target_macs_ratio, dataloader=calibration)
        prune_seconds = time.perf_counter() - start
        dense_accuracy = evaluate_model(dense, eval_loader)["top_1_accuracy"]
        one_shot = evaluate_model(pruned, eval_loader)["top_1_accuracy"]
        start = time.perf_counter()
        finetune(pruned, dense, train_loader, steps=args.steps, lr=args.lr, distillation_type="soft", tau=2.0)
        finetune_seconds = time.perf_counter() - start
        metrics = evaluate_model(pruned.eval(), eval_loader)

    device = str(next(pruned.parameters()).device)
    dense_latency, pruned_latency = compare_latency([dense, pruned], batch_size=64, repeats=20)
    target = round(100 * args.target_macs_ratio)
    results = {
        "method": method,
        "dense_top_1_accuracy": dense_accuracy,
        "one_shot_top_1_accuracy": one_shot,
        **metrics,
        "macs": count_macs(pruned),
        "params": count_params(pruned),
        "dense_macs": count_macs(dense),
        "dense_params": count_params(dense),
        "latency_seconds": pruned_latency,
        "dense_latency_seconds": dense_latency,
        "prune_seconds": prune_seconds,
        "finetune_steps": args.steps,
        "finetune_seconds": finetune_seconds,
    }
    folder = save_model_folder(
        pruned,
        Path(args.output_dir) / f"{method}-digits-{target}",
        processor,
        results,
        dense_config=to_pruned_vit(dense).config,
        dataset="digits",
        metrics=metrics,
        latency={"seconds": pruned_latency, "batch_size": 64, "device": device, "dense_seconds": dense_latency},
    )
    header = f"| {'model':<22} | top-1     | MACs       | params    | latency (batch 64) |"
    print(f"\nDigits, {method} to {target} % of the dense MACs, {args.steps} steps of distillation:\n")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    print(_row("dense", dense_accuracy, results["dense_macs"], results["dense_params"], dense_latency))
    print(_row(f"{method} one-shot", one_shot, results["macs"], results["params"], pruned_latency))
    print(
        _row(f"{method} + distillation", metrics["top_1_accuracy"], results["macs"], results["params"], pruned_latency)
    )
    print(f"\nHub-ready folder: {folder}")
    return results


if __name__ == "__main__":
    main()

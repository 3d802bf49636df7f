"""`make bench`: every registered method and Torch-Pruning itself on the shipped digits ViT.

For each method and each target (70 / 50 / 30 % of dense MACs): MACs, params, one-shot accuracy, accuracy after a
fixed fine-tune budget with distillation from the dense model, CPU latency ratio to dense (batch 64, median of
repeats, dense and pruned timed alternately in the same run), pruning wall time and peak memory. Also the latency
of a PrunedViT against transformers' stock ViT of the same dims. Writes benchmarks/RESULTS.md, results.json and
an accuracy-vs-MACs plot. A method registered in `hf_vitprune.methods.METHODS` gets its rows automatically.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from hf_vitprune import PrunedViTConfig, PrunedViTForImageClassification, prune
from hf_vitprune.cost import count_macs, count_params
from hf_vitprune.data import digits_dataloaders
from hf_vitprune.distill import finetune
from hf_vitprune.evaluation import compare_latency, evaluate_model, tune_cpu_allocator
from hf_vitprune.latency import LatencyTable
from hf_vitprune.methods import METHODS
from hf_vitprune.methods.lpvit import remove_block_masks, to_block_sparse
from hf_vitprune.methods.lpvit.masks import masked_modules
from hf_vitprune.methods.savit.hessian import hessian_cost_ratio
from hf_vitprune.sample import load_sample_model
from hf_vitprune.tp import to_hf_vit, tp_prune_vit_to_macs

logger = logging.getLogger("benchmarks")
BENCH_DIR = Path(__file__).resolve().parent
TP_METHODS = {"torch-pruning-magnitude": "magnitude", "torch-pruning-taylor": "taylor"}

#: Run in a fresh interpreter by `allocator_row`: the dense model's page faults and seconds per pass, first under the
#: C library's default malloc, then tuned.
ALLOCATOR_PROBE = """
import json, resource, sys
from hf_vitprune.evaluation import measure_latency, tune_cpu_allocator
from hf_vitprune.sample import load_sample_model

model, batch_size, repeats = load_sample_model().eval(), int(sys.argv[1]), int(sys.argv[2])


def probe():
    measure_latency(model, batch_size, repeats=1)  # untimed: the heap grows to its steady size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = measure_latency(model, batch_size, repeats=repeats, warmup=0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"seconds": seconds, "faults_per_pass": faults / repeats}


default = probe()
print(json.dumps({"default": default, "applied": tune_cpu_allocator(), "tuned": probe()}))
"""


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every few milliseconds (psutil)."""

    def __enter__(self) -> PeakMemory:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.megabytes = (self.peak - self.start) / 2**20


def run_one(name, dense, ratio, calibration, train_loader, val_loader, args) -> tuple[dict, torch.nn.Module]:
    with PeakMemory() as memory:
        start = time.perf_counter()
        if name in TP_METHODS:
            pruned = tp_prune_vit_to_macs(dense, ratio, TP_METHODS[name], calibration)
        else:
            pruned = prune(dense, name, target_macs_ratio=ratio, dataloader=calibration)
        seconds = time.perf_counter() - start
    row = {
        "method": name,
        "target": ratio,
        "macs": count_macs(pruned),
        "params": count_params(pruned),
        "prune_seconds": seconds,
        "peak_memory_mb": memory.megabytes,
        "one_shot_top1": evaluate_model(pruned, val_loader)["top_1_accuracy"],
    }
    student = copy.deepcopy(pruned)
    finetune(
        student,
        dense,
        train_loader,
        steps=args.finetune_steps,
        lr=args.lr,
        warmup_steps=args.finetune_steps // 10,
        distillation_type="soft",
    )
    row["finetuned_top1"] = evaluate_model(student, val_loader)["top_1_accuracy"]
    return row, student


def inference_model(model: torch.nn.Module, batch_size: int) -> torch.nn.Module:
    """What is timed: the model itself, or for a block-masked one (lpvit) its export: BSR weights for the layers
    that run faster so on this machine (`to_block_sparse`, timed per layer), the other masks folded into dense
    weights (`remove_block_masks`)."""
    if not masked_modules(model):
        return model
    config = model.config
    fast = to_block_sparse(model, benchmark_tokens=batch_size * (config.num_patches + config.num_prefix_tokens))
    remove_block_masks(fast)
    return fast


def stock_vit_row(dense, ratio: float, args) -> dict:
    """A uniformly pruned PrunedViT (equal dims in every block) against transformers' ViT of the same dims."""
    pruned = prune(
        dense,
        "magnitude",
        target_macs_ratio=ratio,
        kinds=("embed", "head", "mlp"),
        scope="uniform",
        round_to={"embed": 16, "mlp": 32},  # hardware-aligned dims, as a stock model would have
    )
    stock = to_hf_vit(pruned)
    ours, theirs = compare_latency([pruned, stock], args.batch_size, args.repeats)
    return {
        "dims": f"E={pruned.config.hidden_size}, heads={pruned.config.heads_per_layer[0]}, "
        f"mlp={pruned.config.intermediate_sizes[0]}",
        "pruned_vit_s": ours,
        "stock_vit_s": theirs,
    }


def alignment_row(dense, ratio: float, args) -> dict:
    """Magnitude pruning to `ratio` of the MACs with the default aligned widths (`round_to` 8) and with round_to=1,
    both timed against dense in one run: what hardware alignment buys."""
    models = {
        "aligned": prune(dense, "magnitude", target_macs_ratio=ratio),
        "unaligned": prune(dense, "magnitude", target_macs_ratio=ratio, round_to=1),
    }
    dense_s, *seconds = compare_latency([dense, *models.values()], args.batch_size, args.repeats)
    return {
        name: {"embed": model.config.hidden_size, "mlp": model.config.intermediate_sizes[0], "speedup": dense_s / s}
        for (name, model), s in zip(models.items(), seconds)
    }


def allocator_row(args) -> dict:
    """What `tune_cpu_allocator` changes for the dense model, measured in a fresh process (the setting is
    process-wide, and this one is tuned already)."""
    command = [sys.executable, "-c", ALLOCATOR_PROBE, str(args.batch_size), str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def uniform_ceiling_row(dense, ratio: float, args) -> dict:
    """How fast a model at `ratio` of the MACs can be here at all: every uniform shape with an embedding of 64-128
    (step 16) and 1 to all heads of the dense head dims, its MLP (a multiple of 16) setting the MACs within 2 % of
    `ratio`, random weights, each timed against dense. Returns the fastest and how many were timed."""
    base, dense_macs = dense.config.to_dict(), count_macs(dense)
    shapes = []
    for embed in range(64, dense.config.hidden_size + 1, 16):
        for heads in range(1, dense.config.num_attention_heads + 1):
            dims = {"hidden_size": embed, "block_dim": embed, "num_attention_heads": heads}
            candidates = []  # (MACs ratio, config) for every MLP width
            for mlp in range(16, 2 * dense.config.intermediate_size + 1, 16):
                config = PrunedViTConfig(**{**base, **dims, "intermediate_size": mlp})
                candidates.append((count_macs(config) / dense_macs, config))
            macs_ratio, config = min(candidates, key=lambda candidate: abs(candidate[0] - ratio))
            if abs(macs_ratio - ratio) <= 0.02:
                shapes.append((macs_ratio, config))
    speedups = []
    for start in range(0, len(shapes), 4):  # dense timed beside every few shapes, as drift affects both alike
        models = [PrunedViTForImageClassification(config).eval() for _, config in shapes[start : start + 4]]
        dense_s, *seconds = compare_latency([dense, *models], args.batch_size, args.repeats)
        speedups += [dense_s / s for s in seconds]
    best = max(range(len(shapes)), key=speedups.__getitem__)
    macs_ratio, config = shapes[best]
    return {
        "shapes": len(shapes),
        "dims": f"E={config.hidden_size}, heads={config.num_attention_heads}, mlp={config.intermediate_size}",
        "macs_ratio": macs_ratio,
        "speedup": speedups[best],
    }


def nvit_latency_row(dense, calibration, args) -> dict:
    """NViT to 50 % of the dense latency priced by a table measured here, against dense and against NViT to the same
    MACs without the table (the latency-aware scores should buy speed the MACs-only ones do not)."""
    start = time.perf_counter()
    table = LatencyTable.measure(
        dense.config, batch_size=args.batch_size, grid=args.latency_grid, repeats=args.latency_repeats
    )
    table_seconds = time.perf_counter() - start
    aware = prune(dense, "nvit", target_latency_ratio=0.5, latency_model=table, dataloader=calibration)
    macs_ratio = count_macs(aware) / count_macs(dense)
    macs_only = prune(dense, "nvit", target_macs_ratio=macs_ratio, dataloader=calibration)
    dense_s, aware_s, macs_only_s = compare_latency([dense, aware, macs_only], args.batch_size, args.repeats)
    return {
        "table_seconds": table_seconds,
        "macs_ratio": macs_ratio,
        "predicted_ratio": table(aware.config) / table(dense.config),
        "macs_only_macs_ratio": count_macs(macs_only) / count_macs(dense),
        "speedup": dense_s / aware_s,
        "macs_only_speedup": dense_s / macs_only_s,
    }


def write_results(rows: list[dict], dense: dict, extras: dict, args) -> None:
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps({"dense": dense, "rows": rows, **extras}, indent=2))
    stock, nvit, aligned, ceiling = extras["stock"], extras.get("nvit_latency"), extras["alignment"], extras["ceiling"]
    lines = [
        "# Benchmark results",
        "",
        f"Measured by `make bench` (`python benchmarks/run.py`) on {args.machine}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Model: the shipped digits ViT (`hf_vitprune/sample_model`), dense "
        f"top-1 {dense['top1']:.4f}, {dense['macs'] / 1e6:.1f} M MACs, {dense['params'] / 1e6:.3f} M params. "
        f"Fine-tune: {args.finetune_steps} steps (10 % warm-up, then cosine) of soft distillation from the dense "
        f"model. Latency: batch {args.batch_size}, median of {args.repeats}, each model timed alternately with the "
        "dense one, the order reversed every other repeat; "
        + (
            "glibc's malloc tuned to keep freed memory (`tune_cpu_allocator`), so no pass page-faults on its "
            "activations."
            if extras["allocator_tuned"]
            else "the C library's default allocator."
        ),
        "",
        "| method | target MACs | MACs kept | params kept | one-shot top-1 | fine-tuned top-1 | speed-up vs dense "
        "| prune time (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['target']:.0%} | {row['macs'] / dense['macs']:.1%} | "
            f"{row['params'] / dense['params']:.1%} | {row['one_shot_top1']:.4f} | {row['finetuned_top1']:.4f} | "
            f"{row['speedup']:.2f}x | {row['prune_seconds']:.1f} | {row['peak_memory_mb']:.0f} |"
        )
    lines += [
        "",
        f"PrunedViT vs transformers' ViTForImageClassification of the same dims ({stock['dims']}): "
        f"{stock['pruned_vit_s'] * 1e3:.1f} ms vs {stock['stock_vit_s'] * 1e3:.1f} ms per batch "
        f"({stock['pruned_vit_s'] / stock['stock_vit_s'] - 1:+.1%}).",
        "",
        "Magnitude to 50 % of the MACs with the default aligned widths (`round_to` 8; embedding "
        f"{aligned['aligned']['embed']}, MLP {aligned['aligned']['mlp']}): {aligned['aligned']['speedup']:.2f}x "
        f"faster than dense; with `round_to=1` (embedding {aligned['unaligned']['embed']}, MLP "
        f"{aligned['unaligned']['mlp']}): {aligned['unaligned']['speedup']:.2f}x.",
        "",
        f"The fastest of {ceiling['shapes']} uniform shapes at 50 % of the MACs (embedding 64-128, 1-4 heads, MLP "
        f"setting the MACs; random weights): {ceiling['dims']} at {ceiling['macs_ratio']:.1%} of the MACs, "
        f"{ceiling['speedup']:.2f}x faster than dense.",
    ]
    if nvit is not None:
        lines += [
            "",
            f"NViT to 50 % of the dense latency (a `LatencyTable` measured here in {nvit['table_seconds']:.0f} s): "
            f"{nvit['speedup']:.2f}x faster than dense (the table predicted {1 / nvit['predicted_ratio']:.2f}x) at "
            f"{nvit['macs_ratio']:.1%} of its MACs; NViT to the same "
            f"MACs without the table ({nvit['macs_only_macs_ratio']:.1%}): {nvit['macs_only_speedup']:.2f}x.",
        ]
    if "savit_hessian_cost" in extras:
        lines += [
            "",
            f"SAViT's Hessian pass costs {extras['savit_hessian_cost']:.1f}x a plain training step per batch "
            f"(`hessian_cost_ratio`, batch {args.batch_size}).",
        ]
    default, tuned = extras["allocator"]["default"], extras["allocator"]["tuned"]
    lines += [
        "",
        f"The dense model in a fresh process, batch {args.batch_size}, median of {args.repeats}: under the C library's "
        f"default malloc {default['faults_per_pass']:,.0f} page faults and {default['seconds'] * 1e3:.1f} ms per "
        f"pass; after `tune_cpu_allocator()` (applied: {extras['allocator']['applied']}) "
        f"{tuned['faults_per_pass']:,.0f} and {tuned['seconds'] * 1e3:.1f} ms.",
    ]
    lines += ["", "![accuracy vs MACs](accuracy_vs_macs.png)"]
    (output / "RESULTS.md").write_text("\n".join(lines) + "\n")
    plot(rows, dense, output / "accuracy_vs_macs.png")


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, key, title in ((axes[0], "one_shot_top1", "one-shot"), (axes[1], "finetuned_top1", "fine-tuned")):
        for method in dict.fromkeys(row["method"] for row in rows):
            points = sorted((r["macs"] / dense["macs"], r[key]) for r in rows if r["method"] == method)
            axis.plot(*zip(*points), marker="o", label=method)
        axis.axhline(dense["top1"], color="grey", linestyle="--", label="dense")
        axis.set_xlabel("MACs kept (fraction of dense)")
        axis.set_title(title)
    axes[0].set_ylabel("top-1 (digits validation)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *TP_METHODS])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latency-grid", type=int, default=4, help="points per axis of NViT's latency table")
    parser.add_argument("--latency-repeats", type=int, default=5, help="sweeps of the latency table's grid")
    parser.add_argument("--output-dir", default=str(BENCH_DIR))
    parser.add_argument("--machine", default=f"{psutil.cpu_count()} CPU cores")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS) - set(TP_METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted([*METHODS, *TP_METHODS])}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tuned = tune_cpu_allocator()  # time the models, not the page faults of glibc's default malloc
    torch.manual_seed(0)
    dense_model = load_sample_model().eval()
    with tempfile.TemporaryDirectory() as tmp:
        train_loader, val_loader = digits_dataloaders(
            Path(tmp) / "digits",
            dense_model.image_processor,
            batch_size=args.batch_size,
            model_config=dense_model.config,
        )
        calibration = [batch for _, batch in zip(range(args.calibration_batches), train_loader)]
        dense = {
            "top1": evaluate_model(dense_model, val_loader)["top_1_accuracy"],
            "macs": count_macs(dense_model),
            "params": count_params(dense_model),
        }
        rows = []
        for ratio in args.ratios:
            for name in args.methods:
                logger.info("%s at %.0f%% of dense MACs", name, 100 * ratio)
                row, student = run_one(name, dense_model, ratio, calibration, train_loader, val_loader, args)
                dense_s, pruned_s = compare_latency(
                    [dense_model, inference_model(student, args.batch_size)], args.batch_size, args.repeats
                )
                row["speedup"] = dense_s / pruned_s
                rows.append(row)
        extras = {
            "allocator_tuned": tuned,
            "allocator": allocator_row(args),
            "stock": stock_vit_row(dense_model, 0.5, args),
            "alignment": alignment_row(dense_model, 0.5, args),
            "ceiling": uniform_ceiling_row(dense_model, 0.5, args),
        }
        if "nvit" in args.methods:
            extras["nvit_latency"] = nvit_latency_row(dense_model, calibration, args)
        if "savit" in args.methods:
            extras["savit_hessian_cost"] = hessian_cost_ratio(dense_model, calibration[0])
    write_results(rows, dense, extras, args)
    print((Path(args.output_dir) / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

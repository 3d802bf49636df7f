"""Prune a ViT with NViT (Yang et al., CVPR 2023), fine-tune it with distillation, evaluate, save the Hub folder.

    accelerate launch --config_file recipes/configs/accelerate_1node_8gpu.yaml recipes/prune_nvit.py \
        --config recipes/configs/nvit_b.yaml --output_dir runs/nvit-b

NViT scores every unit with its Hessian-aware saliency (squared Taylor, averaged over the `--num_score_batches`
scoring batches), then removes hardware-aligned groups of embedding channels, heads, Q/K and V dims and MLP neurons
in one latency-aware ranking over all layers until the target is met. Pruning here is one-shot; the paper prunes
while training (`hf_vitprune.methods.nvit.NViTCallback` does that in `transformers.Trainer`). A latency target is
priced by a table of block latencies, loaded (NViT's own `latency_head.json` or a `hf_vitprune.latency.LatencyTable`
file) or measured on this device before pruning (written to `--latency_table`, default
`<output_dir>/latency_table.json`):

    accelerate launch recipes/prune_nvit.py --config recipes/configs/nvit_b.yaml --output_dir runs/nvit-b-lat \
        --target_latency_ratio 0.54 --latency_table latency_head.json

The original's flags, renamed for what they do: `--target_latency_ratio` (`--latency_target`; replaces
`--target_macs_ratio`), `--latency_regularization` (same name, here per fraction of the dense cost, so one value
fits any table and the MACs model), `--round_to` (the hard-coded 16/2/8/8/16 group sizes; default: scaled to the
model), `--num_score_batches` (`--interval_prune`: batches of saliency before a pruning step), the `--parent_kl_*`
flags (the full-model KL to the dense parent of NViT's fine-tuning). Other `NViTConfig` options (`criterion_scale`,
`num_batches`) go in `--method_options`. Under several processes each one scores its shard, the saliency is
all-reduced and every process prunes the same groups; the main process measures the latency table.
"""

import argparse
import json
from pathlib import Path

from hf_vitprune.evaluation import tune_cpu_allocator
from hf_vitprune.latency import FORMAT, LatencyTable
from hf_vitprune.methods.nvit import NVIT_KINDS
from hf_vitprune.recipes import PruneFn, TargetFn, add_common_args, method_prune_fn, parse_args, run


def build_parser() -> argparse.ArgumentParser:
    """The common recipe arguments and NViT's (defaults: `NViTConfig`)."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    group = parser.add_argument_group("NViT", "options of NViTConfig; not given = its default")
    group.add_argument("--kinds", nargs="+", choices=NVIT_KINDS, help="structures to prune (default: all five)")
    group.add_argument(
        "--round_to", type=json.loads, help="units removed together: an int, or per kind as JSON, e.g. '{\"mlp\": 16}'"
    )
    group.add_argument("--latency_regularization", type=float, help="eta, weight of the cost a unit saves (1e-5)")
    group.add_argument("--target_latency_ratio", type=float, help="fraction of the dense latency to keep")
    group.add_argument("--latency_table", help="latency table JSON: NViT's latency_head.json or a LatencyTable file")
    group.add_argument("--measure_latency", action="store_true", help="measure the table here, write --latency_table")
    group.add_argument("--latency_batch_size", type=int, default=64, help="images per timed block forward (64)")
    group.add_argument("--latency_grid", type=int, default=4, help="measured points per table axis (4)")
    return parser


def latency_table_path(args: argparse.Namespace) -> Path:
    return Path(args.latency_table or Path(args.output_dir) / "latency_table.json")


def load_latency_table(path: str | Path, tokens: int) -> LatencyTable:
    """A `LatencyTable` file, or NViT's `latency_head.json` (measured with `tokens` tokens per image)."""
    if json.loads(Path(path).read_text()).get("format") == FORMAT:
        return LatencyTable.load(path)
    return LatencyTable.from_nvit_json(path, tokens=tokens)


def latency_target(args: argparse.Namespace) -> TargetFn | None:
    """`prune()`'s latency target with its table (measured by the main process when asked), or None for MACs."""
    if args.target_latency_ratio is None:
        if args.latency_table or args.measure_latency:
            raise ValueError("--latency_table and --measure_latency need --target_latency_ratio.")
        return None
    if not 0 < args.target_latency_ratio < 1:
        raise ValueError(f"--target_latency_ratio must be in (0, 1), got {args.target_latency_ratio}.")
    path = latency_table_path(args)
    if not (args.measure_latency or path.is_file()):
        raise ValueError(f"no latency table at {path}: pass --latency_table, or --measure_latency to measure one.")

    def targets(model, accelerator) -> dict:
        config = model.config
        if args.measure_latency:
            if accelerator.is_main_process:
                if accelerator.device.type == "cpu":
                    tune_cpu_allocator()  # time blocks, not page faults
                path.parent.mkdir(parents=True, exist_ok=True)
                table = LatencyTable.measure(
                    config, accelerator.device, batch_size=args.latency_batch_size, grid=args.latency_grid
                )
                table.save(path)
            accelerator.wait_for_everyone()
        table = load_latency_table(path, config.num_prefix_tokens + config.num_patches)
        return {"target_latency_ratio": args.target_latency_ratio, "latency_model": table}

    return targets


def nvit_prune_fn(args: argparse.Namespace) -> PruneFn:
    """`prune(model, "nvit", ...)` with the NViT flags, to the latency or the MACs target."""
    options = {"kinds": args.kinds, "round_to": args.round_to, "latency_regularization": args.latency_regularization}
    return method_prune_fn("nvit", args, options, targets=latency_target(args))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    return run(args, prune_fn=nvit_prune_fn(args))


if __name__ == "__main__":
    main()

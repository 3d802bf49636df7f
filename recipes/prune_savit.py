"""Prune a ViT with SAViT (Zheng et al., NeurIPS 2022), fine-tune it with distillation, evaluate, save the Hub folder.

    accelerate launch --config_file recipes/configs/accelerate_1node_8gpu.yaml recipes/prune_savit.py \
        --config recipes/configs/savit_deit_b_50.yaml --output_dir runs/savit-deit-b-50

SAViT scores heads, MLP neurons and embedding channels by their gate Fisher information, estimates the 3x3
cross-component Hessian, and allocates how many units of each component stay under the MACs target by evolution
search (or the exact `--search grid`). The statistics are written to `--importance_to` (default
`<output_dir>/savit_importance.safetensors`) and can be reused by another run with `--importance_from` (add
`--no-need_hessian` to skip scoring altogether).

The knobs of the original `main.py`, renamed for what they do: `--target_macs_ratio` (fraction of MACs *kept*;
SAViT's `--pruning_flops_percentage` was the fraction removed), `--num_score_batches` with
`--per_device_score_batch_size` (`--pruning_feed_percent` of an epoch: 10 % of ImageNet is 4000 batches of 32),
`--tolerance` (`--pruning_flops_threshold`), `--need_hessian`/`--no-need_hessian` (`--need_hessian`),
`--hessian_embed_factor` (`--hessian_embed`), `--protect_fraction` (`--pruning_protect`), `--importance_from`
(`--pruning_pickle_from`, here a safetensors/JSON file, no pickles) and `--importance_to`; `--seed` also seeds the
Hessian's block sampling and the evolution search. Other `SAViTConfig` options (`population_size`,
`num_offspring`, `num_generations`) go in `--method_options`. Under several processes each one scores its shard
of the scoring batches and the statistics are summed, so every process prunes the same units.
"""

import argparse
from pathlib import Path

from hf_vitprune.methods.savit.config import SAVIT_KINDS, SEARCHES
from hf_vitprune.recipes import PruneFn, add_common_args, method_prune_fn, parse_args, run

IMPORTANCE_FILE = "savit_importance.safetensors"


def build_parser() -> argparse.ArgumentParser:
    """The common recipe arguments and SAViT's (defaults: `SAViTConfig`)."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    group = parser.add_argument_group("SAViT", "options of SAViTConfig; not given = its default")
    group.add_argument("--kinds", nargs="+", choices=SAVIT_KINDS, help="components to prune, with 'mlp' (all three)")
    group.add_argument("--search", choices=SEARCHES, help="ratio allocation: evolution strategy (default) or grid")
    group.add_argument("--tolerance", type=float, help="allowed shortfall below the target (1e-3)")
    group.add_argument("--need_hessian", action=argparse.BooleanOptionalAction, help="estimate the Hessian (yes)")
    group.add_argument("--hessian_embed_factor", type=float, help="kappa of the embedding normaliser (6.0)")
    group.add_argument("--protect_fraction", type=float, help="best units of every layer never pruned (0.05)")
    group.add_argument("--importance_from", help="statistics saved by --importance_to (.safetensors or .json)")
    group.add_argument("--importance_to", help=f"write the statistics here (default: <output_dir>/{IMPORTANCE_FILE})")
    return parser


def savit_prune_fn(args: argparse.Namespace) -> PruneFn:
    """`prune(model, "savit", ...)` with the SAViT flags; statistics are saved unless only reused."""
    reuse_only = args.importance_from is not None and args.need_hessian is False
    options = {
        "kinds": args.kinds,
        "search": args.search,
        "tolerance": args.tolerance,
        "need_hessian": args.need_hessian,
        "hessian_embed_factor": args.hessian_embed_factor,
        "protect_fraction": args.protect_fraction,
        "importance_from": args.importance_from,
        "importance_to": None if reuse_only else args.importance_to or str(Path(args.output_dir) / IMPORTANCE_FILE),
        "seed": args.seed,
    }
    return method_prune_fn("savit", args, options)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    return run(args, prune_fn=savit_prune_fn(args))


if __name__ == "__main__":
    main()

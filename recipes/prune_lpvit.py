"""Prune a ViT with LPViT (Xu et al., ECCV 2024) block sparsity, fine-tune with distillation, evaluate, save the model.

    accelerate launch --config_file recipes/configs/accelerate_1node_8gpu.yaml recipes/prune_lpvit.py \
        --config recipes/configs/lpvit_deit_b_50.yaml --output_dir runs/lpvit-deit-b-50

LPViT ranks the weight blocks of every linear layer by Taylor saliency on the scoring batches, allocates a block
sparsity to each layer by rate-distortion (equal slopes of the distortion curves, plus the low-power term) to the
MACs target, masks the blocks and compacts the rows and columns the masks empty (exact). The model keeps its masks
while fine-tuning (masked weights get no gradient) and in the Hub folder (`from_pretrained` restores them).
`--lpvit_masks` applies a mask file of the official repository instead of pruning, then fine-tunes:

    python recipes/prune_lpvit.py --model_name_or_path timm/deit_base_distilled_patch16_224 \
        --lpvit_masks rd_curves/0/sp0.50_deit_base_distilled_patch16_224_..._block32x32_..._mask_.pt ...

The original `prune_vit.py` flags, renamed for what they do: `--target_macs_ratio` (`--amount` with
`--flop_budget`: fraction of MACs kept, counted here with attention and without the x1000 classifier),
`--block_size` (`--blocksize`), `--num_score_batches` x `--per_device_score_batch_size` (`--calib_size`),
`--second_order`, `--smooth` (`--smooth_curve --smooth w`; 0 turns it off), `--derivative_h` (`--h`),
`--lambda_power`, `--min_density` (`--min_sp`). Other `LPViTConfig` options (`kinds`, `second_order_mode`,
`damping`, `num_points`) go in `--method_options`. Under several processes each one computes calibration gradients
on its shard and they are summed, so every process selects the same masks.
"""

import argparse

from hf_vitprune.convert import from_lpvit_masks
from hf_vitprune.methods.lpvit import LAYER_TYPES, LPViTConfig, compact_block_sparse
from hf_vitprune.methods.lpvit.config import POWER_SIGNS, RANKINGS
from hf_vitprune.recipes import PruneFn, add_common_args, merge_method_options, method_prune_fn, parse_args, run


def build_parser() -> argparse.ArgumentParser:
    """The common recipe arguments and LPViT's (defaults: `LPViTConfig`)."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    group = parser.add_argument_group("LPViT", "options of LPViTConfig; not given = its default")
    group.add_argument(
        "--block_size", type=int, nargs="+", help="rows [cols] of a weight block (default: 32 from width 768, else 16)"
    )
    group.add_argument("--layers", nargs="+", choices=LAYER_TYPES, help="layer types to prune (qkv o_proj fc1 fc2)")
    group.add_argument("--ranking", choices=RANKINGS, help="block score (taylor)")
    group.add_argument("--second_order", action=argparse.BooleanOptionalAction, help="second-order distortion (no)")
    group.add_argument("--smooth", type=float, help="EMA weight of the distortion curves (0.5); 0 turns it off")
    group.add_argument("--derivative_h", type=int, help="half-width of the curves' numerical derivative (4)")
    group.add_argument("--lambda_power", type=float, help="weight of the power term (1.0); 0 turns it off")
    group.add_argument("--power_sign", choices=POWER_SIGNS, help="what the power proxy grows with (pruned)")
    group.add_argument("--min_density", type=float, help="fraction of blocks every layer keeps at least (0.05)")
    group.add_argument("--lpvit_masks", help="an official LPViT mask file to apply instead of pruning")
    return parser


def lpvit_prune_fn(args: argparse.Namespace) -> PruneFn:
    """`prune(model, "lpvit", ...)` with the LPViT flags, or the masks of `--lpvit_masks` applied and compacted."""
    block_size = args.block_size  # a list from the command line, an int or a list from a config file
    options = {
        "block_size": block_size[0] if isinstance(block_size, list) and len(block_size) == 1 else block_size,
        "layers": args.layers,
        "ranking": args.ranking,
        "second_order": args.second_order,
        "smooth": args.smooth,
        "derivative_h": args.derivative_h,
        "lambda_power": args.lambda_power,
        "power_sign": args.power_sign,
        "min_density": args.min_density,
    }
    if args.lpvit_masks is None:
        return method_prune_fn("lpvit", args, options)
    config = LPViTConfig(**merge_method_options(args, options))

    def apply_masks(model, dataloader, accelerator):
        masked = from_lpvit_masks(args.lpvit_masks, model, block_size=config.block_size)
        return compact_block_sparse(masked, config.kinds)[0], None

    return apply_masks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    return run(args, prune_fn=lpvit_prune_fn(args))


if __name__ == "__main__":
    main()

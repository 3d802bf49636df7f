"""Prune a ViT with first-order Taylor importance to a MACs target, fine-tune with distillation from the dense
model, evaluate, and save the Hub-ready folder: the reference thin wrapper over `hf_vitprune.recipes.run`.

    accelerate launch recipes/prune_taylor.py --target_macs_ratio 0.5 --num_train_epochs 30

Method options (`hf_vitprune.methods.TaylorConfig`) go in `--method_options '{"kinds": ["embed", "head", "mlp"]}'`.
"""

import argparse

from hf_vitprune.recipes import add_common_args, method_prune_fn, parse_args, run


def main(argv: list[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parse_args(parser, argv)
    return run(args, prune_fn=method_prune_fn("taylor", args))


if __name__ == "__main__":
    main()

"""Fine-tune an already pruned (or any) ViT with distillation, then evaluate and save the Hub-ready folder.

    accelerate launch recipes/finetune.py --model_name_or_path output/nvit-b/model \
        --teacher_name_or_path facebook/deit-base-distilled-patch16-224 --num_train_epochs 30

Arguments: `hf_vitprune.recipes.add_common_args` (`--help`); `--config` reads them from a YAML/JSON file.
"""

import argparse

from hf_vitprune.recipes import add_common_args, parse_args, run


def main(argv: list[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run(parse_args(parser, argv))


if __name__ == "__main__":
    main()

"""`hf-vitprune convert`, `hf-vitprune eval` and `hf-vitprune push`: from a model or a paper's checkpoint to a
Hub-ready folder, its measured accuracy/cost in the card, and one commit on the Hub."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: `--from` choice -> converter in `hf_vitprune.convert` for the papers' released checkpoints.
PAPER_CONVERTERS = {"nvit": "from_nvit_checkpoint", "savit": "from_savit_checkpoint", "lpvit": "from_lpvit_masks"}
SOURCES = ("hf", "timm", *PAPER_CONVERTERS)


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert", help="write a Hub-ready PrunedViT folder from a ViT or a paper's released checkpoint"
    )
    convert.add_argument("--from", dest="source_type", required=True, choices=SOURCES, help="kind of source")
    convert.add_argument(
        "source", help="hf: Hub id or folder; timm: model name; nvit/savit: checkpoint .pth; lpvit: mask file"
    )
    convert.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    convert.add_argument(
        "--base-model",
        help="the dense model the paper pruned (Hub id, folder or timm name): required for lpvit (its masks "
        "apply to it); for nvit/savit, shown as base model with its dims beside the pruned ones",
    )
    convert.add_argument("--reported-top1", type=float, help="top-1 accuracy reported in the paper, in percent")
    convert.add_argument("--reported-top5", type=float, help="top-5 accuracy reported in the paper, in percent")
    convert.add_argument("--license", help="licence id for the card (default: the released checkpoint's licence)")
    convert.add_argument("--model-name", help="card title and model-index name")
    convert.add_argument("--repo-id", help="Hub id shown in the card's loading snippets")
    convert.add_argument("--random-init", action="store_true", help="timm: do not load pretrained weights")
    convert.set_defaults(func=run_convert)

    evaluation = subparsers.add_parser("eval", help="top-1/top-5 accuracy, MACs, params and latency of a model")
    evaluation.add_argument("--model", required=True, help="a folder, a Hub id, or a timm model name")
    evaluation.add_argument("--data", required=True, help="an imagefolder directory or a dataset id")
    evaluation.add_argument("--split", default="validation")
    evaluation.add_argument("--batch-size", type=int, default=64)
    evaluation.add_argument("--max-samples", type=int, help="evaluate the first N images only")
    evaluation.add_argument("--latency-repeats", type=int, default=10, help="timed batches (0: skip latency)")
    evaluation.add_argument(
        "--write-card", action="store_true", help="write the results into the model folder's card (model-index)"
    )
    evaluation.set_defaults(func=run_eval)

    push = subparsers.add_parser("push", help="upload a Hub-ready folder to a model repo in one commit")
    push.add_argument("folder")
    push.add_argument("repo_id", help="owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--dry-run", action="store_true", help="check the folder and list the files, no network")
    push.set_defaults(func=run_push)


def _load_pruned_vit(name: str, pretrained: bool = True):
    """`name` (folder, Hub id, timm name) as a PrunedViT with its image processor attached."""
    from .. import to_pruned_vit
    from .prune import load_model

    model, processor, _ = load_model(name, pretrained=pretrained)
    return to_pruned_vit(model, image_processor=processor)


def _reported(args: argparse.Namespace) -> dict[str, float] | None:
    reported = {}
    for k, value in ((1, args.reported_top1), (5, args.reported_top5)):
        if value is not None:
            if not 0 <= value <= 100:
                raise ValueError(f"--reported-top{k} is a percentage in [0, 100], got {value}.")
            reported[f"top_{k}_accuracy"] = value / 100
    return reported or None


def run_convert(args: argparse.Namespace) -> int:
    from .. import convert as converters
    from ..cost import count_macs, count_params
    from ..hub import is_repo_id, save_hub_folder

    card = {"license": args.license, "model_name": args.model_name, "repo_id": args.repo_id}
    card["reported"] = _reported(args)
    if args.source_type in PAPER_CONVERTERS:
        converter = getattr(converters, PAPER_CONVERTERS[args.source_type], None)
        if converter is None:
            print(
                f"hf-vitprune convert: the {args.source_type} converter (hf_vitprune.convert."
                f"{PAPER_CONVERTERS[args.source_type]}) is not available in this version of hf_vitprune.",
                file=sys.stderr,
            )
            return 2
        if not Path(args.source).is_file():
            raise FileNotFoundError(f"{args.source} is not a file ({args.source_type} checkpoint expected).")
        base = _load_pruned_vit(args.base_model, not args.random_init) if args.base_model else None
        if args.source_type == "lpvit":
            if base is None:
                raise ValueError("--from lpvit needs --base-model: the dense model LPViT's masks were made for.")
            model = converter(args.source, base, image_processor=base.image_processor)
        else:
            model = converter(args.source)
        card.update(method=args.source_type, dense_config=base.config if base is not None else None)
        if base is not None and is_repo_id((base.config.pruning or {}).get("source")):
            card["base_model"] = base.config.pruning["source"]
    else:
        name = f"timm/{args.source.removeprefix('timm/')}" if args.source_type == "timm" else args.source
        model = _load_pruned_vit(name, pretrained=not args.random_init)
        card["dense_config"] = model.config
    folder = save_hub_folder(model, args.output, **card)
    print(f"MACs: {count_macs(model) / 1e9:.4f} G, Params: {count_params(model) / 1e6:.4f} M")
    print(f"Wrote {folder}; publish with: hf-vitprune push {args.output} <owner>/<name>")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..cost import count_macs, count_params
    from ..data import load_image_dataset
    from ..evaluation import evaluate_model, measure_latency
    from ..hub import update_card_results, write_model_card

    if args.write_card and not Path(args.model).is_dir():
        raise ValueError(f"--write-card needs --model to be a local folder, got {args.model!r}.")
    if args.latency_repeats < 0:
        raise ValueError(f"--latency-repeats must be >= 0, got {args.latency_repeats}.")
    model = _load_pruned_vit(args.model)
    dataset = load_image_dataset(args.data, args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    results = evaluate_model(model, dataset, batch_size=args.batch_size)
    for key, value in results.items():
        if key != "num_samples":
            print(f"{key.replace('_', ' ').replace('top ', 'top-', 1)}: {100 * value:.2f}%")
    print(f"samples: {results['num_samples']} ({args.data}, split {args.split})")
    print(f"MACs: {count_macs(model) / 1e9:.4f} G")
    print(f"Params: {count_params(model) / 1e6:.4f} M")
    latency = None
    if args.latency_repeats:
        seconds = measure_latency(model, batch_size=args.batch_size, repeats=args.latency_repeats)
        device = str(next(model.parameters()).device)
        latency = {"seconds": seconds, "batch_size": args.batch_size, "device": device}
        print(f"Latency: {1000 * seconds:.2f} ms per batch of {args.batch_size} on {device} (median)")
    if args.write_card:
        card = {"dataset": args.data, "split": args.split, "latency": latency}
        if (Path(args.model) / "README.md").is_file():
            update_card_results(args.model, results, **card)
        else:
            write_model_card(args.model, model, metrics=results, **card)
        print(f"Wrote the results into {Path(args.model) / 'README.md'}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from ..hub import DEFAULT_COMMIT_MESSAGE, push

    message = args.commit_message or DEFAULT_COMMIT_MESSAGE
    files = push(args.folder, args.repo_id, private=args.private, commit_message=message, dry_run=args.dry_run)
    verb = "Would upload" if args.dry_run else "Uploaded"
    print(f"{verb} {len(files)} files to https://huggingface.co/{args.repo_id} in one commit:")
    for name in files:
        print(f"  {name}")
    return 0

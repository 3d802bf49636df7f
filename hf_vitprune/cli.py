"""`hf-vitprune`: the command line. Each module of `hf_vitprune.commands` adds its subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vitprune", description="Structured pruning of Vision Transformers.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; errors in user input exit with a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    from .evaluation import tune_cpu_allocator

    tune_cpu_allocator()  # CPU forward passes (and `eval`'s latency) without a page fault per activation
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.exit(2, f"hf-vitprune {args.command}: error: {error}\n")


if __name__ == "__main__":
    raise SystemExit(main())

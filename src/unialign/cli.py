"""``unialign`` command line: train, methods, data, eval, demo."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unialign`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args) or 0
    except (ValueError, OSError, TypeError) as err:  # user errors: one clear line, no traceback
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="unialign", description="Align language models: UNA, RAO, TPO, DPO and more.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(title="commands")

    train = sub.add_parser(
        "train",
        help="train with a YAML config",
        description="Train a model. Any config key can be "
        "overridden as key=value, e.g. `unialign train quickstart.yaml beta=0.1 max_steps=20`.",
    )
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key=value pairs that replace the file's values")
    train.add_argument("-v", "--verbose", action="store_true")
    train.set_defaults(func=_train)

    methods = sub.add_parser("methods", help="list methods with their data formats and defaults")
    methods.set_defaults(func=_methods)
    return parser


def _train(args) -> int:
    from unialign.pipeline import train

    result = train(args.config, **_overrides(args.overrides))
    print(f"model saved to {result.model_dir}")
    print(f"metrics in {result.output_dir / 'metrics.jsonl'}")
    return 0


def _overrides(items: list[str]) -> dict:
    from unialign.config import parse_overrides

    return parse_overrides(items)


def _methods(args) -> int:
    from unialign.losses.registry import all_methods

    for method in all_methods():
        ref = "reference" if method.needs_reference else "no reference"
        defaults = ", ".join(f"{k}={v}" for k, v in method.defaults.items())
        print(f"{method.name:<14} {'/'.join(method.formats):<28} {ref:<13} {defaults}")
        print(f"{'':<14} {method.summary} [{method.paper}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

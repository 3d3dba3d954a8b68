"""The ``reslab`` command line: thin wrappers that parse arguments and call the library.

Each subcommand lives in the module that owns its library code and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (subcommand, module defining add_parser/run). Imported lazily so `reslab summary` does not pay
# for the trainer's imports.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("summary", "reslab.commands.summary"),
    ("list", "reslab.commands.summary"),
    ("analyze", "reslab.commands.analyze"),
    ("train", "reslab.commands.train"),
    ("eval", "reslab.commands.train"),
    ("finetune", "reslab.commands.finetune"),
    ("predict", "reslab.commands.predict"),
    ("export", "reslab.commands.export"),
]

DEFAULT_COMMAND = ["train"]  # the README's main job: a small ResNet on the bundled digits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab", description="Residual networks: model zoo, training and analysis."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen: set[str] = set()
    for _, module in SUBCOMMANDS:
        if module in seen:
            continue
        seen.add(module)
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = list(DEFAULT_COMMAND)
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    # OSError: missing files, but also e.g. --out under an existing file (NotADirectoryError)
    except (ValueError, OSError) as exc:
        print(f"reslab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

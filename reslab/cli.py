"""The ``reslab`` command line: thin wrappers that parse arguments and call the library.

Each subcommand lives in the module that owns its library code and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
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
    ("data", "reslab.commands.data"),
]

# exit status 128 + SIGPIPE (141), as for any program a closed pipe stops
SIGPIPE = int(getattr(signal, "SIGPIPE", 13))
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
    """Run one command; returns the exit status (argparse's own exits included: 2 for a usage
    error, 0 for --help), so tests and callers never see SystemExit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _dispatch(argv or list(DEFAULT_COMMAND))
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here for buffered output
        return status
    except BrokenPipeError:
        # The reader went away (`reslab list | head -3`): stop quietly, as a program killed by
        # SIGPIPE would. Python ignores SIGPIPE, so point stdout at /dev/null, else the flush at
        # exit fails a second time (recipe of the `signal` module's docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + SIGPIPE


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error or the help already
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise
    # OSError: missing files, but also e.g. --out under an existing file (NotADirectoryError), a
    # full disk (reslab._io.WriteError) or a run folder in use (FolderLockedError)
    except (ValueError, OSError) as exc:
        print(f"reslab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (loading data, evaluating): no traceback
        print(f"reslab {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

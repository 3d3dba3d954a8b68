"""Progress bars (tqdm) for training, evaluation and the experiments: on a terminal or on request.

A bar on a log file or a test's captured output is noise, so bars are off unless standard error
is a terminal. ``enabled=True`` (the API) or ``RESLAB_PROGRESS=1`` (the environment) asks for
them anyway; ``RESLAB_PROGRESS=0`` turns them off on a terminal too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["ENV", "progress_bar", "wants_progress", "write_line"]

ENV = "RESLAB_PROGRESS"
T = TypeVar("T")


def wants_progress(enabled: bool | None = None) -> bool:
    """Whether to draw bars: ``enabled`` if given, else ``RESLAB_PROGRESS`` (0/1) if set, else
    whether standard error is a terminal."""
    if enabled is not None:
        return enabled
    env = os.environ.get(ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return sys.stderr.isatty()


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on standard error, drawn only where :func:`wants_progress` says so (a disabled
    tqdm still iterates and counts, at no cost)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not wants_progress(enabled),
        file=sys.stderr,
        dynamic_ncols=True,
        **kwargs,
    )


def write_line(*values: object) -> None:
    """``print`` to standard output without tearing a progress bar drawn on the terminal."""
    with tqdm.external_write_mode():
        print(*values, flush=True)

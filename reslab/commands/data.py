"""``reslab data info`` and ``reslab data pack``: what reslab sees in a data source, and a
resized, sharded copy of it for fast repeated epochs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from reslab.commands.options import (
    image_side,
    jpeg_quality,
    pack_side,
    positive_int,
    process_count,
)
from reslab.data.feed import choose_loader
from reslab.data.images import Limits
from reslab.data.index import SourceIndex, index_source
from reslab.data.shards import PackConfig, pack


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="inspect or pack an image data source",
        description="Inspect an image data source, or pack a resized copy as shards.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = dsub.add_parser(
        "info", help="splits, classes, counts, sizes and the loader reslab picks"
    )
    info.add_argument(
        "src", help="image folder or .zip (train/, val/, test/), CSV/TSV list, or shards"
    )
    info.add_argument(
        "--image-size",
        type=image_side,
        default=None,
        help="the model's input side, for the loader choice",
    )
    pk = dsub.add_parser("pack", help="write a resized copy as tar shards (WebDataset layout)")
    pk.add_argument("src", help="image folder or .zip, or CSV/TSV list")
    pk.add_argument("dest", help="folder for the shards (created; a rerun resumes)")
    pk.add_argument(
        "--max-side",
        type=pack_side,
        default=None,
        help="longer side at most N pixels (aspect kept); default: sizes unchanged",
    )
    pk.add_argument(
        "--quality",
        type=jpeg_quality,
        default=90,
        help="JPEG quality of resized images (default 90)",
    )
    pk.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard")
    pk.add_argument("--workers", type=process_count, default=None, help="processes (default: CPUs)")
    for q in (info, pk):
        q.add_argument(
            "--skip-bad",
            action="store_true",
            help="leave unreadable images out (listed) instead of stopping",
        )
        q.add_argument(
            "--max-pixels",
            type=positive_int,
            default=Limits().max_pixels,
            help="refuse images whose header declares more pixels (default 2**26)",
        )
    p.set_defaults(func=run)


def _report(index: SourceIndex, image_size: int | None) -> None:
    print(f"source: {index.store.root} ({index.store.kind})")
    print(
        f"classes: {len(index.classes)}: {', '.join(index.classes[:12])}"
        + (", ..." if len(index.classes) > 12 else "")
    )
    for name, split in index.splits.items():
        if not len(split):
            continue
        w, h = split.widths, split.heights
        per_class = np.bincount(split.labels, minlength=len(index.classes))[:12]
        counts = ", ".join(str(int(c)) for c in per_class)
        print(
            f"{name}: {len(split):,} images, {w.min()}x{h.min()} to {w.max()}x{h.max()} px, "
            f"{split.nbytes.sum() / 2**20:.1f} MiB; per class: {counts}"
        )
    for line in index.notes:
        print(f"note: {line}")
    if index.skipped:
        print(f"skipped {len(index.skipped)} unreadable image(s):")
        for where, reason in index.skipped:
            print(f"  {where}: {reason}")
    print(f"loader: {choose_loader(index, input_size=image_size)}")


def run(args: argparse.Namespace) -> int:
    limits = Limits(max_pixels=args.max_pixels)
    if args.data_command == "info":
        index = index_source(Path(args.src), limits=limits, skip_bad=args.skip_bad)
        _report(index, args.image_size)
        return 0
    cfg = PackConfig(max_side=args.max_side, quality=args.quality, shard_samples=args.shard_size)
    try:
        index = pack(
            Path(args.src),
            Path(args.dest),
            cfg,
            workers=args.workers,
            skip_bad=args.skip_bad,
            limits=limits,
        )
    except KeyboardInterrupt:
        print(
            "reslab data pack: interrupted; complete shards are kept, rerun to resume",
            file=sys.stderr,
        )
        return 130
    _report(index, None)
    return 0

"""``reslab predict``: top-k classes of image files, folders and globs under a checkpoint, a run
folder, or an exported ``.onnx``/``.pt2`` model. A thin wrapper around
:mod:`reslab.deploy.predict`."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from reslab.commands.options import image_side, positive_int, worker_count

__all__ = ["add_parser", "run_predict"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser(
        "predict",
        help="top-k classes of images under a checkpoint or an exported model",
        description="Print the top-k classes (names stored with the model) and probabilities "
        "of image files, folders (searched recursively) and glob patterns ('**' recursive; "
        "quote them). Images are resized to the model's input size and normalised as in "
        "training; they are decoded in batches by worker processes, never all at once.",
    )
    q.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="checkpoint file, run folder (its best checkpoint), or an exported .onnx/.pt2",
    )
    q.add_argument("images", nargs="+", metavar="IMAGE", help="image file, folder or glob")
    q.add_argument("--topk", type=positive_int, default=5, help="classes per image (default 5)")
    q.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    q.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    q.add_argument(
        "--image-size",
        type=image_side,
        help="side the images are resized to (default: the size the model records: its "
        "per-pixel mean's, else its last training size, else 32 for CIFAR stems, 224 for "
        "ImageNet ones)",
    )
    q.add_argument(
        "--workers",
        type=worker_count,
        default=None,
        help="image-decoding processes (default: up to 4; none for a single batch)",
    )
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per image per line")
    fmt.add_argument("--csv", action="store_true", help="CSV: image, then class/probability pairs")
    q.add_argument(
        "--output", type=Path, metavar="FILE", help="write the results to FILE, not stdout"
    )
    q.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="skip images that cannot be read and list them at the end (default: stop there)",
    )
    q.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from reslab.deploy.predict import expand_images, load_predictor, predict

    files = expand_images(args.images)
    predictor = load_predictor(args.checkpoint, device=args.device, image_size=args.image_size)
    results = predict(
        predictor,
        files,
        topk=args.topk,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_unreadable=args.skip_unreadable,
    )
    skipped = []
    with _sink(args.output) as out:
        writer = csv.writer(out) if args.csv else None
        if writer is not None:
            k = min(args.topk, len(predictor.classes))
            pairs = [(f"class_{r}", f"probability_{r}") for r in range(1, k + 1)]
            writer.writerow(["image", *[c for pair in pairs for c in pair]])
        for r in results:
            if r.error is not None:
                skipped.append(r)
            if args.json:
                out.write(json.dumps(r.to_dict()) + "\n")
            elif r.error is not None:
                continue
            elif writer is not None:
                writer.writerow([r.image, *[v for c, _, p in r.top for v in (c, f"{p:.6g}")]])
            else:
                out.write(r.image + "\n")
                out.writelines(f"  {p:7.2%}  {c}\n" for c, _, p in r.top)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for r in skipped:
            print(f"  {r.error}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _sink(path: Path | None) -> Iterator[TextIO]:
    """stdout, or ``path`` written atomically (no half-written results file on an error)."""
    if path is None:
        yield sys.stdout
        return
    from reslab._io import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        yield f

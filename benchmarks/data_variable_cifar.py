"""Make a variable-size CIFAR-10: every image of a CIFAR-10 JPEG zip resized to a random size and
aspect ratio and re-encoded, in the image-folder layout (train/<class>/, test/<class>/).

Each image gets a shorter side uniform in [32, 128] px and an aspect ratio log-uniform in [1, 2]
(landscape or portrait), drawn from a generator seeded by the image's index and --seed, and is
saved as JPEG quality 90. This is the streaming path's real test set: training on it
at 32 px must end close to training on the original 32x32 images (docs/data.md).

    python benchmarks/data_variable_cifar.py [DEST] [--limit N]

DEST defaults to a new temporary folder (printed); nothing is written inside the project.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import math
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.zip"


def _size(k: int, seed: int) -> tuple[int, int]:
    """(width, height): shorter side uniform in [32, 128], longer = shorter x aspect, aspect
    log-uniform in [1, 2], landscape or portrait with equal odds."""
    rng = np.random.default_rng([seed, k])
    short = round(rng.uniform(32, 128))
    long = round(short * math.exp(rng.uniform(0.0, math.log(2.0))))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _convert(src: str, names: list[tuple[int, str]], dest: str, seed: int) -> int:
    with zipfile.ZipFile(src) as zf:
        for k, name in names:
            split, cls, file = name.split("/")[-3:]
            out = Path(dest) / split / cls / file
            im = Image.open(io.BytesIO(zf.read(name))).convert("RGB")
            im.resize(_size(k, seed), Image.BICUBIC).save(out, quality=90)
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dest", nargs="?", type=Path, default=None)
    ap.add_argument("--src", type=Path, default=CIFAR_ZIP, help="a CIFAR-10 JPEG zip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N images per split")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if not args.src.exists():
        raise SystemExit(f"needs a CIFAR-10 JPEG zip at {args.src}")
    dest = args.dest or Path(tempfile.mkdtemp(prefix="cifar10-variable-"))
    with zipfile.ZipFile(args.src) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
    if args.limit:
        names = [
            n for s in ("/train/", "/test/") for n in [m for m in names if s in m][: args.limit]
        ]
    for name in names:
        (dest / Path(*name.split("/")[-3:-1])).mkdir(parents=True, exist_ok=True)
    jobs = list(enumerate(names))
    chunks = [jobs[i : i + 1000] for i in range(0, len(jobs), 1000)]
    t0 = time.perf_counter()
    from tqdm import tqdm

    with cf.ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), unit="img") as bar:
        futures = [pool.submit(_convert, str(args.src), c, str(dest), args.seed) for c in chunks]
        for f in cf.as_completed(futures):
            bar.update(f.result())
    sizes = np.array([_size(k, args.seed) for k, _ in jobs])
    print(
        f"wrote {len(jobs)} images to {dest} in {time.perf_counter() - t0:.0f} s; widths "
        f"{sizes[:, 0].min()}-{sizes[:, 0].max()}, heights {sizes[:, 1].min()}-{sizes[:, 1].max()}"
    )


if __name__ == "__main__":
    main()

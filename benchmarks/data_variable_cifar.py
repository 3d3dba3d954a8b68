"""Make a variable-size CIFAR-10: every image of a CIFAR-10 JPEG zip resized to a random size and
aspect ratio and re-encoded, in the image-folder layout (train/<class>/, test/<class>/).

Each image gets a shorter side uniform in [32, 128] px and an aspect ratio log-uniform in [1, 2]
(landscape or portrait), drawn from a generator seeded by the image's index and --seed, and is
saved as JPEG quality 90. This is the streaming path's real test set: training on it
at 32 px must end close to training on the original 32x32 images (docs/data.md).

    python benchmarks/data_variable_cifar.py [DEST] [--limit N]
    python benchmarks/data_variable_cifar.py --compare [--epochs 5] [--out RESULT.json]

DEST defaults to a new temporary folder (printed); nothing is written inside the project.

``--compare`` then trains ``cifar_resnet20`` twice, one process after the other, with the same
recipe (``--recipe``, default ``fast``) and budget (``--epochs``): on the variable-size copy through
the streaming path (``--loader stream --image-size 32 --resize none``: each image resized straight
back to 32x32, undoing the random aspect as the images were made), and on the original zip
through the in-memory path. It writes both test accuracies, the commands, wall times and the
machine's load average (``uptime``) to RESULT.json (default
benchmarks/results/data_variable_cifar.json); the run folders go to a temporary folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import math
import os
import subprocess
import sys
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


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _train(name: str, data: Path, flags: list[str], out: Path) -> dict:
    """One `reslab train` process; its command, wall time, load and summary."""
    cmd = [sys.executable, "-m", "reslab", "train", "cifar_resnet20", "--data", str(data),
           *flags, "--out", str(out / name)]  # fmt: skip
    print(" ".join(cmd), flush=True)
    before = _uptime()
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / name / "summary.json").read_text())
    config = json.loads((out / name / "config.json").read_text())
    keep = ("test_accuracy", "test_accuracy_single_view", "val_accuracy", "train_seconds",
            "images_per_second", "steps", "epochs", "loader", "skipped")  # fmt: skip
    return {
        "command": " ".join(["reslab", *cmd[3:-2]]),
        "wall_seconds": round(wall, 1),
        "uptime_before": before,
        "uptime_after": _uptime(),
        "loader": config["data"]["loader"],
        "input": config["data"]["input"],
        **{k: summary[k] for k in keep},
    }


def compare(variable: Path, args: argparse.Namespace) -> None:
    """Train on the variable copy (streamed) and on the original zip (in memory), in turn."""
    from _common import write_result

    runs = Path(tempfile.mkdtemp(prefix="cifar10-compare-"))
    recipe = ["--recipe", args.recipe, *(["--epochs", str(args.epochs)] if args.epochs else [])]
    stream = _train("stream", variable,
                    [*recipe, "--loader", "stream", "--image-size", "32", "--resize", "none"],
                    runs)  # fmt: skip
    memory = _train("memory", args.src, [*recipe, "--loader", "memory"], runs)
    gap = 100 * (memory["test_accuracy"] - stream["test_accuracy"])
    print(f"test accuracy: streamed variable-size {100 * stream['test_accuracy']:.2f}%, "
          f"in-memory original {100 * memory['test_accuracy']:.2f}% (gap {gap:.2f} points); "
          f"wall {stream['wall_seconds']:.0f} s vs {memory['wall_seconds']:.0f} s")  # fmt: skip
    write_result(
        args.out,
        {"benchmark": "data_variable_cifar", "streamed_variable": stream,
         "in_memory_original": memory, "gap_points": round(gap, 2), "run_folders": str(runs)},
        device="cpu",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dest", nargs="?", type=Path, default=None)
    ap.add_argument("--src", type=Path, default=CIFAR_ZIP, help="a CIFAR-10 JPEG zip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N images per split")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compare", action="store_true", help="then train on both, in turn")
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--epochs", type=float, default=None, help="(default: the recipe's)")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_variable_cifar.json"
    )
    args = ap.parse_args()
    if not args.src.exists():
        raise SystemExit(f"needs a CIFAR-10 JPEG zip at {args.src}")
    dest = args.dest or Path(tempfile.mkdtemp(prefix="cifar10-variable-"))
    if args.compare and (dest / "train").is_dir() and args.dest is not None:
        compare(dest, args)  # made before: train only
        return
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
    if args.compare:
        compare(dest, args)


if __name__ == "__main__":
    main()

"""Which choices of the ``fast`` recipe buy accuracy, at equal wall time on CIFAR-10 (JPEG q75).

Each variant is ``TrainConfig.preset("fast", **overrides)`` trained with ``fit`` on
``cifar_resnet20`` in its own process with one thread; ``--parallel 2`` runs two at a time on the
two cores (each then sees the same machine, so their wall times compare). The variants below are
the ones docs/training.md reports: learning rate, batch size, progressive resizing and the mirror
at test time, with lengths chosen so that each takes about the same time.

    .venv/bin/python benchmarks/recipe_compare.py [--parallel 2] [--only NAME ...]

Takes ~35 min for all four on 2 cores. Appends one JSON line per variant to
benchmarks/results/recipe_compare.jsonl and prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.zip"

_COMMON = {"channels_last": True, "compile": False, "eval_test": False, "eval_flip": False}
VARIANTS: dict[str, dict] = {
    "lr0.4_bs256_32px_4ep": {"lr": 0.4, "epochs": 4, "eval_every": 350},
    "lr0.2_bs256_32px_4ep": {"lr": 0.2, "epochs": 4, "eval_every": 350},
    "lr0.2_bs128_32px_4ep": {"lr": 0.2, "batch_size": 128, "epochs": 4, "eval_every": 700},
    # 16 px costs ~0.28 and 24 px ~0.6 of a 32 px step: 6.8 epochs ~ the time of 4 at 32 px
    "lr0.4_bs256_16-24-32px_6.8ep_flip": {
        "lr": 0.4,
        "epochs": 6.8,
        "resolutions": [[0.0, 16], [0.4, 24], [0.7, 32]],
        "eval_every": 600,
        "eval_flip": True,
    },
}


def run_one(name: str) -> dict:
    import torch

    from reslab import create_model
    from reslab.data import load_data
    from reslab.train import TrainConfig, fit

    torch.set_num_threads(1)
    cfg = TrainConfig.preset("fast", **{**_COMMON, "resolutions": (), **VARIANTS[name]})
    splits = load_data(str(CIFAR_ZIP))
    t0 = time.perf_counter()
    s = fit(create_model("cifar_resnet20"), splits, cfg, verbose=True).summary
    return {
        "name": name,
        "overrides": VARIANTS[name],
        "test_accuracy": s["test_accuracy"],
        "test_accuracy_single_view": s["test_accuracy_single_view"],
        "val_accuracy": s["val_accuracy"],
        "wall_seconds": time.perf_counter() - t0,
        "images_per_second": s["images_per_second"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parallel", type=int, default=2, help="variants at a time (1 thread each)")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/recipe_compare.jsonl")
    ap.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)), flush=True)
        return
    if not CIFAR_ZIP.exists():
        raise SystemExit(f"needs the CIFAR-10 JPEG archive at {CIFAR_ZIP}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    todo = list(args.only)
    while todo:
        batch, todo = todo[: args.parallel], todo[args.parallel :]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--one", name],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            for name in batch
        ]
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"variant failed (exit {p.returncode}): {p.args}")
            line = out.strip().splitlines()[-1]
            print(line, flush=True)
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()

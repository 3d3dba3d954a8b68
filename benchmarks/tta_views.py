"""Which test-time views pay: validation accuracy of a trained run's model when its softmax is
averaged over the image, its mirror, and shifted copies (1 or 2 pixels, zero or reflect padding).

    .venv/bin/python benchmarks/tta_views.py runs/r20-fast --data ../shared/data/cifar10-jpeg.zip

Measured on the validation split only (the test set is not used to choose). Prints a table and
writes benchmarks/results/tta_views.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write_result

from reslab.data import load_data
from reslab.train.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
PAD = 2  # the largest shift


def _shifted(x: torch.Tensor, dy: int, dx: int, mode: str) -> torch.Tensor:
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    xp = F.pad(x, (PAD,) * 4, mode=mode)
    return xp[:, :, PAD + dy : PAD + dy + h, PAD + dx : PAD + dx + w]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run folder or checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "tta_views.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.run).to(memory_format=torch.channels_last)
    val = load_data(args.data).val
    one = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    two = [(-2, 0), (2, 0), (0, -2), (0, 2)]
    # view sets: (name, shifts); every shift is taken of the image and of its mirror
    sets = {
        "image": None,
        "image + mirror": [(0, 0)],
        "+ 1 px shifts (10 views)": [(0, 0), *one],
        "+ 2 px shifts (10 views)": [(0, 0), *two],
        "+ 1 and 2 px shifts (18 views)": [(0, 0), *one, *two],
    }
    shifts = [(0, 0), *one, *two]
    table: dict[str, dict[str, float]] = {}
    for mode in ("constant", "reflect"):
        probs: dict[tuple[int, int, bool], list[torch.Tensor]] = {
            (dy, dx, f): [] for dy, dx in shifts for f in (False, True)
        }
        with torch.no_grad():
            for i in range(0, len(val), 500):
                x = model.input_norm(val.images[i : i + 500])
                for dy, dx, f in probs:
                    v = _shifted(x.flip(3) if f else x, dy, dx, mode)
                    logits = model(v.contiguous(memory_format=torch.channels_last))
                    probs[(dy, dx, f)].append(logits.softmax(1))
        joined = {k: torch.cat(v) for k, v in probs.items()}
        for name, view_shifts in sets.items():
            keys = [(0, 0, False)] if view_shifts is None else [
                (dy, dx, f) for dy, dx in view_shifts for f in (False, True)
            ]  # fmt: skip
            pred = sum(joined[k] for k in keys).argmax(1)
            acc = float((pred == val.labels).double().mean())
            table.setdefault(name, {})[mode] = acc

    print(f"{'views':<32} {'zero pad':>9} {'reflect':>9}   (val accuracy, {len(val)} images)")
    for name, row in table.items():
        print(f"{name:<32} {100 * row['constant']:>8.2f}% {100 * row['reflect']:>8.2f}%")
    write_result(
        args.json,
        {"run": str(args.run), "split": "val", "n": len(val), "views": table},
        device="cpu",
    )


if __name__ == "__main__":
    main()

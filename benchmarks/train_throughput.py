"""Images per second of full training steps on CIFAR-10 (JPEG q75), three ways, in one run.

(a) reslab's trainer (``fit`` with the ``fast`` recipe: data on the device, whole-batch crop+flip,
    channels_last, fp32 on this CPU: it has no native bf16), every step at the full 32x32 size
    (the recipe's progressive resizing is switched off here, so all three do the same work);
(b) the bare model step (same compile, precision, layout and batch) on batches augmented
    beforehand, so (a)/(b) shows what the data path costs;
(c) the conventional pipeline most CIFAR repositories use: torchvision ``ImageFolder`` +
    ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``DataLoader(num_workers=2)``,
    fp32, batch 128.

    .venv/bin/python benchmarks/train_throughput.py [--steps 25] [--warmup 5]

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write_result

from reslab import create_model
from reslab.data import Normalize, Split, load_data, random_crop_flip
from reslab.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.zip"
MODELS = ("cifar_resnet20", "cifar_resnet56")


def trainer_rate(model_name: str, splits, cfg: TrainConfig, warmup: int, steps: int) -> float:
    """(a): time the steps of a real ``fit`` call between its on_step callbacks."""
    stamps: list[float] = []
    tiny = Split(splits.val.images[:8], splits.val.labels[:8])  # the final evaluation is untimed
    short = dataclasses.replace(splits, val=tiny, test=tiny)
    cfg = dataclasses.replace(cfg, iters=warmup + steps + 1, eval_every=10**9, eval_test=False)
    fit(
        create_model(model_name),
        short,
        cfg,
        on_step=lambda step, m: stamps.append(time.perf_counter()),
    )
    return steps * cfg.batch_size / (stamps[-1] - stamps[warmup])


def bare_rate(model_name: str, splits, cfg: TrainConfig, warmup: int, steps: int) -> float:
    """(b): forward, backward and SGD step on batches prepared before the clock starts."""
    model = create_model(model_name).train()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    norm = Normalize.fit(splits.train.images, cfg.normalize)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(warmup + steps):
        idx = torch.randint(0, len(splits.train), (cfg.batch_size,), generator=g)
        x = random_crop_flip(splits.train.images[idx], padding=cfg.pad, flip=cfg.flip, generator=g)
        batches.append((norm(x).contiguous(memory_format=fmt), splits.train.labels[idx]))
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    step_model = torch.compile(model) if cfg.compile else model
    dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = step_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def extracted_train_folder(cache: Path) -> Path:
    """The archive's train/ images as files, for ImageFolder (extracted once, outside the repo)."""
    root = cache / "cifar10"
    if not (root / "train").exists():
        with zipfile.ZipFile(CIFAR_ZIP) as zf:
            zf.extractall(
                cache, members=[n for n in zf.namelist() if n.startswith("cifar10/train/")]
            )
    return root / "train"


def conventional_rate(model_name: str, folder: Path, warmup: int, steps: int) -> float:
    """(c): ImageFolder + RandomCrop(32, 4) + RandomHorizontalFlip + DataLoader(2 workers), fp32."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), tf),
        batch_size=128,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=False,
    )
    model = create_model(model_name).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    it = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rate = steps * 128 / (time.perf_counter() - t0)
    del it
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extract-to", type=Path, default=Path("/tmp/reslab-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    if not CIFAR_ZIP.exists():
        raise SystemExit(f"needs the CIFAR-10 JPEG archive at {CIFAR_ZIP}")
    torch.set_num_threads(args.threads)
    splits = load_data(str(CIFAR_ZIP))
    # (b) and (c) run on the CPU: so does (a), whatever else the machine has
    cfg = TrainConfig.preset("fast", threads=args.threads, resolutions=(), device="cpu")
    folder = extracted_train_folder(args.extract_to)
    rows = []
    for name in args.models:
        load_before = os.getloadavg()[0]  # other processes on the machine distort every number
        a = trainer_rate(name, splits, cfg, args.warmup, args.steps)
        b = bare_rate(name, splits, cfg, args.warmup, args.steps)
        c = conventional_rate(name, folder, args.warmup, args.steps)
        rows.append({"model": name, "trainer": a, "bare_step": b, "conventional": c,
                     "trainer_vs_conventional": a / c, "trainer_vs_bare": a / b,
                     "load_average_before_after": [load_before, os.getloadavg()[0]]})  # fmt: skip
        print(f"{name}: (a) {a:.0f}  (b) {b:.0f}  (c) {c:.0f} img/s", flush=True)
    print()
    print("| model | (a) reslab trainer | (b) bare step | (c) ImageFolder+DataLoader fp32 "
          "| (a)/(c) | (a)/(b) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['model']}` | {r['trainer']:.0f} | {r['bare_step']:.0f} | "
              f"{r['conventional']:.0f} | {r['trainer_vs_conventional']:.2f}x | "
              f"{r['trainer_vs_bare']:.2f} |")  # fmt: skip
    result = {
        "unit": "training images per second (forward + backward + SGD step)",
        "settings": {
            "trainer_and_bare": {k: getattr(cfg, k) for k in
                                 ("batch_size", "precision", "channels_last", "compile",
                                  "resolutions")},
            "conventional": {"batch_size": 128, "precision": "fp32", "num_workers": 2},
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "threads": args.threads,
        },
        "rows": rows,
    }  # fmt: skip
    print()
    write_result(args.out, result, device="cpu")


if __name__ == "__main__":
    main()

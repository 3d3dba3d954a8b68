"""Transfer learning on real data: pretrain on five CIFAR-10 classes, fine-tune on the other five
(10% of their training images) and on the 8x8 grey digits (first layer adapted to 1 channel),
each against training from scratch with the same budget. Writes results.json and a figure.

    .venv/bin/python benchmarks/transfer_demo.py            # ~10 min on a 2-core CPU

Accuracy is the test accuracy of the model at each evaluation point; time is the trainer's
training time (``seconds`` in metrics.jsonl: optimiser steps only, evaluation excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from _common import write_result

from reslab import create_model
from reslab.data import load_data
from reslab.train import TrainConfig, fit, resolve_device
from reslab.transfer import FinetuneOptions, finetune

SOURCE = ["airplane", "automobile", "bird", "cat", "deer"]
TARGET = ["dog", "frog", "horse", "ship", "truck"]
MODEL = "cifar_resnet20"
# Measured on this 2-core AMD EPYC (AVX2, no AVX-512): fp32 + channels_last ~105 img/s, bf16
# autocast ~12 img/s for ResNet-20 at batch 128 (with other jobs running), so everything is fp32.
CPU = dict(precision="fp32", channels_last=True, batch_size=128, lr=0.2)


def fewer_test_images(splits: Any, n: int, seed: int = 0) -> Any:
    """A random ``n``-image subset of the test split: evaluation points cost time on 2 cores."""
    if len(splits.test) <= n:
        return splits
    idx = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(seed))[:n]
    test = dataclasses.replace(splits.test, images=splits.test.images[idx],
                               labels=splits.test.labels[idx])  # fmt: skip
    return dataclasses.replace(splits, test=test)


def curve(result: Any) -> list[dict[str, float]]:
    return [
        {"step": h["step"], "seconds": h["seconds"], "test_accuracy": 1 - h["test_error"]}
        for h in result.history
    ]


def first_reaching(points: list[dict[str, float]], accuracy: float) -> dict[str, float] | None:
    """The first evaluation point with test accuracy >= ``accuracy``."""
    return next((p for p in points if p["test_accuracy"] >= accuracy), None)


def _fresh(run_dir: Path) -> Path:
    """This demonstration regenerates its own run folders (the trainer refuses to start a new
    run in a folder that holds one)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def compare(
    name: str,
    splits: Any,
    cfg: TrainConfig,
    source: Path,
    out: Path,
    opts: Any,
    *,
    tag: str = "",
    scratch_curve: list[dict[str, float]] | None = None,
) -> dict:
    print(f"== {name}: fine-tune vs scratch, {len(splits.train)} training images", flush=True)
    tuned = finetune(source, splits, cfg, _fresh(out / f"{name}-finetune{tag}"), options=opts)
    sc = scratch_curve
    if sc is None:
        torch.manual_seed(cfg.seed)
        net = create_model(MODEL, num_classes=splits.num_classes, in_channels=splits.in_channels)
        sc = curve(fit(net, splits, cfg, _fresh(out / f"{name}-scratch")))
    ft = curve(tuned)
    reach = first_reaching(ft, sc[-1]["test_accuracy"])
    return {
        "train_images": len(splits.train),
        "test_images": len(splits.test),
        "train_config": cfg.to_dict(),
        "finetune": ft,
        "scratch": sc,
        "scratch_final_accuracy": sc[-1]["test_accuracy"],
        "finetune_final_accuracy": ft[-1]["test_accuracy"],
        "finetune_seconds_to_scratch_final": None if reach is None else reach["seconds"],
        "finetune_steps_to_scratch_final": None if reach is None else reach["step"],
        "scratch_seconds": sc[-1]["seconds"],
        "scratch_steps": sc[-1]["step"],
        "fraction_of_scratch_time": None if reach is None else reach["seconds"] / sc[-1]["seconds"],
        "fraction_of_scratch_steps": None if reach is None else reach["step"] / sc[-1]["step"],
    }


def plot(results: dict, path: Path) -> None:
    """Test accuracy against training time (top) and against optimiser steps (bottom): the
    runs share the CPU with other jobs, so seconds per step vary between runs; steps do not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    for col, task in enumerate(("cifar5", "digits")):
        r = results[task]
        for row, (x, label) in enumerate((("seconds", "training time (s, 2-core CPU)"),
                                          ("step", "optimiser steps"))):  # fmt: skip
            ax = axes[row, col]
            for key, style in (("finetune", "o-"), ("scratch", "s--")):
                pts = r[key]
                ax.plot([p[x] for p in pts], [100 * p["test_accuracy"] for p in pts], style,
                        ms=3, label=key)  # fmt: skip
            ax.axhline(100 * r["scratch_final_accuracy"], color="grey", lw=0.8, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
        axes[0, col].set_title({
            "cifar5": f"CIFAR-10 {'/'.join(TARGET)}\n10% of train ({r['train_images']} images)",
            "digits": f"digits 8x8 grey, 1-channel first layer\n({r['train_images']} images)",
        }[task], fontsize=9)  # fmt: skip
    scale = results.get("options", {}).get("pretrained_lr_scale")
    fig.suptitle(f"{MODEL} pretrained on CIFAR-10 {'/'.join(SOURCE)}; "
                 f"pretrained layers at {scale}x the learning rate", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    p.add_argument("--out", type=Path, default=Path("runs/transfer_demo"))
    p.add_argument("--figure", type=Path, default=Path("docs/figures/transfer.png"))
    p.add_argument("--pretrain-epochs", type=float, default=2)
    p.add_argument("--finetune-epochs", type=float, default=10)
    p.add_argument("--test-images", type=int, default=2000, help="CIFAR test subset size")
    p.add_argument("--digits-epochs", type=float, default=30)
    p.add_argument("--pretrained-lr-scale", type=float, default=0.1)
    p.add_argument("--freeze-until", default="none")
    p.add_argument("--skip-pretrain", action="store_true", help="reuse OUT/pretrain")
    p.add_argument("--reuse-scratch", type=Path, help="results.json whose scratch runs to reuse")
    p.add_argument("--tag", default="", help="suffix of fine-tune run folders and results file")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"model": MODEL, "source_classes": SOURCE, "target_classes": TARGET}

    pre_dir = args.out / "pretrain"
    pre_cfg = TrainConfig.preset("fast", epochs=args.pretrain_epochs, eval_test=False, **CPU)
    if not args.skip_pretrain:
        splits = fewer_test_images(load_data(args.data, classes=SOURCE), args.test_images)
        print(f"== pretrain {MODEL} on {SOURCE}: {len(splits.train)} images", flush=True)
        pre = fit(create_model(MODEL, num_classes=5), splits, pre_cfg, _fresh(pre_dir))
        results["pretrain"] = pre.summary
    else:
        results["pretrain"] = json.loads((pre_dir / "summary.json").read_text())
    opts = FinetuneOptions(
        freeze_until=args.freeze_until, pretrained_lr_scale=args.pretrained_lr_scale
    )
    source = pre_dir / "checkpoint_best.pt"

    steps = 2250 // CPU["batch_size"]  # an epoch of 10% of the target classes
    cfg = TrainConfig.preset("fast", epochs=args.finetune_epochs, eval_every=2 * steps, **CPU)
    splits = load_data(args.data, classes=TARGET, train_fraction=0.1, val_size=200)
    splits = fewer_test_images(splits, args.test_images)
    old = json.loads(args.reuse_scratch.read_text()) if args.reuse_scratch else None
    kw = dict(tag=args.tag)
    results["cifar5"] = compare(
        "cifar5",
        splits,
        cfg,
        source,
        args.out,
        opts,
        **kw,
        scratch_curve=old["cifar5"]["scratch"] if old else None,
    )

    dcfg = TrainConfig.preset("digits", epochs=args.digits_epochs, eval_every=40)
    results["digits"] = compare(
        "digits",
        load_data("digits"),
        dcfg,
        source,
        args.out,
        opts,
        **kw,
        scratch_curve=old["digits"]["scratch"] if old else None,
    )

    results["options"] = opts.to_dict()
    results["wall_seconds"] = time.perf_counter() - t0
    write_result(args.out / f"results{args.tag}.json", results, device=resolve_device(dcfg.device))
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.figure)
    for task in ("cifar5", "digits"):
        r = results[task]
        frac = r["fraction_of_scratch_time"]
        print(
            f"{task}: scratch {100 * r['scratch_final_accuracy']:.2f}% "
            f"in {r['scratch_seconds']:.0f} s; "
            f"fine-tune {100 * r['finetune_final_accuracy']:.2f}% final, reached scratch's final "
            + ("never" if frac is None else f"after {r['finetune_seconds_to_scratch_final']:.0f} s "
               f"({100 * frac:.0f}% of scratch time, "
               f"{100 * r['fraction_of_scratch_steps']:.0f}% of its steps)")
        )  # fmt: skip
    print(f"total wall time {results['wall_seconds'] / 60:.1f} min; results{args.tag}.json")


if __name__ == "__main__":
    main()

"""``reslab train`` and ``reslab eval``: parse, build configs, call :func:`reslab.train.fit`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.commands.options import (
    add_run_folder_options,
    add_trainer_options,
    check_train_resume,
    claim_run_folder,
    nonnegative_int,
    resume_config,
    train_config,
)
from reslab.data import DataSplits, load_data
from reslab.models import DenseConfig, build_model, get_config
from reslab.train import TrainConfig, TrainingInterrupted, evaluate, fit
from reslab.train.checkpoint import find_checkpoint, load_checkpoint, load_model
from reslab.train.config import DEVICES
from reslab.train.outputs import read_run_config

DEFAULT_MODEL = "cifar_resnet20"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (default: cifar_resnet20 on the bundled digits)",
        description="Train a registered model. Flags override the recipe's values.",
    )
    p.add_argument("model", nargs="?", default=None, help=f"default: {DEFAULT_MODEL}")
    p.add_argument(
        "--data",
        default=None,
        help="'digits' (default), a CIFAR python folder/.tar.gz, or an image folder/.zip "
        "with train/ and test/",
    )
    p.add_argument(
        "--val-size",
        type=nonnegative_int,
        default=None,
        help="images held out of train for validation (default 1/10)",
    )
    add_run_folder_options(p, default_out="runs/MODEL-DATA-TIME")
    add_trainer_options(p, command="train")
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="test accuracy, per-class accuracy, confusion matrix")
    p.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", default=None, help="default: the data the run was trained on")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average over each image and its mirror (default: as the run evaluated, eval_flip)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)


def _model_for(name: str, splits: DataSplits) -> nn.Module:
    """The registered model, with its input and classifier sized to the data."""
    base = get_config(name)
    if isinstance(base, DenseConfig):
        features = splits.in_channels * splits.image_size**2
        return build_model(
            dataclasses.replace(
                base, widths=(features, *base.widths[1:]), num_classes=splits.num_classes
            )
        )
    return build_model(
        dataclasses.replace(base, in_channels=splits.in_channels, num_classes=splits.num_classes)
    )


def run_train(args: argparse.Namespace) -> int:
    resume = args.resume is not None
    # one process per run folder, taken before the data is read
    with claim_run_folder(args.resume if resume else args.out, resume=resume,
                          allow_nonempty=args.allow_nonempty):  # fmt: skip
        return _run_train(args)


def _run_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return _resume(args)
    data = args.data or "digits"
    name = args.model or DEFAULT_MODEL
    cfg = train_config(args, command="train", data=data)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    splits = load_data(data, val_size=args.val_size, verbose=True)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = _model_for(name, splits)
    out = args.out
    if out is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("under torchrun pass --out RUN_DIR (every rank must agree on it)")
        out = Path("runs") / f"{name}-{splits.name.split('.')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    info = {"model_name": name, "data_spec": data, "val_size": args.val_size}
    print(f"train {name} on {splits.name} ({len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test), recipe {cfg.recipe}, run folder {out}")  # fmt: skip
    return _fit(model, splits, cfg, out, info, resume=False, allow_nonempty=args.allow_nonempty)


def _resume(args: argparse.Namespace) -> int:
    run_dir: Path = args.resume
    saved, cfg = resume_config(args, run_dir)
    check_train_resume(run_dir, saved)  # a fine-tuning run needs its own groups and schedule
    spec = args.data or saved["data_spec"]
    splits = load_data(spec, val_size=saved.get("val_size"), verbose=True)
    ckpt = load_checkpoint(find_checkpoint(run_dir, prefer="checkpoint_latest.pt"))
    model = load_model(find_checkpoint(run_dir, prefer="checkpoint_latest.pt")).train()
    # config.json is rewritten: it must name the data this process reads (a moved file)
    info = {**{k: saved.get(k) for k in ("model_name", "val_size")}, "data_spec": spec}
    print(f"resume {run_dir} at step {ckpt['step']}")
    return _fit(model, splits, cfg, run_dir, info, resume=True)


def _fit(
    model: nn.Module,
    splits: DataSplits,
    cfg: TrainConfig,
    out: Path,
    info: dict[str, Any],
    *,
    resume: bool,
    allow_nonempty: bool = False,
) -> int:
    try:
        result = fit(model, splits, cfg, out, resume=resume, allow_nonempty=allow_nonempty,
                     run_info=info, verbose=True)  # fmt: skip
    except TrainingInterrupted as exc:
        print(f"reslab train: {exc}", flush=True)
        return 128 + exc.signum
    s = result.summary
    if s:
        views = (
            f" (image + mirror; single view {100 * s['test_accuracy_single_view']:.2f}%)"
            if s.get("eval_flip")
            else ""
        )
        print(
            f"test accuracy {100 * s['test_accuracy']:.2f}%{views}  "
            f"({s['train_seconds']:.0f} s of training, {s['images_per_second']:.0f} img/s)  "
            f"-> {out}"
        )
    return 0


def format_report(report: dict[str, Any], classes: list[str]) -> str:
    tta = " with flip test-time augmentation" if report.get("flip") else ""
    lines = [
        f"{report['split']} accuracy{tta}: {100 * report['accuracy']:.2f}% (n={report['n']})",
        "",
    ]
    width = max(len(c) for c in classes)
    lines.append(f"{'class':<{width}}  accuracy")
    for c, a in zip(classes, report["per_class_accuracy"], strict=True):
        lines.append(f"{c:<{width}}  {100 * a:7.2f}%")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    cell = max(5, *(len(str(v)) + 1 for row in report["confusion"] for v in row))
    lines.append(" " * width + "".join(f"{c[: cell - 1]:>{cell}}" for c in classes))
    for c, row in zip(classes, report["confusion"], strict=True):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    path = find_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    saved = read_run_config(path.parent) if (path.parent / "config.json").exists() else {}
    spec = args.data or saved.get("data_spec")
    if spec is None:
        raise ValueError("--data is needed (no config.json next to the checkpoint)")
    # the run's own train/val split: with another val_size, "val" would hold training images
    splits = load_data(spec, classes=ckpt["classes"], val_size=saved.get("val_size"))
    model = load_model(path)
    device = "cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()
    ) else "cpu"  # fmt: skip
    model.to(device)
    flip = args.flip
    if flip is None:
        flip = bool(ckpt.get("train_config", {}).get("eval_flip", False))
    split = getattr(splits, args.split)
    if not len(split):  # an accuracy of no images is not a number to print
        why = " (the run held none out: --val-size 0)" if saved.get("val_size") == 0 else ""
        hint = "; evaluate --split test" if args.split == "val" else ""
        raise ValueError(f"no {args.split} images to evaluate in {spec}{why}{hint}")
    report = evaluate(model, split, device=device, flip=flip, progress=None, desc=args.split)
    report = {"checkpoint": str(path), "data": spec, "split": args.split, "step": ckpt["step"],
              "flip": flip, "classes": splits.classes, **report}  # fmt: skip
    print(json.dumps(report) if args.json else format_report(report, splits.classes))
    return 0

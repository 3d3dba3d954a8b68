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

from reslab.commands.datasets import model_input, reopen_data, say_data
from reslab.commands.options import (
    add_data_options,
    add_run_folder_options,
    add_seeds_option,
    add_trainer_options,
    check_train_resume,
    data_options,
    nonnegative_int,
    packed_seeds,
    refuse_data_flags_on_resume,
    resume_config,
    train_config,
)
from reslab.data import Normalize
from reslab.data.reading import open_data
from reslab.data.training import TrainingData
from reslab.models import DenseConfig, ResNetConfig, build_model, get_config
from reslab.models.packed import build_packed
from reslab.train import TrainConfig, TrainingInterrupted, evaluate, fit
from reslab.train.checkpoint import find_checkpoint, load_checkpoint, load_model
from reslab.train.config import DEVICES
from reslab.train.evaluation import evaluate_crops

DEFAULT_MODEL = "cifar_resnet20"
CROPS = ("1", "10", "multiscale")


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
        help="'digits' (default), a CIFAR python folder/.tar.gz, an image folder/.zip with "
        "train/ (and val/, test/), a CSV/TSV list of path,label, or packed shards",
    )
    p.add_argument(
        "--val-size",
        type=nonnegative_int,
        default=None,
        help="images held out of train for validation when the data has no val/ (default 1/10)",
    )
    add_run_folder_options(p, default_out="runs/MODEL-DATA-TIME")
    add_trainer_options(p, command="train")
    add_seeds_option(p)
    add_data_options(p)
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
    p.add_argument(
        "--crops",
        choices=CROPS,
        default="1",
        help="1 (default): the run's evaluation view (resize + centre crop); 10: four corners "
        "and centre, and their mirrors; multiscale: the whole image through the fully "
        "convolutional network at shorter sides {224, 256, 384, 480, 640} x size/224, and "
        "mirrors (He et al. 2015, 3.4)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_options(p, only=("loader", "skip_bad", "workers"))
    p.set_defaults(func=run_eval)


def _config_for(name: str, data: TrainingData) -> ResNetConfig | DenseConfig:
    """The registered model's config, with its input and classifier sized to the data."""
    base = get_config(name)
    if isinstance(base, DenseConfig):
        h, w = data.image_size
        features = data.in_channels * h * w
        return dataclasses.replace(
            base, widths=(features, *base.widths[1:]), num_classes=data.num_classes
        )
    return dataclasses.replace(base, in_channels=data.in_channels, num_classes=data.num_classes)


def _model_for(
    name: str, data: TrainingData, cfg: TrainConfig, seeds: list[int] | None
) -> nn.Module:
    """One network initialised with ``cfg.seed``, or with ``seeds`` the members of a
    seed-packed network, each initialised as ``--seed S`` initialises one."""
    config = _config_for(name, data)
    if seeds is None:
        torch.manual_seed(cfg.seed)  # the initial weights
        return build_model(config)
    if not isinstance(config, ResNetConfig):
        raise ValueError(f"--seeds packs convolutional ResNets; {name} is a dense network")
    return build_packed(config, seeds)


def run_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return _resume(args)
    spec = args.data or "digits"
    name = args.model or DEFAULT_MODEL
    cfg = train_config(args, command="train", data=spec)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    opts = data_options(args)
    data = open_data(spec, val_size=args.val_size, default_cfg=model_input(name), verbose=True,
                     **opts)  # fmt: skip
    say_data(data)
    seeds = packed_seeds(args)
    model = _model_for(name, data, cfg, seeds)
    out = args.out
    if out is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("under torchrun pass --out RUN_DIR (every rank must agree on it)")
        out = Path("runs") / f"{name}-{data.name.split('.')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    # what `--resume` and `reslab eval` need to read the data the same way again
    opts["loader"] = data.loader.kind
    info = {"model_name": name, "data_spec": spec, "val_size": args.val_size,
            "data_options": opts}  # fmt: skip
    what = f"{name}, seeds {' '.join(map(str, seeds))} packed," if seeds else name
    print(f"train {what} on {data.name} ({data.split_size('train')} train / "
          f"{data.split_size('val')} val / {data.split_size('test')} test), recipe "
          f"{cfg.recipe}, run folder {out}")  # fmt: skip
    return _fit(model, data, cfg, out, info, resume=False)


def _resume(args: argparse.Namespace) -> int:
    run_dir: Path = args.resume
    saved, cfg = resume_config(args, run_dir)
    check_train_resume(run_dir, saved)  # a fine-tuning run needs its own groups and schedule
    refuse_data_flags_on_resume(args, run_dir)
    spec = args.data or saved["data_spec"]
    latest = find_checkpoint(run_dir, prefer="checkpoint_latest.pt")
    ckpt = load_checkpoint(latest)
    data = reopen_data(spec, saved, ckpt.get("input_config"), workers=args.workers)
    say_data(data)
    if "seeds" in saved:  # a seed-packed run: its members' weights come from the checkpoint
        config = ResNetConfig.from_dict(saved["model_config"])
        model: nn.Module = build_packed(config, saved["seeds"])
    else:
        model = load_model(latest).train()
    # config.json is rewritten: it must name the data this process reads (a moved file)
    info = {**{k: saved.get(k) for k in ("model_name", "val_size", "data_options")},
            "data_spec": spec}  # fmt: skip
    print(f"resume {run_dir} at step {ckpt['step']}")
    return _fit(model, data, cfg, run_dir, info, resume=True)


def _fit(
    model: nn.Module,
    data: TrainingData,
    cfg: TrainConfig,
    out: Path,
    info: dict[str, Any],
    *,
    resume: bool,
) -> int:
    try:
        result = fit(model, data, cfg, out, resume=resume, run_info=info, verbose=True)
    except TrainingInterrupted as exc:
        print(f"reslab train: {exc}", flush=True)
        return 128 + exc.signum
    s = result.summary
    if result.members:
        print(_packed_line(s, out))
    elif s:
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
        if s.get("skipped"):
            print(f"skipped {s['skipped']} unreadable image(s), listed in {out}/summary.json")
    return 0


def _packed_line(s: dict[str, Any], out: Path) -> str:
    """What a seed-packed run prints at the end: the members' test error as mean ± std."""
    done = len(s["members"])
    err = "—" if s["test_error_mean"] is None else f"{100 * s['test_error_mean']:.2f}%"
    if s["test_error_std"] is not None:
        err += f" ± {100 * s['test_error_std']:.2f}"
    failed = f", {len(s['failed_members'])} failed" if s["failed_members"] else ""
    return (
        f"test error {err} over {done} member(s){failed}  ({s['train_seconds']:.0f} s of "
        f"training, {s['images_per_second']:.0f} img/s, all members)  -> {out}/seed-*"
    )


def format_report(report: dict[str, Any], classes: list[str]) -> str:
    views = {"10": " with 10 crops", "multiscale": " multi-scale, fully convolutional"}
    tta = views.get(report.get("crops", "1"), "")
    tta = tta or (" with flip test-time augmentation" if report.get("flip") else "")
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
    config_file = path.parent / "config.json"
    saved = json.loads(config_file.read_text()) if config_file.exists() else {}
    spec = args.data or saved.get("data_spec")
    if spec is None:
        raise ValueError("--data is needed (no config.json next to the checkpoint)")
    # the run's own train/val split and classes: with another val_size, "val" would hold
    # training images; streamed data at the checkpoint's own input (size, resize, crop)
    data = reopen_data(spec, saved, ckpt.get("input_config"), classes=ckpt["classes"],
                       loader=None if args.loader == "auto" else args.loader,
                       skip_bad=args.skip_bad or None, workers=args.workers)  # fmt: skip
    say_data(data, err=True)
    model = load_model(path)
    device = "cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()
    ) else "cpu"  # fmt: skip
    model.to(device)
    flip = args.flip
    if flip is None:
        flip = bool(ckpt.get("train_config", {}).get("eval_flip", False))
    if args.crops == "1":
        batches = data.eval_batches(args.split, batch_size=256, device=torch.device(device))
        report = evaluate(model, batches, device=device, flip=flip, progress=None,
                          desc=args.split)  # fmt: skip
    else:
        cfg = getattr(model, "input_config", None)
        if cfg is None:  # a checkpoint from before input configs: the data's own input
            norm = getattr(model, "input_norm", None) or Normalize.identity(data.in_channels)
            cfg = data.input.with_normalization(norm)
        report = evaluate_crops(model, data.images(args.split), cfg, args.crops, progress=None,
                                desc=args.split)  # fmt: skip
        flip = True  # both protocols average each view with its mirror
    report = {"checkpoint": str(path), "data": spec, "split": args.split, "step": ckpt["step"],
              "flip": flip, "crops": args.crops, "loader": data.loader.kind,
              "skipped": len(data.skipped), "classes": data.classes, **report}  # fmt: skip
    print(json.dumps(report) if args.json else format_report(report, data.classes))
    return 0

"""``reslab train`` and ``reslab eval``: parse, build configs, call :func:`reslab.train.fit`,
:func:`reslab.train.evaluate` or :func:`reslab.train.ensemble.evaluate_ensemble`."""

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
    claim_run_folder,
    data_options,
    data_spec,
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
from reslab.train import TrainConfig, TrainingInterrupted, evaluate, fit, resolve_device
from reslab.train.checkpoint import (
    BEST,
    LATEST,
    find_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
)
from reslab.train.config import DEVICES
from reslab.train.ensemble import evaluate_ensemble, expand_runs
from reslab.train.evaluation import evaluate_crops
from reslab.train.outputs import read_run_config

DEFAULT_MODEL = "cifar_resnet20"
CHECKPOINTS = {"best": BEST, "latest": LATEST}  # reslab eval --checkpoint
CROPS = ("1", "10", "multiscale")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The command's flags: a table of argparse calls, over 60 lines because each flag is a
    few lines of help; split up, the command's interface would be scattered."""
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

    p = sub.add_parser(
        "eval",
        help="test accuracy, per-class accuracy, confusion matrix; of one run, several, or "
        "their ensemble",
        description="Evaluate runs one by one, or with --ensemble as one ensemble.",
    )
    p.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="a run folder or checkpoint file; a packed run's folder (or its packed.json) "
        "stands for its member runs, in order",
    )
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="average the runs' softmax and report accuracy against the number of members "
        "(1..K, in the order given) and each member's own; all must share data and classes",
    )
    p.add_argument("--data", default=None, help="default: the data the run was trained on")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument(
        "--checkpoint",
        choices=tuple(CHECKPOINTS),
        default="best",
        help="of a run folder: best (lowest validation error, default) or latest (the final "
        "model of a finished run, which its summary.json's test_accuracy scores)",
    )
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average over each image and its mirror (default: as the run evaluated, eval_flip)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per run (one line each), or one for the ensemble",
    )
    p.add_argument(
        "--crops",
        choices=CROPS,
        default="1",
        help="1 (default): the run's evaluation view (resize + centre crop); 10: four corners "
        "and centre, and their mirrors; multiscale: the whole image through the fully "
        "convolutional network at shorter sides {224, 256, 384, 480, 640} x size/224, and "
        "mirrors (He et al. 2015, 3.4); one run at a time",
    )
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
    resume = args.resume is not None
    # one process per run folder, taken before the data is read
    with claim_run_folder(args.resume if resume else args.out, resume=resume,
                          allow_nonempty=args.allow_nonempty):  # fmt: skip
        return _run_train(args)


def _run_train(args: argparse.Namespace) -> int:
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
    return _fit(model, data, cfg, out, info, resume=False, allow_nonempty=args.allow_nonempty)


def _resume(args: argparse.Namespace) -> int:
    run_dir: Path = args.resume
    saved, cfg = resume_config(args, run_dir)
    check_train_resume(run_dir, saved)  # a fine-tuning run needs its own groups and schedule
    refuse_data_flags_on_resume(args, run_dir)
    weights = read_checkpoint(find_checkpoint(run_dir, prefer=LATEST))  # before the data
    ckpt = weights.meta
    spec = args.data or data_spec(saved, run_dir)
    data = reopen_data(spec, saved, ckpt.get("input_config"), workers=args.workers)
    say_data(data)
    if "seeds" in saved:  # a seed-packed run: its members' weights come from the checkpoint
        config = ResNetConfig.from_dict(saved["model_config"])
        model: nn.Module = build_packed(config, saved["seeds"])
    else:
        model = model_from_checkpoint(weights).train()
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
    allow_nonempty: bool = False,
) -> int:
    try:
        result = fit(model, data, cfg, out, resume=resume, allow_nonempty=allow_nonempty,
                     run_info=info, verbose=True)  # fmt: skip
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
    head = f"{report['split']} accuracy{tta}: {100 * report['accuracy']:.2f}% (n={report['n']})"
    return "\n".join([head, "", *_class_lines(report, classes)])


def _class_lines(report: dict[str, Any], classes: list[str]) -> list[str]:
    """Per-class accuracy and the confusion matrix of ``report``, as text lines."""
    width = max(len("class"), *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  accuracy"]
    for c, a in zip(classes, report["per_class_accuracy"], strict=True):
        lines.append(f"{c:<{width}}  {100 * a:7.2f}%")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    cell = max(5, *(len(str(v)) + 1 for row in report["confusion"] for v in row))
    lines.append(" " * width + "".join(f"{c[: cell - 1]:>{cell}}" for c in classes))
    for c, row in zip(classes, report["confusion"], strict=True):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return lines


def format_ensemble_report(report: dict[str, Any]) -> str:
    """The text of ``reslab eval --ensemble``: accuracy against the number of members, each
    member alone, then the full ensemble's per-class accuracy and confusion matrix."""
    k, members = report["members"], report["member_runs"]
    std = report["member_accuracy_std"]
    spread = f" ± {100 * std:.2f}%" if std is not None else ""
    lines = [
        f"{report['split']} split of {report['data']} (n={report['n']}): ensemble of {k} "
        "members, the mean of their softmax",
        "",
        "members  accuracy",
        *(f"{j:>7}  {100 * a:7.2f}%" for j, a in enumerate(report["accuracy_vs_members"], 1)),
        "",
        f"one member alone: {100 * report['member_accuracy_mean']:.2f}%{spread} (mean"
        f"{' ± sample std' if std is not None else ''} of {k})",
        "",
        "member  accuracy  flip  checkpoint",
        *(
            f"{j:>6}  {100 * m['accuracy']:7.2f}%  {'yes' if m['flip'] else 'no':<4}  "
            f"{m['checkpoint']}"
            for j, m in enumerate(members, 1)
        ),
        "",
        f"the ensemble of all {k}: {100 * report['accuracy']:.2f}%",
        "",
        *_class_lines(report, report["classes"]),
    ]
    return "\n".join(lines)


@dataclasses.dataclass
class _EvalRun:
    """One run to evaluate: its checkpoint, the data it is scored on, its model."""

    checkpoint: Path
    step: int
    data: str
    val_size: int | None
    classes: list[str]
    flip: bool
    model: nn.Module
    saved: dict[str, Any]  # its config.json ({} for a checkpoint on its own)
    input_config: dict[str, Any] | None  # its checkpoint's (format 3 on)


def _load_run(run: Path, args: argparse.Namespace) -> _EvalRun:
    """The run at ``run`` (folder or checkpoint file), scored on ``--data`` (default: what it
    trained on) with ``--flip`` (default: as the run evaluated, its eval_flip)."""
    path = find_checkpoint(run, prefer=CHECKPOINTS[args.checkpoint])
    data, flip = args.data, args.flip
    weights = read_checkpoint(path)  # read once, validated
    ckpt = weights.meta
    saved = read_run_config(path.parent) if (path.parent / "config.json").exists() else {}
    spec = data or saved.get("data_spec")
    if spec is None:
        raise ValueError(f"--data is needed (no config.json next to the checkpoint {path})")
    if flip is None:
        flip = bool(ckpt.get("train_config", {}).get("eval_flip", False))
    return _EvalRun(
        path, ckpt["step"], spec, saved.get("val_size"), list(ckpt["classes"]), flip,
        model_from_checkpoint(weights), saved, ckpt.get("input_config"),
    )  # fmt: skip


def _geometry(r: _EvalRun) -> str:
    """The run's evaluation view (not its normalisation, which each model applies itself)."""
    cfg = r.input_config or {}
    return json.dumps([cfg.get(k) for k in ("channels", "size", "resize", "crop", "interpolation")])


def _check_same_images(runs: list[_EvalRun], split: str) -> None:
    """An ensemble's members must be scored on the same images with the same labels: one data
    set, the same classes in the same order and, for the val split, the same held-out images."""
    first = runs[0]
    for r in runs[1:]:
        if r.classes != first.classes:
            at = _first_difference(first.classes, r.classes)
            a, b = (c[at] if at < len(c) else "(none)" for c in (first.classes, r.classes))
            raise ValueError(
                f"ensemble members must share one class list in one order: class {at} is {b!r} "
                f"in {r.checkpoint} ({len(r.classes)} classes) but {a!r} in {first.checkpoint} "
                f"({len(first.classes)} classes)"
            )
        if r.data != first.data:
            raise ValueError(
                f"ensemble members were trained on different data ({first.checkpoint}: "
                f"{first.data}; {r.checkpoint}: {r.data}): pass --data to score all on one"
            )
        if split == "val" and r.val_size != first.val_size:
            raise ValueError(
                f"ensemble members held out different validation splits (val_size "
                f"{first.val_size} in {first.checkpoint}, {r.val_size} in {r.checkpoint}): "
                "their val images differ; use --split test"
            )


def _first_difference(a: list[str], b: list[str]) -> int:
    """The first index where ``a`` and ``b`` differ (the shorter length where one extends the
    other)."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def run_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    paths = expand_runs(args.runs)
    loaded: dict[tuple[str, tuple[str, ...], int | None, str], TrainingData] = {}
    given = {"loader": None if args.loader == "auto" else args.loader,
             "skip_bad": args.skip_bad or None, "workers": args.workers}  # fmt: skip

    def data_of(r: _EvalRun) -> TrainingData:
        # the run's own train/val split and classes (with another val_size, "val" would hold
        # training images), read at its checkpoint's own input (size, resize, crop)
        key = (r.data, tuple(r.classes), r.val_size, _geometry(r))
        if key not in loaded:
            loaded[key] = reopen_data(r.data, {**r.saved, "val_size": r.val_size},
                                      r.input_config, classes=r.classes, **given)  # fmt: skip
            say_data(loaded[key], err=True)
        if not loaded[key].split_size(args.split):  # an accuracy of no images is no number
            why = " (the run held none out: --val-size 0)" if r.val_size == 0 else ""
            hint = "; evaluate --split test" if args.split == "val" else ""
            raise ValueError(f"no {args.split} images to evaluate in {r.data}{why}{hint}")
        return loaded[key]

    if args.ensemble:
        if args.crops != "1":
            raise ValueError("--crops 10/multiscale evaluates one run at a time, not an ensemble")
        runs = [_load_run(path, args) for path in paths]
        _check_same_images(runs, args.split)  # before any data is read
        if len({_geometry(r) for r in runs}) > 1:
            raise ValueError(
                "ensemble members take their images at different sizes or views (their "
                "checkpoints' input configs differ): evaluate them one by one"
            )
        print(_eval_ensemble(runs, data_of(runs[0]), args, device))
        return 0
    for i, path in enumerate(paths):  # one run in memory at a time, each report when ready
        r = _load_run(path, args)
        data = data_of(r)
        model = r.model.to(device)
        flip = r.flip
        if args.crops == "1":
            batches = data.eval_batches(args.split, batch_size=256, device=device)
            report = evaluate(model, batches, device=device, flip=flip, progress=None,
                              desc=args.split)  # fmt: skip
        else:
            cfg = getattr(model, "input_config", None)
            if cfg is None:  # a checkpoint from before input configs: the data's own input
                norm = getattr(model, "input_norm", None) or Normalize.identity(data.in_channels)
                cfg = data.input.with_normalization(norm)
            report = evaluate_crops(model, data.images(args.split), cfg, args.crops,
                                    progress=None, desc=args.split)  # fmt: skip
            flip = True  # both protocols average each view with its mirror
        report = {"checkpoint": str(r.checkpoint), "data": r.data, "split": args.split,
                  "step": r.step, "flip": flip, "crops": args.crops,
                  "loader": data.loader.kind, "skipped": len(data.skipped),
                  "classes": r.classes, **report}  # fmt: skip
        if args.json:
            print(json.dumps(report), flush=True)
        else:  # several reports: each under its checkpoint, a blank line between them
            head = "" if len(paths) == 1 else f"{'' if i == 0 else chr(10)}{r.checkpoint}\n"
            print(head + format_report(report, r.classes), flush=True)
    return 0


def _eval_ensemble(
    runs: list[_EvalRun], data: TrainingData, args: argparse.Namespace, device: torch.device
) -> str:
    report = evaluate_ensemble(
        [r.model.to(device) for r in runs], data.eval_batches(args.split, batch_size=256,
        device=device), device=device, flip=[r.flip for r in runs],
        progress=None, desc=f"{args.split} ({len(runs)} members)",
    )  # fmt: skip
    member_runs = [
        {"checkpoint": str(r.checkpoint), "step": r.step, "flip": r.flip, "accuracy": a}
        for r, a in zip(runs, report["member_accuracy"], strict=True)
    ]
    report = {"ensemble": True, "data": runs[0].data, "split": args.split,
              "classes": runs[0].classes, "member_runs": member_runs, **report}  # fmt: skip
    return json.dumps(report) if args.json else format_ensemble_report(report)

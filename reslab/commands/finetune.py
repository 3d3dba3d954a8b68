"""``reslab finetune``: a thin wrapper around :mod:`reslab.transfer` (``reslab predict`` lives in
:mod:`reslab.commands.predict`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reslab.commands.options import (
    add_data_options,
    add_run_folder_options,
    add_trainer_options,
    claim_run_folder,
    class_names,
    data_options,
    data_spec,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    refuse_data_flags_on_resume,
    resume_config,
    train_config,
)

__all__ = ["add_parser"]

# Options that define a fine-tuning run: `--resume` takes them from the run's config.json
# (trainer flags such as --iters, --threads or --device, and --data for moved data, may change).
_RUN_OPTIONS = {
    "source": "--from",
    "model": "--model",
    "sha256": "--sha256",
    "classes": "--classes",
    "train_fraction": "--train-fraction",
    "val_size": "--val-size",
    "in_channels": "--in-channels",
    "freeze_until": "--freeze-until",
    "unfreeze_every": "--unfreeze-every",
    "pretrained_lr_scale": "--pretrained-lr-scale",
    "recipe": "--recipe",
    "out": "--out",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The command's flags: a table of argparse calls, over 60 lines because each flag is a
    few lines of help; split up, the command's interface would be scattered."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune pretrained weights on a data set",
        description="Initialise a network from a reslab checkpoint or a torchvision/timm weight "
        "file, adapt its first layer (input channels) and classifier (classes), and train it "
        "with the reslab trainer. Writes the same run folder as `reslab train`; "
        "`--resume RUN_DIR` continues an interrupted one.",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="CHECKPOINT",
        help="reslab checkpoint/run folder, or a torchvision/timm .pth/.safetensors (required "
        "unless --resume)",
    )
    p.add_argument(
        "--model",
        help="registered model the file fits (needed for torchvision/timm "
        "files; reslab checkpoints carry their own)",
    )
    p.add_argument("--sha256", help="expected SHA-256 of the weight file")
    p.add_argument(
        "--data",
        help="'digits', CIFAR python folder/.tar.gz, or an image folder/.zip (required unless "
        "--resume; with it, the run's data moved elsewhere)",
    )
    p.add_argument(
        "--classes", type=class_names, help="comma-separated classes to keep, in this order"
    )
    p.add_argument(
        "--train-fraction",
        type=fraction,
        help="share of each class's training images to keep (default 1)",
    )
    p.add_argument(
        "--val-size",
        type=nonnegative_int,
        help="images held out of train for validation (default 1/10)",
    )
    p.add_argument(
        "--in-channels",
        type=positive_int,
        help="input channels of the new first layer (default: the data's)",
    )
    p.add_argument(
        "--freeze-until",
        metavar="PART",
        help="freeze the stem and stages up to this one: stem, layer1, ... (default none)",
    )
    p.add_argument(
        "--unfreeze-every",
        type=positive_int,
        metavar="STEPS",
        help="unfreeze one more part every STEPS steps, deepest first",
    )
    p.add_argument(
        "--pretrained-lr-scale",
        type=nonnegative_float,
        help="learning rate of the pretrained layers relative to the new head (default 0.1; "
        "0 keeps them fixed)",
    )
    add_run_folder_options(p, default_out="runs/finetune-DATA-TIME")
    add_trainer_options(p, command="finetune")
    add_data_options(p)
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from reslab.transfer.finetune import FinetuneOptions

    if args.resume is not None:
        with claim_run_folder(args.resume, resume=True):  # before the data is read
            return _resume(args)
    required = [flag for flag, value in (("--from", args.source), ("--data", args.data))
                if value is None]  # fmt: skip
    if required:
        verb = "is" if len(required) == 1 else "are"
        raise ValueError(f"{' and '.join(required)} {verb} required (or --resume RUN_DIR)")
    options = FinetuneOptions(  # checked before the data is loaded
        freeze_until=args.freeze_until or "none",
        unfreeze_every=args.unfreeze_every,
        pretrained_lr_scale=0.1 if args.pretrained_lr_scale is None else args.pretrained_lr_scale,
        sha256=args.sha256,
    )
    cfg = train_config(args, command="finetune", data=args.data)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"finetune-{Path(args.data).stem}-{stamp}"
    _refuse_a_used_folder(out)
    with claim_run_folder(out, resume=False, allow_nonempty=args.allow_nonempty):
        return _finetune_into(out, args, cfg, options)


def _finetune_into(out: Path, args: argparse.Namespace, cfg: Any, options: Any) -> int:
    import torch

    from reslab.commands.datasets import say_data
    from reslab.data.reading import open_data
    from reslab.transfer.finetune import finetune, source_input

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    train_fraction = 1.0 if args.train_fraction is None else args.train_fraction
    classes = args.classes  # a list of distinct names, or None
    source = Path(args.source)
    if source.is_dir():
        from reslab.train.checkpoint import find_checkpoint

        source = find_checkpoint(source)
    opts = data_options(args)
    # streamed photos are read at the source network's input size, with its evaluation view
    data = open_data(
        args.data, seed=cfg.seed, classes=classes, train_fraction=train_fraction,
        val_size=args.val_size, default_cfg=source_input(source, args.model), verbose=True,
        **opts,
    )  # fmt: skip
    say_data(data)
    if args.in_channels is not None and args.in_channels != data.in_channels:
        raise ValueError(
            f"--in-channels {args.in_channels} does not match the data, which has "
            f"{data.in_channels} channel(s); the first layer is adapted to the data's channels"
        )
    # What `reslab eval RUN_DIR` and `reslab finetune --resume` need to find the data again.
    opts["loader"] = data.loader.kind
    info = {"model_name": args.model, "data_spec": args.data, "val_size": args.val_size,
            "classes": classes, "train_fraction": train_fraction, "data_seed": cfg.seed,
            "data_options": opts}  # fmt: skip
    return _train(
        lambda: finetune(source, data, cfg, out, options=options, model=args.model,
                         run_info=info, allow_nonempty=args.allow_nonempty),
        out,
    )  # fmt: skip


def _refuse_a_used_folder(out: Path) -> None:
    """Before any data is loaded; fit refuses too, but its message names `reslab train`."""
    from reslab.train.checkpoint import holds_run

    if holds_run(out):
        raise FileExistsError(
            f"run folder {out} already holds a run; continue it with "
            f"`reslab finetune --resume {out}`, or fine-tune into another --out folder"
        )


def _train(run: Callable[[], Any], out: Path) -> int:
    from reslab.train import TrainingInterrupted

    try:
        result = run()
    except TrainingInterrupted as exc:
        print(f"reslab finetune: {exc}; continue with `reslab finetune --resume {out}`",
              flush=True)  # fmt: skip
        return 128 + exc.signum
    s = result.summary
    print(
        f"test accuracy {100 * s['test_accuracy']:.2f}% after {s['train_seconds']:.1f} s of "
        f"training; run folder {out}"
    )
    return 0


def _resume(args: argparse.Namespace) -> int:
    from reslab.commands.datasets import reopen_data, say_data
    from reslab.train.checkpoint import LATEST, load_checkpoint
    from reslab.transfer.finetune import resume_finetune

    run_dir: Path = args.resume
    given = [flag for dest, flag in _RUN_OPTIONS.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} cannot be given with --resume: the run continues with the "
            f"options in {run_dir / 'config.json'} (trainer flags such as --iters, --epochs, "
            "--threads or --device, and --data for moved data, can)"
        )
    refuse_data_flags_on_resume(args, run_dir)
    saved, cfg = resume_config(args, run_dir)
    if "finetune" not in saved:
        raise ValueError(
            f"{run_dir} is not a fine-tuning run: continue it with `reslab train --resume "
            f"{run_dir}`"
        )
    spec = args.data or data_spec(saved, run_dir)
    ckpt = load_checkpoint(run_dir / LATEST)
    # the run's own split: its seed (not a new --seed), classes, train fraction and val size
    saved.setdefault("data_seed", saved["train_config"]["seed"])
    data = reopen_data(spec, saved, ckpt.get("input_config"), workers=args.workers)
    say_data(data)
    was = saved["data"]
    if data.classes != was["classes"] or data.split_size("train") != was["train"]:
        raise ValueError(
            f"{spec} is not the data {run_dir} was trained on ({was['train']} training images "
            f"of classes {was['classes']}; now {data.split_size('train')} of {data.classes})"
        )
    # config.json is rewritten: it must name the data this process reads (a moved file)
    keep = ("model_name", "val_size", "classes", "train_fraction", "data_seed", "data_options")
    info = {**{k: saved.get(k) for k in keep}, "data_spec": spec}
    print(f"resume {run_dir} at step {ckpt['step']}", flush=True)
    return _train(lambda: resume_finetune(run_dir, data, cfg, run_info=info), run_dir)

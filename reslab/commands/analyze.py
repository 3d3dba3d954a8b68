"""``reslab analyze EXPERIMENT ... --out DIR`` for each experiment of ``reslab.analysis``.

Each experiment writes ``DIR/<experiment>.json`` (every number, with config, git revision and
versions) and PNG figures, then prints a short table. ``--quick`` is a CPU budget of <= 5 min.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch

from reslab.analysis import EXPERIMENTS
from reslab.analysis.shortcuts import VARIANTS as SHORTCUT_VARIANTS
from reslab.analysis.training import TrainSpec
from reslab.commands.options import (
    add_trainer_options,
    fraction,
    nonnegative_int,
    positive_int,
    seed,
)

#: Experiments that train networks with the library trainer (they share --recipe etc.).
TRAINING = ("degradation", "responses", "lesion", "orderings", "shortcuts")

HELP = {
    "gradflow": "gradient norms per unit / weight layer; depth sweeps (no MODEL: the sweeps)",
    "degradation": "plain vs residual 20/32/44/56 trained with one recipe (He et al. 2015 Fig. 6)",
    "responses": "std of each branch's last BN output, plain vs residual (He et al. 2015 Fig. 7)",
    "lesion": "delete single units at test time, ResNet vs plain twin (Veit et al. 2016)",
    "ode": "tau = T/L as forward Euler; tau vs gradient norms; learnable vs fixed tau",
    "orderings": "the five unit orderings of He et al. 2016 Table 2 with one recipe",
    "shortcuts": "scaled, gated, 1x1-conv and dropout shortcuts vs the identity (He et al. 2016 "
    "Table 1, Fig. 3) with one recipe: training loss curves",
    "toy": "the one-node, three-layer example of Herberg's lecture notes (2023): autograd vs "
    "the product formula",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The command's flags: a table of argparse calls, over 60 lines because each flag is a
    few lines of help; split up, the command's interface would be scattered."""
    p = sub.add_parser("analyze", help="experiments on why residual learning works (JSON + PNG)")
    exp = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name in EXPERIMENTS:
        e = exp.add_parser(name, help=HELP[name], description=HELP[name])
        if name == "gradflow":
            e.add_argument(
                "models",
                nargs="*",
                metavar="MODEL",
                help="registered model names or checkpoint files",
            )
            e.add_argument("--batch-size", type=positive_int, default=8)
        e.add_argument("--out", type=Path, required=True, help="folder for the JSON and PNGs")
        e.add_argument("--quick", action="store_true", help="a CPU budget of <= 5 minutes")
        if name != "toy":
            e.add_argument(
                "--data",
                default=None,
                help="digits | CIFAR folder/.tar.gz | image-folder dir/.zip "
                "(default: digits with --quick, else the CIFAR-10 JPEG zip; "
                "gradflow: gaussian inputs)",
            )
            e.add_argument("--seed", type=seed, default=0)
        if name in ("degradation", "responses", "lesion", "ode", "orderings", "shortcuts"):
            e.add_argument(
                "--iters", type=positive_int, default=None, help="optimiser steps per network"
            )
        if name in TRAINING:  # every network of the experiment is trained with these
            add_trainer_options(
                e, command="analyze", only=("recipe", "batch_size", "lr", "eval_every")
            )
        if name in ("degradation", "responses"):
            e.add_argument("--depths", type=positive_int, nargs="+", default=None)
        if name in ("lesion", "orderings", "shortcuts"):
            e.add_argument("--depth", type=positive_int, default=None)
        if name == "shortcuts":
            e.add_argument(
                "--variants",
                nargs="+",
                choices=tuple(SHORTCUT_VARIANTS),
                default=None,
                metavar="VARIANT",
                help="rows of Table 1 to train (default: all, in the paper's order): "
                + ", ".join(SHORTCUT_VARIANTS),
            )
            e.add_argument(
                "--paper",
                action="store_true",
                help="the paper's setting: ResNet-110, 64k iterations of the paper recipe on "
                "CIFAR-10 per variant (a GPU's work; not resumable: one variant per command)",
            )
        if name in TRAINING:
            e.add_argument(
                "--train-fraction",
                type=fraction,
                default=1.0,
                help="keep this fraction of each class's training images",
            )
            e.add_argument(
                "--val-size", type=nonnegative_int, default=None, help="validation images"
            )
            e.add_argument(
                "--test-size",
                type=positive_int,
                default=None,
                help="evaluate on a seeded random subset of this many test images",
            )
        e.add_argument(
            "--threads",
            type=positive_int,
            default=None,
            help="torch CPU threads (1 avoids oversubscription on a shared machine)",
        )
        e.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    kw: dict = {}
    for k in ("depths", "depth"):
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    if args.experiment in TRAINING:
        overrides = {
            ("preset" if k == "recipe" else k): getattr(args, k)
            for k in ("recipe", "batch_size", "lr", "eval_every")
            if getattr(args, k) is not None
        }
        kw["spec"] = TrainSpec(
            data=args.data,
            seed=args.seed,
            iters=args.iters,
            train_fraction=getattr(args, "train_fraction", 1.0),
            val_size=getattr(args, "val_size", None),
            test_size=getattr(args, "test_size", None),
            overrides=overrides,
        )
        if args.experiment == "shortcuts":
            kw.update(variants=args.variants, paper=args.paper)
    elif args.experiment == "gradflow":
        kw.update(models=args.models, batch_size=args.batch_size, data=args.data, seed=args.seed)
    elif args.experiment == "ode":
        kw.update(data=args.data, seed=args.seed, iters=args.iters)
    module = importlib.import_module(f"reslab.analysis.{args.experiment}")
    t0 = time.perf_counter()
    result = module.run(args.out, quick=args.quick, **kw)
    print(result["table"])
    print(f"\nwrote {result['json']}")
    for fig in result["figures"]:
        print(f"wrote {fig}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0

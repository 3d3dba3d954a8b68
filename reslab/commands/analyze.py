"""``reslab analyze {gradflow,degradation,responses,lesion,ode,orderings,toy} ... --out DIR``.

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
from reslab.analysis.training import TrainSpec

#: Experiments that train networks with the library trainer (they share --recipe etc.).
TRAINING = ("degradation", "responses", "lesion", "orderings")

HELP = {
    "gradflow": "gradient norms per unit / weight layer; depth sweeps (no MODEL: the sweeps)",
    "degradation": "plain vs residual 20/32/44/56 trained with one recipe (He et al. 2015 Fig. 6)",
    "responses": "std of each branch's last BN output, plain vs residual (He et al. 2015 Fig. 7)",
    "lesion": "delete single units at test time, ResNet vs plain twin (Veit et al. 2016)",
    "ode": "tau = T/L as forward Euler; tau vs gradient norms; learnable vs fixed tau",
    "orderings": "the five unit orderings of He et al. 2016 Table 2 with one recipe",
    "toy": "seed 000's one-node three-layer example: autograd vs the product formula",
}


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a batch of 0 or a depth of 0 is no experiment)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="the seeds' theory as experiments (JSON + PNG)")
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
            e.add_argument("--batch-size", type=_positive, default=8)
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
            e.add_argument("--seed", type=int, default=0)
        if name in ("degradation", "responses", "lesion", "ode", "orderings"):
            e.add_argument(
                "--iters", type=_positive, default=None, help="optimiser steps per network"
            )
        if name in TRAINING:
            e.add_argument(
                "--recipe",
                default=None,
                choices=("digits", "fast", "paper"),
                help="trainer preset (default: digits on digits, else fast in fp32)",
            )
            e.add_argument("--batch-size", type=_positive, default=None)
            e.add_argument("--lr", type=float, default=None)
            e.add_argument("--eval-every", type=_positive, default=None)
        if name in ("degradation", "responses"):
            e.add_argument("--depths", type=_positive, nargs="+", default=None)
        if name in ("lesion", "orderings"):
            e.add_argument("--depth", type=_positive, default=None)
        if name in TRAINING:
            e.add_argument(
                "--train-fraction",
                type=float,
                default=1.0,
                help="keep this fraction of each class's training images",
            )
            e.add_argument("--val-size", type=_count, default=None, help="validation images")
            e.add_argument(
                "--test-size",
                type=_positive,
                default=None,
                help="evaluate on a seeded random subset of this many test images",
            )
        e.add_argument(
            "--threads",
            type=_positive,
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

"""The command line's shared options: every trainer flag, defined once, and the range checks of
every number a user can type.

``reslab train`` and ``reslab finetune`` add all trainer flags with :func:`add_trainer_options`
and turn them into a :class:`~reslab.train.TrainConfig` with :func:`train_config` (or
:func:`resume_config` for ``--resume``); ``reslab analyze`` adds the few its experiments take.
Choices come from the config's own constants, so a new preset or precision needs no CLI edit.

The validators are argparse ``type=`` callables: a bad value is one usage error naming the flag
(exit status 2) before anything is read or written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import torch

from reslab._io import FolderLock
from reslab.data.feed import LOADERS
from reslab.data.training import AUGMENTS
from reslab.train import PRESETS, TrainConfig
from reslab.train.config import COMPILE_MODES, DEVICES, PRECISIONS
from reslab.train.outputs import read_run_config
from reslab.train.setup import refuse_occupied

__all__ = [
    "DATA_FLAGS",
    "DEFAULT_RECIPES",
    "MAX_SEED",
    "TRAINER_FLAGS",
    "add_data_options",
    "add_run_folder_options",
    "add_seeds_option",
    "add_trainer_options",
    "check_train_resume",
    "claim_run_folder",
    "class_names",
    "data_options",
    "data_spec",
    "fraction",
    "nonnegative_float",
    "nonnegative_int",
    "packed_seeds",
    "positive_float",
    "positive_int",
    "refuse_data_flags_on_resume",
    "resize_side",
    "resume_config",
    "seed",
    "train_config",
    "trainer_overrides",
]

T = TypeVar("T", int, float)

# -- validators (argparse ``type=``) ---------------------------------------------------------------

#: Largest seed accepted. torch.manual_seed takes [-2**63, 2**64 - 1] (negative seeds wrap to
#: 2**64 + seed, a second name for the same stream); [0, 2**63 - 1] keeps one name per seed, fits
#: a signed 64-bit integer wherever the run's config.json is read, and leaves room for the
#: derived seeds (seed + 1, ...) some experiments draw.
MAX_SEED = 2**63 - 1


def _checked(
    name: str, parse: Callable[[str], T], ok: Callable[[T], bool], kind: str, rule: str
) -> Callable[[str], T]:
    """The argparse type ``name``: ``parse`` the text, then require ``ok``; the messages say
    ``kind`` and ``rule``."""

    def check(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind} {rule}, got {text!r}") from None
        if not ok(value):  # NaN fails every comparison, so it never passes a range
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    check.__name__ = check.__qualname__ = name
    return check


positive_int = _checked("positive_int", int, lambda v: v >= 1, "an integer", ">= 1")
nonnegative_int = _checked("nonnegative_int", int, lambda v: v >= 0, "an integer", ">= 0")
positive_float = _checked(
    "positive_float", float, lambda v: 0 < v < math.inf, "a number", "> 0 and finite"
)
nonnegative_float = _checked(
    "nonnegative_float", float, lambda v: 0 <= v < math.inf, "a number", ">= 0 and finite"
)
#: A share of something, such as the training images kept: 0 would keep nothing.
fraction = _checked("fraction", float, lambda v: 0 < v <= 1, "a number", "in (0, 1]")
jpeg_quality = _checked("jpeg_quality", int, lambda v: 1 <= v <= 100, "an integer", "in [1, 100]")
seed = _checked("seed", int, lambda v: 0 <= v <= MAX_SEED, "an integer", "in [0, 2**63 - 1]")


def resize_side(text: str) -> int | str | None:
    """argparse type of --resize: a side in pixels (>= 1), "none" or "auto"."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a side in pixels, 'none' or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def class_names(text: str) -> list[str]:
    """argparse type: comma-separated class names, each non-empty and named once."""
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise argparse.ArgumentTypeError(f"empty class name in {text!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"classes named more than once: {', '.join(repeated)}")
    return names


# -- trainer flags -------------------------------------------------------------------------------

#: Every trainer flag's destination; each is the TrainConfig field it overrides when given
#: (``recipe`` picks the preset the others override).
TRAINER_FLAGS: tuple[str, ...] = (
    "recipe",
    "iters",
    "epochs",
    "seed",
    "device",
    "compile",
    "compile_mode",
    "grad_checkpointing",
    "cuda_graphs",
    "precision",
    "batch_size",
    "lr",
    "sync_bn",
    "threads",
    "eval_every",
    "augmentation",
)

#: The preset a command trains with when --recipe is not given and the data is not the digits
#: (which always get the ``digits`` preset). ``reslab train`` is He et al.'s protocol; a
#: fine-tuning run or an experiment is short, so the one-cycle ``fast`` recipe.
DEFAULT_RECIPES: dict[str, str] = {"train": "paper", "finetune": "fast", "analyze": "fast"}


def _trainer_flag_specs(command: str) -> dict[str, dict[str, Any]]:
    """argparse's arguments for each trainer flag of ``command``: a table, over 60 lines because
    each flag is a few lines of help, defined once for train and finetune."""
    recipe = DEFAULT_RECIPES[command]
    finetune = command == "finetune"
    return {
        "recipe": {
            "choices": tuple(PRESETS),
            "help": f"the preset the other flags override (default: digits with --data digits, "
            f"else {recipe})",
        },
        "iters": {"type": positive_int, "metavar": "STEPS", "help": "optimiser steps"},
        "epochs": {"type": positive_float, "help": "passes over the training split"},
        "seed": {
            "type": seed,
            "help": ("the new head's weights, the data split" if finetune else "initial weights")
            + ", data order and augmentation (default: the recipe's, 0)",
        },
        "device": {"choices": DEVICES, "help": "default: auto (cuda when present)"},
        "compile": {
            "action": argparse.BooleanOptionalAction,
            "help": "torch.compile the model (default: as the recipe)",
        },
        "compile_mode": {
            "choices": COMPILE_MODES,
            "help": "torch.compile mode with --compile; reduce-overhead: CUDA graphs (small nets "
            "on a GPU)",
        },
        "grad_checkpointing": {
            "action": argparse.BooleanOptionalAction,
            "help": "recompute each residual unit's activations in the backward pass: far less "
            "memory for very deep nets (ResNet-1001), same gradients, ~1/3 more compute",
        },
        "cuda_graphs": {
            "action": argparse.BooleanOptionalAction,
            "help": "capture the whole training step (forward, backward, SGD update) as one CUDA "
            "graph and replay it; no host synchronisation per step (GPU only; on a CPU the same "
            "step runs eagerly)",
        },
        "precision": {
            "choices": PRECISIONS,
            "help": "autocast of forward and loss, weights stay fp32; bf16 is slower than fp32 "
            "on CPUs without native bf16 (docs/training.md)",
        },
        "batch_size": {
            "type": positive_int,
            "help": "images per optimiser step, summed over all DDP ranks",
        },
        "lr": {
            "type": positive_float,
            "help": "peak learning rate"
            + (" of the new head (pretrained layers: x --pretrained-lr-scale)" if finetune else ""),
        },
        "sync_bn": {
            "action": argparse.BooleanOptionalAction,
            "help": "DDP: BatchNorm statistics over the global batch",
        },
        "threads": {"type": positive_int, "help": "CPU threads per process"},
        "eval_every": {
            "type": nonnegative_int,
            "metavar": "STEPS",
            "help": "optimiser steps between evaluations and checkpoints; 0: once per epoch",
        },
        "augmentation": {
            "choices": AUGMENTS,
            "help": "cifar: pad + crop + flip; photo: RandomResizedCrop + flip; imagenet: "
            "shorter side in [256, 480], crop, flip, PCA colour; auto (default): cifar up to "
            "96 px, photo above",
        },
    }


def add_trainer_options(
    parser: argparse.ArgumentParser,
    *,
    command: str,
    only: Collection[str] = TRAINER_FLAGS,
) -> None:
    """Add the trainer flags (``only`` a subset) to ``parser``, all defaulting to None so that a
    recipe's value stands unless the flag is given; ``command`` names the default recipe."""
    unknown = set(only) - set(TRAINER_FLAGS)
    if unknown:
        raise ValueError(f"not trainer flags: {sorted(unknown)}; valid: {TRAINER_FLAGS}")
    specs = _trainer_flag_specs(command)
    group = parser.add_argument_group("trainer options", "override the recipe's values")
    length = group.add_mutually_exclusive_group() if {"iters", "epochs"} <= set(only) else group
    for dest in TRAINER_FLAGS:
        if dest in only:
            target = length if dest in ("iters", "epochs") else group
            target.add_argument(f"--{dest.replace('_', '-')}", default=None, **specs[dest])


#: Every data flag's destination: how a source is read (``data_options`` turns them into
#: :func:`reslab.data.training.open_data`'s keyword arguments).
DATA_FLAGS: tuple[str, ...] = ("loader", "image_size", "resize", "skip_bad", "workers")


def add_data_options(
    parser: argparse.ArgumentParser, *, only: Collection[str] = DATA_FLAGS
) -> None:
    """Add the data flags (``only`` a subset) to ``parser``."""
    group = parser.add_argument_group("data options", "how the data is read")
    specs: dict[str, dict[str, Any]] = {
        "loader": {
            "choices": LOADERS,
            "default": "auto",
            "help": "memory: decode once into memory (small images of one size); stream: "
            "decode each batch in worker processes; auto (default): picked from the data, "
            "and said which",
        },
        "image_size": {
            "type": positive_int,
            "metavar": "N",
            "help": "the model's input side (default: the data's own size in memory, else the "
            "model's input size, e.g. 224 for resnet50, 32 for cifar_resnet20)",
        },
        "resize": {
            "type": resize_side,
            "default": "auto",
            "metavar": "SIDE|none|auto",
            "help": "evaluation view: resize the shorter side to SIDE, then crop the centre "
            "--image-size; none: resize straight to --image-size (aspect not kept); auto "
            "(default): the model's crop ratio (256 for 224, as He et al. and timm)",
        },
        "skip_bad": {
            "action": "store_true",
            "help": "leave unreadable images out (listed, and counted in summary.json) instead "
            "of stopping with an error that names the first",
        },
        "workers": {
            "type": nonnegative_int,
            "metavar": "N",
            "help": "DataLoader worker processes of the streaming loader (default: one per "
            "core, at most 8)",
        },
    }
    for dest in DATA_FLAGS:
        if dest in only:
            group.add_argument(f"--{dest.replace('_', '-')}", **specs[dest])


def refuse_data_flags_on_resume(args: argparse.Namespace, run_dir: Path) -> None:
    """--resume reads the data as the run did (its config.json and checkpoint): only
    --workers may change."""
    defaults = {"loader": "auto", "image_size": None, "resize": "auto", "skip_bad": False}
    given = [f"--{d.replace('_', '-')}" for d, v in defaults.items()
             if getattr(args, d, v) != v]  # fmt: skip
    if given:
        raise ValueError(
            f"{', '.join(given)} cannot be given with --resume: the run reads its data as it "
            f"did ({run_dir / 'config.json'} and its checkpoint's input); --workers can change"
        )


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags this parser has, as :func:`reslab.data.training.open_data` arguments."""
    return {dest: getattr(args, dest) for dest in DATA_FLAGS if hasattr(args, dest)}


def add_run_folder_options(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    """``--out`` (``default_out`` says where a run goes without it), ``--allow-nonempty`` and
    ``--resume``."""
    parser.add_argument("--out", type=Path, help=f"run folder (default {default_out})")
    parser.add_argument(
        "--allow-nonempty",
        action="store_true",
        help="let a new run use an --out folder that holds other files (they are kept; files "
        "named like a run's outputs are never replaced)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its latest checkpoint, bit-exactly, with the "
        "options in its config.json (trainer flags such as --iters, --epochs, --threads or "
        "--device, and --data for moved data, may be given)",
    )


def add_seeds_option(parser: argparse.ArgumentParser) -> None:
    """``--seeds S S ...``: train one network per seed as one seed-packed network."""
    parser.add_argument(
        "--seeds",
        type=seed,
        nargs="+",
        metavar="SEED",
        help="train one member per seed, all as one seed-packed network (each exactly as "
        "--seed S would train it, up to float rounding): ordinary run folders OUT/seed-S and "
        "OUT/summary.json with the test error's mean ± std; instead of --seed",
    )


def packed_seeds(args: argparse.Namespace) -> list[int] | None:
    """The ``--seeds`` given, checked (distinct; not with ``--seed``), or None."""
    seeds: list[int] | None = getattr(args, "seeds", None)
    if seeds is None:
        return None
    if getattr(args, "seed", None) is not None:
        raise ValueError("--seed and --seeds exclude each other: --seeds S ... sets every seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds names seed(s) {repeated} more than once")
    return list(seeds)


def trainer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer flags given on the command line, as TrainConfig fields."""
    return {
        dest: getattr(args, dest)
        for dest in TRAINER_FLAGS
        if dest != "recipe" and getattr(args, dest, None) is not None
    }


def train_config(args: argparse.Namespace, *, command: str, data: str | None) -> TrainConfig:
    """The recipe (``--recipe``, else the digits preset for the digits, else the command's
    default) with the given trainer flags applied. A --batch-size without --lr scales the
    recipe's learning rate with it (the linear scaling rule, Goyal et al. 2017: lr x k for
    k times the batch), and says so."""
    recipe = args.recipe or ("digits" if data == "digits" else DEFAULT_RECIPES[command])
    overrides = trainer_overrides(args)
    base = TrainConfig.preset(recipe)
    if "batch_size" in overrides and "lr" not in overrides:
        overrides["lr"] = base.lr * overrides["batch_size"] / base.batch_size
        if overrides["lr"] != base.lr:
            print(
                f"lr {overrides['lr']:g}: the {recipe} recipe's {base.lr:g} at batch "
                f"{base.batch_size}, scaled linearly to batch {overrides['batch_size']}",
                flush=True,
            )
    return TrainConfig.preset(recipe, **overrides)


# -- --resume ------------------------------------------------------------------------------------


def claim_run_folder(
    folder: Path | None, *, resume: bool, allow_nonempty: bool = False
) -> contextlib.AbstractContextManager[Any]:
    """The lock on the run folder of ``--resume`` or ``--out``, taken before the data is read, so
    a second process on a folder in use stops at once (exit status 2); ``fit`` takes it again
    and keeps it while it trains. A new run's folder is checked first (and left untouched if
    refused, :func:`~reslab.train.setup.refuse_occupied`). ``None``: ``fit`` takes the default
    folder itself."""
    if folder is None or (resume and not Path(folder).is_dir()):
        return contextlib.nullcontext()  # a missing run folder: the resume's own error names it
    if not resume:
        refuse_occupied(Path(folder), allow_nonempty=allow_nonempty)
    return FolderLock(Path(folder))


def resume_config(args: argparse.Namespace, run_dir: Path) -> tuple[dict[str, Any], TrainConfig]:
    """A run folder's config.json and its trainer config with this command's flags applied (for
    ``reslab train --resume`` and ``reslab finetune --resume``); sets the thread count."""
    if getattr(args, "seed", None) is not None:  # the checkpoint's RNG states decide, not a seed
        raise ValueError("--seed cannot be changed on --resume: the run continues its RNG states")
    if getattr(args, "allow_nonempty", False):
        raise ValueError("--allow-nonempty is for a new run's --out folder, not --resume")
    if getattr(args, "seeds", None) is not None:
        raise ValueError("--seeds cannot be given on --resume: a packed run keeps its members")
    saved = read_run_config(run_dir)
    cfg = TrainConfig.from_dict({**saved["train_config"], **trainer_overrides(args)})
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, iters=None)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return saved, cfg


def data_spec(saved: dict[str, Any], run_dir: Path) -> str:
    """The data a run trained on, as its config.json records it (``--data`` of the command)."""
    spec = saved.get("data_spec")
    if not isinstance(spec, str):  # a run started from Python, without run_info
        raise ValueError(
            f"config.json in {run_dir} does not say which data the run trained on: pass --data"
        )
    return spec


def check_train_resume(run_dir: Path, saved: dict[str, Any]) -> None:
    """For ``reslab train --resume``: a fine-tuning run (its config.json, ``saved``, has a
    ``finetune`` entry) has other optimiser groups, a freeze schedule and data options."""
    if "finetune" in saved:
        raise ValueError(
            f"{run_dir} is a fine-tuning run (its optimiser groups, freeze schedule and data "
            f"options come from reslab finetune): continue it with "
            f"`reslab finetune --resume {run_dir}`"
        )

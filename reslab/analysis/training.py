"""Training for the experiments goes through the library trainer (:func:`reslab.train.fit`).

This module only builds the twins the experiments compare and fixes one recipe per experiment, so
every network in a comparison is trained identically.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reslab.models import ResNet, cifar_config

if TYPE_CHECKING:
    from reslab.train import TrainConfig

__all__ = [
    "TrainSpec",
    "TrainedNet",
    "cifar_net",
    "experiment_meta",
    "recipe",
    "setup",
    "single_view_accuracy",
    "train_net",
]

#: Default data sets: the 8x8 digits for --quick, CIFAR-10 as JPEG otherwise.
CIFAR_ZIP = "../shared/data/cifar10-jpeg.zip"


def cifar_net(
    depth: int,
    *,
    residual: bool = True,
    ordering: str = "original",
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: str = "A",
    norm: str = "batch",
) -> ResNet:
    """He et al. 2015 §4.2's CIFAR net of ``depth = 6n + 2`` layers (or its plain twin), built
    by :func:`reslab.models.cifar_config`."""
    cfg = cifar_config(
        depth,
        ordering=ordering,
        in_channels=in_channels,
        num_classes=num_classes,
        shortcut=shortcut if residual else "none",
        norm=norm,
    )
    return ResNet(cfg)


def recipe(
    data_name: str, iters: int, *, seed: int = 0, preset: str | None = None, **overrides: Any
) -> TrainConfig:
    """One recipe for every network of an experiment: the trainer's ``digits`` preset on the
    digits, its ``fast`` preset (SGD + Nesterov, one-cycle) elsewhere, cut to ``iters``;
    ``preset`` picks another (``"paper"``: He et al. 2015 §4.2)."""
    from reslab.train import TrainConfig

    preset = preset or ("digits" if data_name == "digits" else "fast")
    base: dict[str, Any] = {"iters": iters, "seed": seed}
    if preset == "fast":
        # The preset's bf16 autocast ran ~10x slower than fp32 on this CPU (no bf16 units):
        # 18 s vs 1.8 s per ResNet-20 step of 128 images on one thread.
        base["precision"] = "fp32"
    base["eval_every"] = max(1, iters // 10)  # ~10 points on the curves
    base.update(overrides)
    return TrainConfig.preset(preset, **base)


@dataclass
class TrainedNet:
    name: str
    model: nn.Module
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    seconds: float
    losses: list[float] = field(default_factory=list)  # training loss of every optimiser step


def train_net(name: str, model: nn.Module, splits: Any, cfg: Any, *, seed: int = 0) -> TrainedNet:
    """``fit`` one network (nothing written to disk) and time it."""
    from reslab.train import fit

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    result = fit(model, splits, cfg, None, verbose=False)
    seconds = time.perf_counter() - t0
    return TrainedNet(name, result.model, result.history, result.summary, seconds, result.losses)


def train_twin(family: str, depth: int, splits: Any, cfg: Any, *, seed: int = 0) -> TrainedNet:
    """Train the ``family`` ("plain" or "resnet") CIFAR-style net of ``depth`` on ``splits``.

    The twins share the seed, so both start from the same draw of the random number generator.
    """
    torch.manual_seed(seed)
    model = cifar_net(
        depth,
        residual=family == "resnet",
        in_channels=splits.in_channels,
        num_classes=splits.num_classes,
    )
    return train_net(f"{family}-{depth}", model, splits, cfg, seed=seed)


def single_view_accuracy(summary: dict[str, Any]) -> float:
    """Test accuracy of one view per image, as the curves and train errors are measured (a
    recipe with ``eval_flip`` makes ``test_accuracy`` the image + mirror average)."""
    return summary.get("test_accuracy_single_view", summary["test_accuracy"])


def light_summary(summary: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "test_accuracy",
        "val_accuracy",
        "final_train_loss",
        "train_seconds",
        "images_per_second",
        "steps",
        "epochs",
        "data",
        "recipe",
    )
    return {k: summary.get(k) for k in keep}


@dataclass(frozen=True)
class TrainSpec:
    """What the training-based experiments share: data, budget and recipe overrides.

    ``test_size`` keeps a seeded random subset of the test split: on a CPU, evaluating all
    10,000 CIFAR test images costs more than a short training run.
    """

    data: str | None = None  # None: digits with --quick, else the CIFAR-10 JPEG zip
    seed: int = 0
    iters: int | None = None  # None: the experiment's default budget
    train_fraction: float = 1.0
    val_size: int | None = None
    test_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields, or "preset"


def setup(spec: TrainSpec, *, quick: bool, quick_iters: int, full_iters: int) -> tuple[Any, Any]:
    """The data and the one recipe of an experiment."""
    from reslab.analysis.common import load_splits
    from reslab.data import Split

    data = spec.data or ("digits" if quick else CIFAR_ZIP)
    splits = load_splits(
        data, seed=spec.seed, train_fraction=spec.train_fraction, val_size=spec.val_size
    )
    if spec.test_size is not None and spec.test_size < len(splits.test.labels):
        g = torch.Generator().manual_seed(spec.seed)
        idx = torch.randperm(len(splits.test.labels), generator=g)[: spec.test_size]
        splits = dataclasses.replace(
            splits, test=Split(splits.test.images[idx], splits.test.labels[idx])
        )
    n = spec.iters or (quick_iters if quick else full_iters)
    return splits, recipe(splits.name, n, seed=spec.seed, **spec.overrides)


def experiment_meta(
    experiment: str, spec: TrainSpec, splits: Any, cfg: Any, *, quick: bool, **extra: Any
) -> dict[str, Any]:
    """:func:`reslab.record.run_record` of the device ``cfg`` trains on, plus the data sizes and
    the full training config."""
    from reslab.record import run_record
    from reslab.train import resolve_device

    return run_record(
        resolve_device(cfg.device),
        experiment=experiment,
        quick=quick,
        data=splits.name,
        seed=spec.seed,
        train_fraction=spec.train_fraction,
        train_images=len(splits.train),
        val_images=len(splits.val),
        test_images=len(splits.test),
        train_config=cfg.to_dict(),
        **extra,
    )

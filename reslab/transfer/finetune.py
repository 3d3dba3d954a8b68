"""Fine-tuning: a pretrained network adapted to a new data set, trained by ``reslab.train.fit``.

The seed's recipe (Seed 000, "Transfer Learning"): the first layer is adapted when the input
differs, the last when the labels differ, every other layer starts from the pretrained weights,
then the network is trained on the new data, usually for far fewer steps than from scratch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.data.augment import Normalize
from reslab.models import DenseConfig, ResNetConfig, build_model, get_config
from reslab.models.pretrained import (
    LoadReport,
    architecture_overrides,
    checkpoint_config,
    load_pretrained,
)
from reslab.models.sizing import check_buildable
from reslab.models.weights import cifar_resnet_name, read_weights
from reslab.train.checkpoint import check_format_version
from reslab.transfer.freeze import (
    NONE,
    check_freeze_point,
    gradual_schedule,
    param_groups,
    unfreeze_schedule,
)

__all__ = [
    "FinetuneOptions",
    "finetune",
    "pretrained_model",
    "resume_finetune",
    "source_input",
    "source_normalization",
]

NEW_MODULES = ("fc",)  # trained at the full learning rate: the (replaced) classifier


@dataclass(frozen=True)
class FinetuneOptions:
    """How the pretrained layers are treated while the new data trains the network."""

    freeze_until: str = "none"  # "stem", "layer1", ...: freeze up to and including that part
    unfreeze_every: int | None = None  # steps between unfreezing one more part, deepest first
    pretrained_lr_scale: float = 0.1  # learning rate of pretrained layers relative to the head
    sha256: str | None = None  # expected SHA-256 of the weight file

    def __post_init__(self) -> None:
        # checked here, before data is loaded or a run folder written
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            raise ValueError(f"unfreeze_every must be >= 1 step, got {self.unfreeze_every}")
        if not self.pretrained_lr_scale >= 0:  # also NaN; 0 keeps the pretrained layers fixed
            raise ValueError(f"pretrained_lr_scale must be >= 0, got {self.pretrained_lr_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pretrained_model(
    path: str | Path,
    *,
    num_classes: int,
    in_channels: int,
    model: str | None = None,
    sha256: str | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> tuple[nn.Module, LoadReport]:
    """A network with ``num_classes`` outputs and ``in_channels`` inputs initialised from ``path``.

    A reslab checkpoint carries its architecture, a PyTorch CIFAR ResNet file its depth
    (``cifar_resnet{6n+2}``); torchvision/timm files need ``model`` (a registered name such as
    ``"resnet50"`` or ``"preact_resnet50"``). Where names and shapes cannot tell the function,
    :func:`reslab.models.pretrained.architecture_overrides` decides (their bottlenecks stride the
    3x3, the CIFAR files split option A's zero channels).
    Dense networks take flattened images: ``image_size`` (side, or (H, W)) then checks that the
    file's input layer fits ``in_channels`` x H x W features (a dense first layer is not adapted).
    """
    weights = read_weights(path, sha256=sha256)
    new: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}
    model = model or cifar_resnet_name(weights)  # that family's files name their depth
    if model is not None:
        config = get_config(model)
        if isinstance(config, DenseConfig):
            config = _dense_config(config, path, in_channels, image_size, num_classes, False)
        else:
            config = get_config(model, **new, **architecture_overrides(weights, config))
    elif weights.format == "reslab":
        check_format_version(weights.meta, weights.path)
        config = checkpoint_config(weights)  # parsed and sized before anything is built
        if isinstance(config, DenseConfig):
            config = _dense_config(config, path, in_channels, image_size, num_classes, True)
        else:
            config = dataclasses.replace(config, **new)
    else:
        raise ValueError(
            f"{path} is a {weights.format} state dict without an architecture: name the "
            "registered model it fits (e.g. --model resnet50, or preact_resnet50 for timm resnetv2)"
        )
    check_buildable(config, source=f"the network for {path}")
    net = build_model(config)
    return net, load_pretrained(net, weights)  # the file read above, not a second time


def _dense_config(
    config: DenseConfig,
    path: str | Path,
    in_channels: int,
    image_size: int | tuple[int, int] | None,
    num_classes: int,
    from_file: bool,
) -> DenseConfig:
    """``config`` with the new classifier, its input sized to the images when that is known."""
    widths = config.widths
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        features = in_channels * h * w
        if features != widths[0] and from_file:
            raise ValueError(
                f"{path} is a dense network on {widths[0]} input features, but the images give "
                f"{in_channels}x{h}x{w} = {features}; a dense input layer cannot be adapted"
            )
        widths = (features, *widths[1:])  # a registered name: sized to the data, like train
    return dataclasses.replace(config, widths=widths, num_classes=num_classes)


def source_input(path: str | Path, model: str | None = None) -> dict[str, Any] | None:
    """The input the weights in ``path`` were trained on, as timm's ``default_cfg`` keys
    (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``): a reslab checkpoint's
    own input config, else the registered ``model``'s (ImageNet's for the ImageNet ResNets,
    which torchvision and timm files are), else its architecture's; None for dense networks.
    Fine-tuning takes its input size and evaluation view from here unless told otherwise."""
    from reslab.models.resnet import default_cfg

    weights = None if model is not None else read_weights(path)
    model = model or (cifar_resnet_name(weights) if weights is not None else None)
    if model is not None:
        config = get_config(model)
        return default_cfg(config) if isinstance(config, ResNetConfig) else None
    assert weights is not None
    meta = weights.meta
    saved: dict[str, Any] | None = meta.get("input_config")
    if saved is not None:
        h, w = saved["size"]
        return {
            "input_size": (saved["channels"], h, w),
            "crop_pct": min(h, w) / saved["resize"] if saved.get("resize") else 1.0,
            "crop_mode": "squash" if saved.get("resize") is None else "center",
            "interpolation": saved["interpolation"],
            "mean": tuple(saved["mean"]),
            "std": tuple(saved["std"]),
        }
    if meta.get("model_kind", "resnet") == "resnet" and "model_config" in meta:
        return default_cfg(ResNetConfig.from_dict(meta["model_config"]))
    return None


def source_normalization(net: nn.Module, report: LoadReport) -> Normalize | None:
    """How inputs are normalised for fine-tuning: a torchvision or timm network with the mean and
    std its weights were trained with (its ``pretrained_cfg``, ImageNet's), since the pretrained
    first layer expects them; None (the new data's own statistics, as training from scratch) for
    reslab checkpoints, whose statistics were fitted to their own data, and dense networks."""
    cfg = getattr(net, "pretrained_cfg", None)
    if report.format == "reslab" or cfg is None:
        return None
    shape = (len(cfg["mean"]), 1, 1)
    mean, std = torch.tensor(cfg["mean"]).view(shape), torch.tensor(cfg["std"]).view(shape)
    return Normalize("channel", mean, std)


def finetune(
    path: str | Path,
    splits: Any,
    cfg: Any,
    out_dir: Path | None = None,
    *,
    options: FinetuneOptions = FinetuneOptions(),
    model: str | None = None,
    run_info: dict[str, Any] | None = None,
    verbose: bool | None = None,
    allow_nonempty: bool = False,
) -> Any:
    """Fine-tune the weights in ``path`` on ``splits`` (``reslab.data.DataSplits`` in memory, or
    any ``reslab.data.training.TrainingData``) with the trainer config ``cfg``; returns
    ``reslab.train.fit``'s ``FitResult``. ``out_dir`` becomes the same run folder ``reslab
    train`` writes, with the load report (and ``run_info``) in its config.json. Inputs are
    normalised as :func:`source_normalization` says. ``allow_nonempty``: see
    :func:`reslab.train.fit`."""
    from reslab.data.training import as_training_data

    data = as_training_data(splits)
    torch.manual_seed(cfg.seed)  # the new head's initial weights, as `reslab train` seeds its own
    net, report = pretrained_model(
        path,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        model=model,
        sha256=options.sha256,
        image_size=data.image_size,
    )
    # before fit writes config.json: a bad part must not leave a run folder behind
    if getattr(net, "stage_names", None) is None and options.freeze_until != NONE:
        raise ValueError(
            f"{path} holds a {type(net).__name__}, which has no stages to freeze: fine-tune it "
            "whole (--freeze-until none)"
        )
    check_freeze_point(net, options.freeze_until)
    schedule = {0: options.freeze_until}
    if options.unfreeze_every:
        schedule = gradual_schedule(net, options.freeze_until, options.unfreeze_every)
    info = {
        **(run_info or {}),
        "finetune": {
            **options.to_dict(),
            "from": str(path),
            "source_format": report.format,
            "source_classes": report.meta.get("classes"),
            "unfreeze_schedule": {str(k): v for k, v in schedule.items()},
            "new_modules": list(NEW_MODULES),
            "load_report": str(report),
        },
    }
    if verbose or (verbose is None and out_dir is not None):
        print(report, flush=True)
    norm = source_normalization(net, report)
    return _fit(net, data, cfg, out_dir, info, resume=False, verbose=verbose, normalization=norm,
                allow_nonempty=allow_nonempty)  # fmt: skip


def resume_finetune(
    run_dir: str | Path,
    splits: Any,
    cfg: Any,
    *,
    run_info: dict[str, Any] | None = None,
    verbose: bool | None = None,
) -> Any:
    """Continue the fine-tuning run in ``run_dir`` from its latest checkpoint, bit-exactly.

    The parameter groups (learning-rate scales) and the freeze schedule are rebuilt from
    ``run_dir/config.json``; ``splits`` must be the run's data (same classes, train fraction,
    validation split and seed) and ``cfg`` its trainer config. Returns ``fit``'s ``FitResult``.
    """
    from reslab.train.checkpoint import LATEST, load_model
    from reslab.train.outputs import read_run_config

    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if "finetune" not in saved:
        raise ValueError(
            f"{run_dir} is not a fine-tuning run: continue it with "
            f"`reslab train --resume {run_dir}`"
        )
    net = load_model(run_dir / LATEST)  # the architecture; fit restores weights and optimiser
    info = {**(run_info or {}), "finetune": saved["finetune"]}
    return _fit(net, splits, cfg, run_dir, info, resume=True, verbose=verbose)


def _fit(
    net: nn.Module,
    splits: Any,
    cfg: Any,
    out_dir: Path | None,
    info: dict[str, Any],
    *,
    resume: bool,
    verbose: bool | None,
    normalization: Normalize | None = None,
    allow_nonempty: bool = False,
) -> Any:
    """``fit`` with the parameter groups and freeze schedule that ``info["finetune"]`` records,
    so a resumed run rebuilds exactly the optimiser and schedule of the first."""
    from reslab.train import fit  # the trainer is heavy; the loaders above do not need it

    ft = info["finetune"]
    schedule = {int(k): v for k, v in ft["unfreeze_schedule"].items()}
    groups = param_groups(
        net,
        pretrained_lr_scale=ft["pretrained_lr_scale"],
        new=tuple(ft["new_modules"]),
        decay_all=cfg.decay_all,
    )
    return fit(
        net,
        splits,
        cfg,
        out_dir,
        param_groups=groups,
        on_step=unfreeze_schedule(schedule),
        resume=resume,
        allow_nonempty=allow_nonempty,
        run_info=info,
        verbose=verbose,
        normalization=normalization,
    )

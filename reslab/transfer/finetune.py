"""Fine-tuning: a pretrained network adapted to a new data set, trained by ``reslab.train.fit``.

The seed's recipe (Seed 000, "Transfer Learning"): the first layer is adapted when the input
differs, the last when the labels differ, every other layer starts from the pretrained weights,
then the network is trained on the new data, usually for far fewer steps than from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from reslab.models import DenseConfig, ResNetConfig, build_model, get_config
from reslab.transfer.freeze import gradual_schedule, param_groups, unfreeze_schedule
from reslab.transfer.load import LoadReport, load_pretrained
from reslab.transfer.weights import read_weights

__all__ = ["FinetuneOptions", "finetune", "pretrained_model"]


@dataclass(frozen=True)
class FinetuneOptions:
    """How the pretrained layers are treated while the new data trains the network."""

    freeze_until: str = "none"  # "stem", "layer1", ...: freeze up to and including that part
    unfreeze_every: int | None = None  # steps between unfreezing one more part, deepest first
    pretrained_lr_scale: float = 0.1  # learning rate of pretrained layers relative to the head
    sha256: str | None = None  # expected SHA-256 of the weight file

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pretrained_model(
    path: str | Path,
    *,
    num_classes: int,
    in_channels: int,
    model: str | None = None,
    sha256: str | None = None,
) -> tuple[nn.Module, LoadReport]:
    """A network with ``num_classes`` outputs and ``in_channels`` inputs initialised from ``path``.

    A reslab checkpoint carries its architecture; torchvision/timm files need ``model`` (a
    registered name such as ``"resnet50"`` or ``"preact_resnet50"``). Their bottlenecks stride
    the 3x3 convolution, so bottleneck models are then built with ``stride_in="3x3"``.
    """
    weights = read_weights(path, sha256=sha256)
    new = {"num_classes": num_classes, "in_channels": in_channels}
    if model is not None:
        config = get_config(model)
        if weights.format != "reslab" and getattr(config, "block", None) == "bottleneck":
            new["stride_in"] = "3x3"
        config = get_config(model, **new)
    elif weights.format == "reslab":
        kind = weights.meta.get("model_kind", "resnet")
        cls = DenseConfig if kind == "dense" else ResNetConfig
        config = cls.from_dict({**weights.meta["model_config"], **new})
    else:
        raise ValueError(
            f"{path} is a {weights.format} state dict without an architecture: name the "
            "registered model it fits (e.g. --model resnet50, or preact_resnet50 for timm resnetv2)"
        )
    net = build_model(config)
    return net, load_pretrained(net, path, sha256=sha256)


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
) -> Any:
    """Fine-tune the weights in ``path`` on ``splits`` (a ``reslab.data.DataSplits``) with the
    trainer config ``cfg``; returns ``reslab.train.fit``'s ``FitResult``. ``out_dir`` becomes the
    same run folder ``reslab train`` writes, with the load report (and ``run_info``) in its
    config.json."""
    from reslab.train import fit  # the trainer is heavy; the loaders above do not need it

    net, report = pretrained_model(
        path,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        model=model,
        sha256=options.sha256,
    )
    schedule = {0: options.freeze_until}
    if options.unfreeze_every:
        schedule = gradual_schedule(net, options.freeze_until, options.unfreeze_every)
    groups = param_groups(
        net, pretrained_lr_scale=options.pretrained_lr_scale, decay_all=cfg.decay_all
    )
    info = {
        **(run_info or {}),
        "finetune": {
            **options.to_dict(),
            "from": str(path),
            "source_format": report.format,
            "source_classes": report.meta.get("classes"),
            "unfreeze_schedule": {str(k): v for k, v in schedule.items()},
            "load_report": str(report),
        },
    }
    if verbose or (verbose is None and out_dir is not None):
        print(report, flush=True)
    return fit(
        net,
        splits,
        cfg,
        out_dir,
        param_groups=groups,
        on_step=unfreeze_schedule(schedule),
        run_info=info,
        verbose=verbose,
    )

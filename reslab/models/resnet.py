"""The convolutional ResNet: stem, stages of residual units, global pooling and a classifier."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn

from reslab.models.blocks import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualBlock,
    UnitLeafTracer,
)
from reslab.models.config import ResNetConfig
from reslab.models.features import FeatureInfo
from reslab.models.layers import (
    NORMS,
    ORDERINGS,
    STEMS,
    check_input,
    conv2d,
    kaiming_init_,
    make_shortcut,
    traced_for_script,
)
from reslab.models.ordered import OrderedBasicBlock, OrderedBottleneck
from reslab.models.recompute import checkpoint_module
from reslab.models.shortcuts import make_combine

__all__ = ["BLOCKS", "ResNet", "default_cfg", "make_block"]

fx.wrap("check_input")

#: The explicit block of each (block, ordering) pair the registered models use; every other
#: ordering of He et al. 2016 Fig. 4 is built by the op-list units of :mod:`reslab.models.ordered`.
BLOCKS: dict[tuple[str, str], type[ResidualBlock]] = {
    ("basic", "original"): BasicBlock,
    ("bottleneck", "original"): Bottleneck,
    ("basic", "full_preact"): PreActBasicBlock,
    ("bottleneck", "full_preact"): PreActBottleneck,
}
_ORDERED: dict[str, type[ResidualBlock]] = {
    "basic": OrderedBasicBlock,
    "bottleneck": OrderedBottleneck,
}


def make_block(
    config: ResNetConfig, in_channels: int, width: int, stride: int, *, first_unit: bool = False
) -> ResidualBlock:
    """One residual unit of ``config`` reading ``in_channels``, with its shortcut.

    ``first_unit``: the network's first unit, whose shortcut shares a pre-activation with the
    branch (He et al. 2016, appendix).
    """
    norm_layer = NORMS[config.norm]
    preact = bool(ORDERINGS[config.ordering].preact)
    explicit = BLOCKS.get((config.block, config.ordering))
    block = explicit or _ORDERED[config.block]
    # A pre-activation unit's projection reads an already normalised input: a bare conv.
    shortcut = make_shortcut(
        config.shortcut,
        in_channels,
        width * block.expansion,
        stride,
        norm_layer=None if preact else norm_layer,
        pad=config.shortcut_pad,
    )
    # None for h(x) + F(x); a scaled or gated shortcut of He et al. 2016 Table 1 otherwise
    combine = make_combine(config.combine, in_channels, width * block.expansion, stride)
    kwargs: dict[str, Any] = {"shortcut": shortcut, "combine": combine, "norm_layer": norm_layer}
    if config.block == "bottleneck":
        kwargs["stride_in"] = config.stride_in
    if preact or explicit is None:
        kwargs["first_unit"] = first_unit
    if explicit is None:
        kwargs["ordering"] = config.ordering
    return block(in_channels, width, stride, **kwargs)


def default_cfg(config: ResNetConfig) -> dict[str, Any]:
    """The input a model of ``config`` expects, under timm's ``pretrained_cfg`` keys.

    Size, crop and normalisation are those of the data set its stem was designed for (ImageNet
    for ``stem="imagenet"``, CIFAR-10 for ``"cifar"``; :data:`~reslab.models.layers.STEMS`). For
    ``in_channels`` other than 3 every channel gets the mean of the RGB statistics.
    """
    stem = STEMS[config.stem]
    mean, std = stem.mean, stem.std
    if config.in_channels != len(mean):
        mean = (sum(mean) / len(mean),) * config.in_channels
        std = (sum(std) / len(std),) * config.in_channels
    reduction = stem.reduction * 2 ** (len(config.layers) - 1)
    side = math.ceil(stem.image_size / reduction)
    return {
        "input_size": (config.in_channels, stem.image_size, stem.image_size),
        "interpolation": "bilinear",
        "mean": mean,
        "std": std,
        "crop_pct": stem.crop_pct,
        "crop_mode": "center",
        "num_classes": config.num_classes,
        "pool_size": (side, side),
        "first_conv": "conv1",
        "classifier": "fc",
    }


class ResNet(nn.Module):
    """A residual (or, with ``shortcut="none"``, plain) convolutional network.

    Post-activation models use torchvision's module names (``conv1, bn1, layer1..4, fc``) so a
    torchvision state dict loads with ``strict=True``. Pre-activation models have no BN after the
    stem convolution and end with ``final_bn``/``final_act`` (He et al. 2016, appendix).

    Modules are registered in the order the forward runs them (stem, stages, final
    pre-activation, pooling, classifier); :class:`~reslab.models.features.FeatureListNet`
    relies on it. timm's model interface: ``forward_features``, ``forward_head``,
    ``reset_classifier``, ``get_classifier``, ``num_classes``, ``num_features``,
    ``feature_info``, ``pretrained_cfg`` (alias ``default_cfg``) and ``set_grad_checkpointing``.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        ordering = ORDERINGS[config.ordering]
        stem = STEMS[config.stem]
        norm_layer = NORMS[config.norm]

        # Stem: the first conv and, for post-activation orderings, its BN-ReLU.
        self.conv1 = conv2d(config.in_channels, config.stem_width, stem.kernel_size, stem.stride)
        self.bn1 = norm_layer(config.stem_width) if "bn" in ordering.stem else None
        self.act1 = nn.ReLU() if "act" in ordering.stem else None
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem.max_pool else nn.Identity()
        levels = [_level(config.stem_width, stem.stride, _last_of(self, "conv1", "bn1", "act1"))]

        # Stages conv2_x ... : the first stage keeps the resolution (the stem already reduced it),
        # every later one halves it in its first unit (He et al. 2015, §3.3).
        channels, reduction = config.stem_width, stem.reduction
        self.stage_names: list[str] = []
        for i, (n_units, width) in enumerate(zip(config.layers, config.widths, strict=True)):
            units = []
            for j in range(n_units):
                stride = 2 if (i > 0 and j == 0) else 1
                units.append(
                    make_block(config, channels, width, stride, first_unit=(i == 0 and j == 0))
                )
                channels = units[-1].out_channels
            reduction *= 2 if i > 0 else 1
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*units))
            self.stage_names.append(name)
            levels.append(_level(channels, reduction, name))
        self.num_features = channels

        # "For the last Residual Unit ... we adopt an extra activation right after its
        # element-wise addition" (He et al. 2016, appendix).
        self.final_bn = norm_layer(channels) if "bn" in ordering.final else None
        self.final_act = nn.ReLU() if "act" in ordering.final else None
        levels[-1]["module"] = _last_of(self, levels[-1]["module"], "final_bn", "final_act")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = self._classifier(config.num_classes)

        self.num_classes = config.num_classes
        self.grad_checkpointing = False  # set_grad_checkpointing
        self.feature_info = FeatureInfo(levels, range(len(levels)))
        self.pretrained_cfg = default_cfg(config)
        self.default_cfg = self.pretrained_cfg  # timm's older name for the same dict

        kaiming_init_(self)
        if config.zero_init_residual:
            for unit in self.units():
                unit.zero_init_last()

    # -- structure ------------------------------------------------------------------------------
    def units(self) -> Iterator[ResidualBlock]:
        """Every residual unit, in forward order."""
        for name in self.stage_names:
            yield from getattr(self, name)

    def stem(self, x: Tensor) -> Tensor:
        """conv1 (and BN-ReLU for post-activation orderings), without the max-pool."""
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        if self.act1 is not None:
            x = self.act1(x)
        return x

    def final(self, x: Tensor) -> Tensor:
        """The final pre-activation of pre-activation nets (identity for post-activation)."""
        if self.final_bn is not None:
            x = self.final_bn(x)
        if self.final_act is not None:
            x = self.final_act(x)
        return x

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before global pooling (after the final pre-activation, if any)."""
        check_input(x, self.config.in_channels)
        x = self.maxpool(self.stem(x))
        # not while torch.fx traces: the graph is the plain forward, recomputation is runtime
        if self.grad_checkpointing and torch.is_grad_enabled() and not isinstance(x, fx.Proxy):
            for unit in self.units():
                x = checkpoint_module(unit, x)
        else:
            for name in self.stage_names:
                x = getattr(self, name)(x)
        return self.final(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling and the classifier (``pre_logits``: the pooled features)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- memory ---------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each residual unit's input for the backward pass and recompute the rest
        there (timm's switch of the same name): activation memory falls from every layer's
        outputs to one tensor per unit, for about one more forward pass of compute. Gradients,
        parameters and BN statistics stay exactly those of an ordinary step
        (:func:`~reslab.models.recompute.checkpoint_module`). Only while gradients are enabled;
        evaluation under ``torch.no_grad`` runs the ordinary forward."""
        self.grad_checkpointing = enable

    # -- classifier -----------------------------------------------------------------------------
    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs; 0
        removes it, so the model returns its pooled features (``num_features`` of them)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        w = self.conv1.weight  # the new head lives where the network does, in its dtype
        self.fc = self._classifier(num_classes).to(device=w.device, dtype=w.dtype)
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.pretrained_cfg["num_classes"] = num_classes

    # -- export ---------------------------------------------------------------------------------
    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` cannot loop over a config-dependent number of stages held under
        their own names; it scripts this network's ``torch.fx`` graph instead, in which each unit
        is one call (the units themselves are scripted as they are). Same modules and names."""
        return traced_for_script(self, UnitLeafTracer())


def _level(num_chs: int, reduction: int, module: str) -> dict[str, Any]:
    return {"num_chs": num_chs, "reduction": reduction, "module": module}


def _last_of(model: nn.Module, *names: str) -> str:
    """The last of ``names`` that ``model`` has as a module (optional layers are None)."""
    return [n for n in names if getattr(model, n, None) is not None][-1]

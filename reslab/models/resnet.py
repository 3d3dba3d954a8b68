"""The convolutional ResNet: stem, stages of residual units, global pooling and a classifier."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from reslab.models.blocks import BLOCKS
from reslab.models.config import ResNetConfig
from reslab.models.layers import ORDERINGS, STEMS, conv2d, kaiming_init_

__all__ = ["ResNet"]


class ResNet(nn.Module):
    """A residual (or, with ``shortcut="none"``, plain) convolutional network.

    Post-activation models use torchvision's module names (``conv1, bn1, layer1..4, fc``) so a
    torchvision state dict loads with ``strict=True``. Pre-activation models have no BN after the
    stem convolution and end with ``final_bn``/``final_act`` (He et al. 2016, appendix).
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        ordering = ORDERINGS[config.ordering]
        stem = STEMS[config.stem]
        block = BLOCKS[config.block]

        # Stem: the first conv and, for post-activation orderings, its BN-ReLU.
        self.conv1 = conv2d(config.in_channels, config.stem_width, stem.kernel_size, stem.stride)
        self.bn1 = nn.BatchNorm2d(config.stem_width) if "bn" in ordering.stem else None
        self.stem_act = "act" in ordering.stem
        self.act = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem.max_pool else nn.Identity()

        # Stages conv2_x ... : the first stage keeps the resolution (the stem already reduced it),
        # every later one halves it in its first unit (He et al. 2015, §3.3).
        channels = config.stem_width
        self.stage_names: list[str] = []
        for i, (n_units, width) in enumerate(zip(config.layers, config.widths, strict=True)):
            units = []
            for j in range(n_units):
                stride = 2 if (i > 0 and j == 0) else 1
                units.append(
                    block(
                        channels,
                        width,
                        stride,
                        ordering=config.ordering,
                        shortcut=config.shortcut,
                        shortcut_pad=config.shortcut_pad,
                        stride_in=config.stride_in,
                        first_unit=(i == 0 and j == 0),
                    )
                )
                channels = units[-1].out_channels
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*units))
            self.stage_names.append(name)
        self.num_features = channels

        # "For the last Residual Unit ... we adopt an extra activation right after its
        # element-wise addition" (He et al. 2016, appendix).
        self.final_bn = nn.BatchNorm2d(channels) if "bn" in ordering.final else None
        self.final_act = "act" in ordering.final
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, config.num_classes)

        kaiming_init_(self)
        if config.zero_init_residual:
            for unit in self.units():
                unit.zero_init_last()

    # -- structure ------------------------------------------------------------------------------
    def units(self) -> Iterator[nn.Module]:
        """Every residual unit, in forward order."""
        for name in self.stage_names:
            yield from getattr(self, name)

    def stem(self, x: Tensor) -> Tensor:
        """conv1 (and BN-ReLU for post-activation orderings), without the max-pool."""
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        if self.stem_act:
            x = self.act(x)
        return x

    def _check_input(self, x: Tensor) -> None:
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(
                f"expected input of shape (N, {c}, H, W), got {tuple(x.shape)}; "
                f"this model was built with in_channels={c}"
            )

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before global pooling (after the final pre-activation, if any)."""
        self._check_input(x)
        x = self.maxpool(self.stem(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.final(x)

    def final(self, x: Tensor) -> Tensor:
        if self.final_bn is not None:
            x = self.final_bn(x)
        if self.final_act:
            x = self.act(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        w = self.fc.weight  # the new head lives where the old one did, in its dtype
        self.fc = nn.Linear(self.num_features, num_classes).to(device=w.device, dtype=w.dtype)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

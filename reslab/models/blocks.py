"""Residual units, written as the papers' equations.

A unit computes ``x_{l+1} = f(h(x_l) + F(x_l))`` (He et al. 2016, eqs. 1-2): ``h`` is the
shortcut, ``F`` the residual branch and ``f`` what follows the addition.

- :class:`BasicBlock`, :class:`Bottleneck`: post-activation, the "original" unit of He et al.
  2015 (Fig. 5; He et al. 2016 Fig. 4(a)): ``F`` ends in BN and ``f`` is a ReLU.
- :class:`PreActBasicBlock`, :class:`PreActBottleneck`: full pre-activation (He et al. 2016,
  Fig. 4(e)): BN and ReLU precede every weight layer and ``f`` is the identity.

The ablation orderings of He et al. 2016 Fig. 4(b-d) are op lists in
:mod:`reslab.models.ordered`. The skip path is built by the caller
(:func:`reslab.models.layers.make_shortcut`) and passed in, as torchvision passes ``downsample``.

Layers are named as in torchvision (``conv1, bn1, conv2, bn2[, conv3, bn3], downsample``) so
post-activation models load torchvision state dicts; ``bn{i}`` is the norm that belongs to weight
layer ``i`` (after it post-activation, before it pre-activation). No op is in place: an in-place
addition or ReLU breaks the full backward hooks the analysis tools rely on (pytorch#61519).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, fx, nn

from reslab.models.layers import NormLayer, ProjectionShortcut, check_choice, conv2d

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResidualBlock",
    "bottleneck_strides",
]


def bottleneck_strides(stride: int, stride_in: str) -> tuple[int, int]:
    """Strides of a bottleneck's first 1x1 and its 3x3 conv.

    The paper strides the first 1x1 (``stride_in="1x1"``); torchvision's "ResNet V1.5" moves the
    stride to the 3x3 (``"3x3"``), which costs more multiply-adds and gains accuracy.
    """
    check_choice("stride_in", stride_in, ("1x1", "3x3"))
    return (stride, 1) if stride_in == "1x1" else (1, stride)


def _with_weight(*layers: nn.Module) -> nn.Module:
    """The first of ``layers`` that has a weight (a norm layer may be an identity: norm="none")."""
    for layer in layers:
        if isinstance(getattr(layer, "weight", None), Tensor):
            return layer
    raise ValueError(f"none of {[type(m).__name__ for m in layers]} has a weight")


class ResidualBlock(nn.Module):
    """What every residual unit offers the network and the analysis tools.

    ``downsample`` is the skip path ``h`` (None: the unit of a plain net, no addition). It keeps
    torchvision's name so its state dicts load; the forwards call its output ``shortcut``.
    :meth:`join` adds ``F(x)`` and ``h(x)``, or hands them to ``combine``, a module that scales
    or gates them as a variant of He et al. 2016 Table 1 does (:mod:`reslab.models.shortcuts`).
    Subclasses build the branch first and call :meth:`_set_shortcut` last: module order fixes the
    order in which :func:`~reslab.models.layers.kaiming_init_` draws the weights.

    For analysis: :meth:`forward_without_branch` (the unit with ``F`` deleted, for lesion
    studies), :meth:`branch_norms` (the norm layers on the branch's weight-layer outputs, whose
    outputs are He et al. 2015 Fig. 7's "responses"), :meth:`last_branch_layer`.
    """

    expansion: ClassVar[int] = 1  # out_channels = width * expansion

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.shape_changes = stride != 1 or in_channels != out_channels
        # Whether h reads the pre-activated input (pre-activation units only; see PreAct*).
        self.shortcut_from_preact = False

    def _set_shortcut(self, shortcut: nn.Module | None, combine: nn.Module | None = None) -> None:
        if shortcut is None and combine is not None:
            raise ValueError(f"a plain unit has no shortcut to combine with {combine}")
        self.residual = shortcut is not None
        self.downsample = shortcut
        # None: the plain sum, and the unit's modules stay exactly those of the original design
        self.combine = combine

    def join(self, out: Tensor, shortcut: Tensor, x: Tensor) -> Tensor:
        """``y = F(x) + h(x)`` (He et al. 2016, eq. 1), never in place; with a ``combine``
        module, its scaled or gated form. ``x`` is what ``h`` read (a gate reads it too)."""
        if self.combine is None:
            return out + shortcut
        return self.combine(out, shortcut, x)

    # -- analysis interface -------------------------------------------------------------------
    def forward_without_branch(self, x: Tensor) -> Tensor:
        """``f(h(x))``: the unit's output with its residual branch ``F`` deleted (Veit et al.
        2016, §4). A plain unit has no ``h``: deleting it leaves ``x``, which needs the shape to
        stay (:meth:`can_delete_branch`)."""
        if self.downsample is None:
            if self.shape_changes:
                raise ValueError(
                    f"a plain unit from {self.in_channels} to {self.out_channels} channels with "
                    f"stride {self.stride} cannot be deleted: nothing would keep the shape"
                )
            return x
        x_in = self._shortcut_input(x)
        shortcut = self.downsample(x_in)
        if self.combine is not None:  # F deleted is F = 0: a scaled or gated h stays so
            shortcut = self.combine(torch.zeros_like(shortcut), shortcut, x_in)
        return self._after_add(shortcut)

    def can_delete_branch(self) -> bool:
        """A residual unit always (its shortcut remains); a plain unit if it keeps the shape."""
        return self.downsample is not None or not self.shape_changes

    def branch_norms(self) -> list[tuple[str, nn.Module]]:
        """(name, layer) of each norm layer applied to a weight layer's output inside ``F``, in
        forward order: where He et al. 2015 (§4.2, Fig. 7) measure a layer's response ("after BN
        and before other nonlinearity")."""
        raise NotImplementedError

    def last_branch_layer(self) -> nn.Module:
        """The last layer of ``F`` with a weight before the addition (a BN, or a conv)."""
        raise NotImplementedError

    def _shortcut_input(self, x: Tensor) -> Tensor:
        return x

    def _after_add(self, y: Tensor) -> Tensor:
        return y

    def zero_init_last(self) -> None:
        """Zero the branch's last BN scale (or last conv, where no BN follows it) so ``F = 0``
        and the unit starts as the identity (Goyal et al. 2017, §5.1; He et al. 2016 keep the
        identity path clean). For "BN after addition" the unit then computes ReLU(BN(x))."""
        weight = self.last_branch_layer().weight
        assert isinstance(weight, Tensor)
        nn.init.zeros_(weight)


# ------------------------------------------------------------------------------------------------
# Post-activation ("original"): He et al. 2015, Fig. 5; He et al. 2016, Fig. 4(a)
# ------------------------------------------------------------------------------------------------


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (He et al. 2015, Fig. 5 left); the first one carries the stride.

    ``x_{l+1} = ReLU(F(x) + h(x))`` with ``F = BN(conv(ReLU(BN(conv(x)))))`` (eq. 1).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        shortcut: nn.Module | None,
        combine: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__(in_channels, width * self.expansion, stride)
        self.conv1 = conv2d(in_channels, width, 3, stride)
        self.bn1 = norm_layer(width)
        self.conv2 = conv2d(width, width, 3)
        self.bn2 = norm_layer(width)
        self.act = nn.ReLU()
        self._set_shortcut(shortcut, combine)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))  # F(x)
        if self.downsample is None:  # the plain twin: no shortcut
            return self.act(out)
        shortcut = self.downsample(x)  # h(x)
        return self.act(self.join(out, shortcut, x))  # x_{l+1} = ReLU(F(x) + h(x))

    def branch_norms(self) -> list[tuple[str, nn.Module]]:
        return [("bn1", self.bn1), ("bn2", self.bn2)]

    def last_branch_layer(self) -> nn.Module:
        return _with_weight(self.bn2, self.conv2)

    def _after_add(self, y: Tensor) -> Tensor:
        return self.act(y)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4 (He et al. 2015, Fig. 5 right), post-activation.

    ``stride_in`` says which conv carries the stride (:func:`bottleneck_strides`).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        shortcut: nn.Module | None,
        combine: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        stride_in: str = "1x1",
    ) -> None:
        super().__init__(in_channels, width * self.expansion, stride)
        s1, s3 = bottleneck_strides(stride, stride_in)
        self.conv1 = conv2d(in_channels, width, 1, s1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv2d(width, width, 3, s3)
        self.bn2 = norm_layer(width)
        self.conv3 = conv2d(width, self.out_channels, 1)
        self.bn3 = norm_layer(self.out_channels)
        self.act = nn.ReLU()
        self._set_shortcut(shortcut, combine)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))  # F(x)
        if self.downsample is None:
            return self.act(out)
        shortcut = self.downsample(x)  # h(x)
        return self.act(self.join(out, shortcut, x))

    def branch_norms(self) -> list[tuple[str, nn.Module]]:
        return [("bn1", self.bn1), ("bn2", self.bn2), ("bn3", self.bn3)]

    def last_branch_layer(self) -> nn.Module:
        return _with_weight(self.bn3, self.conv3)

    def _after_add(self, y: Tensor) -> Tensor:
        return self.act(y)


# ------------------------------------------------------------------------------------------------
# Full pre-activation: He et al. 2016, Fig. 4(e)
# ------------------------------------------------------------------------------------------------


def _reads_preact(shortcut: nn.Module | None, first_unit: bool) -> bool:
    """Whether a pre-activation unit's shortcut reads BN-ReLU(x) rather than x.

    A projection shares the unit's pre-activation (the authors' Torch code, timm's ResNetV2), and
    so does the network's first unit: "for the first Residual Unit (that follows a stand-alone
    convolutional layer, conv1), we adopt the first activation right after conv1 and before
    splitting into two paths" (He et al. 2016, appendix).
    """
    return first_unit or isinstance(shortcut, ProjectionShortcut)


class PreActBasicBlock(ResidualBlock):
    """Two 3x3 convolutions, each after BN-ReLU (He et al. 2016, Fig. 4(e)).

    ``x_{l+1} = x_l + F(x_l)`` with ``F = conv(ReLU(BN(conv(ReLU(BN(x))))))`` (eq. 1 with ``f``
    the identity): the shortcut path carries ``x_l`` untouched from unit to unit.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        shortcut: nn.Module | None,
        combine: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        first_unit: bool = False,
    ) -> None:
        super().__init__(in_channels, width * self.expansion, stride)
        self.bn1 = norm_layer(in_channels)
        self.conv1 = conv2d(in_channels, width, 3, stride)
        self.bn2 = norm_layer(width)
        self.conv2 = conv2d(width, width, 3)
        self.act = nn.ReLU()
        self._set_shortcut(shortcut, combine)
        self.shortcut_from_preact = _reads_preact(shortcut, first_unit)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act(self.bn1(x))  # the pre-activation
        out = self.conv1(pre)
        out = self.conv2(self.act(self.bn2(out)))  # F(x)
        if self.downsample is None:
            return out
        x_in = pre if self.shortcut_from_preact else x
        shortcut = self.downsample(x_in)  # h(x)
        return self.join(out, shortcut, x_in)  # x_{l+1} = h(x) + F(x), nothing after it

    def branch_norms(self) -> list[tuple[str, nn.Module]]:
        return [("bn2", self.bn2)]  # bn1 normalises the unit's input, not a layer of F

    def last_branch_layer(self) -> nn.Module:
        return self.conv2

    def _shortcut_input(self, x: Tensor) -> Tensor:
        return self.act(self.bn1(x)) if self.shortcut_from_preact else x


class PreActBottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4, each after BN-ReLU (He et al. 2016, Fig. 4(e) and the
    CIFAR ResNet-164/1001 of Table 3)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        shortcut: nn.Module | None,
        combine: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        stride_in: str = "1x1",
        first_unit: bool = False,
    ) -> None:
        super().__init__(in_channels, width * self.expansion, stride)
        s1, s3 = bottleneck_strides(stride, stride_in)
        self.bn1 = norm_layer(in_channels)
        self.conv1 = conv2d(in_channels, width, 1, s1)
        self.bn2 = norm_layer(width)
        self.conv2 = conv2d(width, width, 3, s3)
        self.bn3 = norm_layer(width)
        self.conv3 = conv2d(width, self.out_channels, 1)
        self.act = nn.ReLU()
        self._set_shortcut(shortcut, combine)
        self.shortcut_from_preact = _reads_preact(shortcut, first_unit)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.act(self.bn2(out)))
        out = self.conv3(self.act(self.bn3(out)))  # F(x)
        if self.downsample is None:
            return out
        x_in = pre if self.shortcut_from_preact else x
        shortcut = self.downsample(x_in)  # h(x)
        return self.join(out, shortcut, x_in)

    def branch_norms(self) -> list[tuple[str, nn.Module]]:
        return [("bn2", self.bn2), ("bn3", self.bn3)]

    def last_branch_layer(self) -> nn.Module:
        return self.conv3

    def _shortcut_input(self, x: Tensor) -> Tensor:
        return self.act(self.bn1(x)) if self.shortcut_from_preact else x


class UnitLeafTracer(fx.Tracer):
    """Traces a network down to its residual units and no further, so that TorchScript compiles
    each unit's own ``forward`` (see ``ResNet.__prepare_scriptable__``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ResidualBlock) or super().is_leaf_module(m, module_qualified_name)

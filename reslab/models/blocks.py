"""Residual units: basic (two 3x3) and bottleneck (1x1, 3x3, 1x1), in any ordering of
He et al. 2016 Fig. 4, with or without a shortcut.

A unit computes ``x_{l+1} = f(h(x_l) + F(x_l))`` (He et al. 2016, eqs. 1-2): ``h`` is the
shortcut, ``F`` the residual branch and ``f`` the ops after the addition. The ordering decides
where BN and ReLU go; the block type decides the weight layers.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from reslab.models.layers import (
    ORDERINGS,
    SHORTCUTS,
    Ordering,
    PadShortcut,
    ProjectionShortcut,
    check_choice,
    conv2d,
)

__all__ = ["BLOCKS", "BasicBlock", "Bottleneck", "ResidualBlock"]

ConvSpec = tuple[int, int, int, int]  # (in_channels, out_channels, kernel_size, stride)


class ResidualBlock(nn.Module):
    """One residual unit; subclasses say which convolutions make up ``F``.

    Layers are named as in torchvision (``conv1, bn1, conv2, bn2[, conv3, bn3], downsample``) so
    post-activation models load torchvision state dicts; ``bn{i}`` is the BN that belongs to
    weight layer ``i`` wherever the ordering puts it. No op is in place: in-place addition or ReLU
    breaks the full backward hooks the analysis tools rely on (pytorch#61519).
    """

    expansion: ClassVar[int]

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        ordering: str = "original",
        shortcut: str = "B",
        stride_in: str = "1x1",
        first_unit: bool = False,
        shortcut_pad: str = "after",
    ) -> None:
        super().__init__()
        check_choice("ordering", ordering, ORDERINGS)
        check_choice("shortcut", shortcut, SHORTCUTS)
        self.ordering: Ordering = ORDERINGS[ordering]
        self.out_channels = width * self.expansion
        specs = self.conv_specs(in_channels, width, stride, stride_in)

        # Build conv{i}/bn{i} and record the op sequence of the residual branch.
        self.ops: list[str] = []
        channels = in_channels
        for i, (c_in, c_out, k, s) in enumerate(specs, start=1):
            seq = self.ordering.last if i == len(specs) else self.ordering.inner
            for op in seq:
                if op == "conv":
                    self.add_module(f"conv{i}", conv2d(c_in, c_out, k, s))
                    channels = c_out
                    self.ops.append(f"conv{i}")
                elif op == "bn":
                    self.add_module(f"bn{i}", nn.BatchNorm2d(channels))
                    self.ops.append(f"bn{i}")
                else:
                    self.ops.append("act")
        self.after_add: list[str] = []
        for op in self.ordering.after_add:
            if op == "bn":
                name = f"bn{len(specs)}"
                self.add_module(name, nn.BatchNorm2d(self.out_channels))
                self.after_add.append(name)
            else:
                self.after_add.append("act")
        self.act = nn.ReLU()

        # The pre-activation prefix (BN/ReLU before conv1) is shared with a projection shortcut
        # and, for the network's first unit, with the identity too: "for the first Residual Unit
        # (that follows a stand-alone convolutional layer, conv1), we adopt the first activation
        # right after conv1 and before splitting into two paths" (He et al. 2016, appendix).
        n_pre = len(self.ordering.preact)
        self.preact_ops, self.ops = self.ops[:n_pre], self.ops[n_pre:]

        # The skip branch. Named ``downsample`` (not ``shortcut``) for torchvision's keys.
        self.residual = shortcut != "none"
        self.shape_changes = shape_changes = stride != 1 or in_channels != self.out_channels
        self.downsample: nn.Module | None
        if not self.residual:
            self.downsample = None
        elif shortcut == "C" or (shortcut == "B" and shape_changes):
            norm = not self.preact_ops
            self.downsample = ProjectionShortcut(in_channels, self.out_channels, stride, norm)
        elif shape_changes:
            self.downsample = PadShortcut(
                in_channels, self.out_channels, stride, placement=shortcut_pad
            )
        else:
            self.downsample = nn.Identity()
        self.shortcut_from_preact = bool(self.preact_ops) and (
            first_unit or isinstance(self.downsample, ProjectionShortcut)
        )

    @staticmethod
    def conv_specs(in_channels: int, width: int, stride: int, stride_in: str) -> list[ConvSpec]:
        raise NotImplementedError

    def _run(self, names: list[str], x: Tensor) -> Tensor:
        for name in names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        pre = self._run(self.preact_ops, x)
        out = self._run(self.ops, pre)  # F(x)
        if self.downsample is not None:
            shortcut = self.downsample(pre if self.shortcut_from_preact else x)  # h(x)
            out = out + shortcut  # y = h(x) + F(x), never in place
        return self._run(self.after_add, out)  # x_{l+1} = f(y)

    def last_branch_layer(self) -> nn.Module:
        """The last parameterised layer of ``F`` before the addition (a BN, or a conv)."""
        return getattr(self, self.ops[-1] if self.ops[-1] != "act" else self.ops[-2])

    def zero_init_last(self) -> None:
        """Zero the branch's last BN scale (or last conv, where no BN follows it) so ``F = 0``
        and the unit starts as the identity (Goyal et al. 2017, §5.1; He et al. 2016 keep the
        identity path clean). For "BN after addition" the unit then computes ReLU(BN(x))."""
        nn.init.zeros_(self.last_branch_layer().weight)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (He et al. 2015, Fig. 5 left); the first one carries the stride."""

    expansion = 1

    @staticmethod
    def conv_specs(in_channels: int, width: int, stride: int, stride_in: str) -> list[ConvSpec]:
        return [(in_channels, width, 3, stride), (width, width, 3, 1)]


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4 (He et al. 2015, Fig. 5 right).

    The paper strides the first 1x1 (``stride_in="1x1"``); torchvision's "ResNet V1.5" moves the
    stride to the 3x3 (``"3x3"``), which costs more multiply-adds and gains accuracy.
    """

    expansion = 4

    @staticmethod
    def conv_specs(in_channels: int, width: int, stride: int, stride_in: str) -> list[ConvSpec]:
        check_choice("stride_in", stride_in, ("1x1", "3x3"))
        s1, s3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        return [
            (in_channels, width, 1, s1),
            (width, width, 3, s3),
            (width, width * Bottleneck.expansion, 1, 1),
        ]


BLOCKS: dict[str, type[ResidualBlock]] = {"basic": BasicBlock, "bottleneck": Bottleneck}

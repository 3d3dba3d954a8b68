"""Residual units in any ordering of He et al. 2016 Fig. 4, assembled from a list of ops.

The registered models use the explicit blocks of :mod:`reslab.models.blocks` ("original" and
"full_preact"). The ablations of Fig. 4(b-d) - BN after addition, ReLU before addition,
ReLU-only pre-activation - move BN and ReLU to places no explicit block has, so one op-list unit
builds them from :data:`~reslab.models.layers.ORDERINGS`. Configured as "original" or
"full_preact" it computes exactly what the explicit blocks compute (tests/test_blocks.py).
"""

from __future__ import annotations

from torch import Tensor, nn

from reslab.models.blocks import ResidualBlock, _with_weight, bottleneck_strides
from reslab.models.layers import (
    ORDERINGS,
    NormLayer,
    Ordering,
    ProjectionShortcut,
    check_choice,
    conv2d,
    traced_for_script,
)

__all__ = ["OrderedBasicBlock", "OrderedBlock", "OrderedBottleneck"]

ConvSpec = tuple[int, int, int, int]  # (in_channels, out_channels, kernel_size, stride)


class OrderedBlock(ResidualBlock):
    """One residual unit whose BN/ReLU placement is the ordering's op lists; subclasses say which
    convolutions make up ``F``.

    ``preact_ops`` run on the unit's input before the first convolution (shared with a
    projection shortcut and, in the network's first unit, with the identity too: He et al. 2016,
    appendix), ``ops`` are the rest of ``F``, ``after_add`` follow ``h(x) + F(x)``.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        ordering: str,
        shortcut: nn.Module | None,
        combine: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        stride_in: str = "1x1",
        first_unit: bool = False,
    ) -> None:
        super().__init__(in_channels, width * self.expansion, stride)
        check_choice("ordering", ordering, ORDERINGS)
        self.ordering: Ordering = ORDERINGS[ordering]
        specs = self.conv_specs(in_channels, width, stride, stride_in)

        # Build conv{i}/bn{i} and record the op sequence of the residual branch.
        ops: list[str] = []
        channels = in_channels
        for i, (c_in, c_out, k, s) in enumerate(specs, start=1):
            seq = self.ordering.last if i == len(specs) else self.ordering.inner
            for op in seq:
                if op == "conv":
                    self.add_module(f"conv{i}", conv2d(c_in, c_out, k, s))
                    channels = c_out
                    ops.append(f"conv{i}")
                elif op == "bn":
                    self.add_module(f"bn{i}", norm_layer(channels))
                    ops.append(f"bn{i}")
                else:
                    ops.append("act")
        self.after_add: list[str] = []
        for op in self.ordering.after_add:
            if op == "bn":
                name = f"bn{len(specs)}"
                self.add_module(name, norm_layer(self.out_channels))
                self.after_add.append(name)
            else:
                self.after_add.append("act")
        self.act = nn.ReLU()
        n_pre = len(self.ordering.preact)
        self.preact_ops, self.ops = ops[:n_pre], ops[n_pre:]
        self._set_shortcut(shortcut, combine)
        self.shortcut_from_preact = bool(self.preact_ops) and (
            first_unit or isinstance(shortcut, ProjectionShortcut)
        )

    def conv_specs(
        self, in_channels: int, width: int, stride: int, stride_in: str
    ) -> list[ConvSpec]:
        raise NotImplementedError

    def _run(self, names: list[str], x: Tensor) -> Tensor:
        for name in names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        pre = self._run(self.preact_ops, x)
        out = self._run(self.ops, pre)  # F(x)
        if self.downsample is not None:
            x_in = pre if self.shortcut_from_preact else x
            shortcut = self.downsample(x_in)  # h(x)
            out = self.join(out, shortcut, x_in)  # y = h(x) + F(x), never in place
        return self._run(self.after_add, out)  # x_{l+1} = f(y)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` cannot look modules up by a computed name: script the traced
        graph instead, which calls each layer by its own name (same modules, same state dict)."""
        return traced_for_script(self)

    def branch_norms(self) -> list[tuple[str, nn.Module]]:
        return [(op, getattr(self, op)) for op in self.ops if op.startswith("bn")]

    def last_branch_layer(self) -> nn.Module:
        return _with_weight(*(getattr(self, op) for op in reversed(self.ops) if op != "act"))

    def _shortcut_input(self, x: Tensor) -> Tensor:
        return self._run(self.preact_ops, x) if self.shortcut_from_preact else x

    def _after_add(self, y: Tensor) -> Tensor:
        return self._run(self.after_add, y)


class OrderedBasicBlock(OrderedBlock):
    """Two 3x3 convolutions (He et al. 2015, Fig. 5 left) in any ordering of Fig. 4."""

    expansion = 1

    def conv_specs(
        self, in_channels: int, width: int, stride: int, stride_in: str
    ) -> list[ConvSpec]:
        return [(in_channels, width, 3, stride), (width, width, 3, 1)]


class OrderedBottleneck(OrderedBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4 (He et al. 2015, Fig. 5 right) in any ordering."""

    expansion = 4

    def conv_specs(
        self, in_channels: int, width: int, stride: int, stride_in: str
    ) -> list[ConvSpec]:
        s1, s3 = bottleneck_strides(stride, stride_in)
        return [
            (in_channels, width, 1, s1),
            (width, width, 3, s3),
            (width, width * self.expansion, 1, 1),
        ]

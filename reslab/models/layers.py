"""Shortcuts, orderings and stems: the small pieces a residual network is assembled from.

References
- He, Zhang, Ren, Sun (2015), *Deep Residual Learning for Image Recognition*, arXiv:1512.03385.
- He, Zhang, Ren, Sun (2016), *Identity Mappings in Deep Residual Networks*, arXiv:1603.05027.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ORDERINGS",
    "SHORTCUTS",
    "SHORTCUT_PADS",
    "STEMS",
    "Ordering",
    "PadShortcut",
    "ProjectionShortcut",
    "StemSpec",
    "check_choice",
]


def check_choice(kind: str, value: str, choices: dict | tuple | list) -> None:
    """Raise a ``ValueError`` that lists the valid choices when ``value`` is not one of them."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {valid}")


# --------------------------------------------------------------------------------------------
# Shortcuts (He et al. 2015, §3.3 and §4.1 "Identity vs. Projection Shortcuts")
# --------------------------------------------------------------------------------------------

#: Shortcut options of He et al. 2015 §4.1, plus ``"none"`` for the plain (no-shortcut) twin.
SHORTCUTS: dict[str, str] = {
    "A": "identity; zero-padding (and subsampling) where the shape changes, parameter-free",
    "B": "identity; 1x1 projection where the shape changes",
    "C": "1x1 projection on every block",
    "none": "no shortcut: the plain network of He et al. 2015, Table 2",
}


#: Where option A puts the zero channels it adds. Both are in use, and weights trained with one
#: compute another function under the other (the shortcut's channel c lands on another branch
#: channel), so the placement is part of the architecture (``ResNetConfig.shortcut_pad``).
SHORTCUT_PADS: dict[str, str] = {
    "after": "zero channels appended after the identity's (fb.resnet.torch, reslab's default)",
    "split": "half of the zero channels before the identity's, half after (the common PyTorch "
    "CIFAR ResNets' LambdaLayer)",
}


class PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and add zero channels; no parameters.

    He et al. 2015 §3.3: "the shortcut still performs identity mapping, with extra zero entries
    padded for increasing dimensions ... performed with a stride of 2". The paper does not say
    where the zeros go, and two conventions exist (:data:`SHORTCUT_PADS`):

    - ``"after"``: the identity keeps channels ``0..in-1`` and zeros follow, as in Facebook's
      fb.resnet.torch (``nn.Padding`` after the input's channels, then concatenation);
    - ``"split"``: ``(out - in) // 2`` zero channels before and the rest after, as the widely
      used PyTorch CIFAR ResNet-20/32/44/56/110/1202 checkpoints do with
      ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))`` (out = 2 in there).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, placement: str = "after"
    ) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option A can only widen: in_channels={in_channels} > out_channels={out_channels}"
            )
        check_choice("shortcut_pad", placement, SHORTCUT_PADS)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.placement = placement
        extra = out_channels - in_channels
        self.pad_before = extra // 2 if placement == "split" else 0
        self.pad_after = extra - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"placement={self.placement!r}"
        )


class ProjectionShortcut(nn.Sequential):
    """Options B/C: ``W_s x`` as a strided 1x1 convolution, followed by BN in post-activation nets.

    Children are named ``0`` (conv) and ``1`` (BN) so torchvision's ``downsample.0/1`` keys load.
    In pre-activation nets the input is already normalised, so the projection is a bare conv
    (as in the authors' Torch code and timm's ResNetV2).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: bool) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        ]
        if norm:
            layers.append(nn.BatchNorm2d(out_channels))
        super().__init__(*layers)


# --------------------------------------------------------------------------------------------
# Orderings (He et al. 2016, Fig. 4 and Table 2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ordering:
    """Where BN and ReLU sit around the weight layers and the addition of one residual unit.

    ``inner`` is the op sequence of every weight layer but the last, ``last`` that of the last one
    (``"conv"``, ``"bn"``, ``"act"``), ``after_add`` what follows ``shortcut + F(x)``. ``stem``
    lists the ops after the stem convolution and ``final`` those after the last unit: the
    pre-activation designs move BN/ReLU out of the stem into the first unit and add one
    activation after the last addition (He et al. 2016, §4.1 and appendix).
    """

    inner: tuple[str, ...]
    last: tuple[str, ...]
    after_add: tuple[str, ...]
    stem: tuple[str, ...]
    final: tuple[str, ...]
    description: str

    @property
    def preact(self) -> tuple[str, ...]:
        """Ops applied to the unit's input before its first convolution."""
        return self.inner[: self.inner.index("conv")]

    @property
    def identity_at_init(self) -> bool:
        """Whether zeroing the branch's last layer makes the unit the identity (for x >= 0).

        Fails only for "BN after addition", where ``BN(x)`` follows the addition.
        """
        return "bn" not in self.after_add


ORDERINGS: dict[str, Ordering] = {
    "original": Ordering(
        inner=("conv", "bn", "act"),
        last=("conv", "bn"),
        after_add=("act",),
        stem=("bn", "act"),
        final=(),
        description="Fig. 4(a): post-activation (He et al. 2015)",
    ),
    "bn_after_add": Ordering(
        inner=("conv", "bn", "act"),
        last=("conv",),
        after_add=("bn", "act"),
        stem=("bn", "act"),
        final=(),
        description="Fig. 4(b): BN after addition",
    ),
    "relu_before_add": Ordering(
        inner=("conv", "bn", "act"),
        last=("conv", "bn", "act"),
        after_add=(),
        stem=("bn", "act"),
        final=(),
        description="Fig. 4(c): ReLU before addition",
    ),
    "relu_preact": Ordering(
        inner=("act", "conv", "bn"),
        last=("act", "conv", "bn"),
        after_add=(),
        stem=("bn",),
        final=("act",),
        description="Fig. 4(d): ReLU-only pre-activation",
    ),
    "full_preact": Ordering(
        inner=("bn", "act", "conv"),
        last=("bn", "act", "conv"),
        after_add=(),
        stem=(),
        final=("bn", "act"),
        description="Fig. 4(e): full pre-activation (He et al. 2016)",
    ),
}


# --------------------------------------------------------------------------------------------
# Stems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StemSpec:
    """The layers before the first residual stage."""

    kernel_size: int
    stride: int
    max_pool: bool
    description: str


STEMS: dict[str, StemSpec] = {
    # He et al. 2015, Table 1: "7x7, 64, stride 2" then "3x3 max pool, stride 2".
    "imagenet": StemSpec(7, 2, True, "7x7/2 conv + 3x3/2 max-pool (ImageNet, Table 1)"),
    # He et al. 2015, §4.2: "The first layer is 3x3 convolutions" on 32x32 inputs, no pooling.
    "cifar": StemSpec(3, 1, False, "3x3/1 conv, no pooling (CIFAR, §4.2)"),
}


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free 'same' convolution (the bias is redundant in front of BN)."""
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )


def kaiming_init_(module: nn.Module) -> None:
    """He et al. 2015 (§3.4) initialise convolutions as in He et al. (2015b), 'fan_out' mode as
    in torchvision; BN starts at the identity transform."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

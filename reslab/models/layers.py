"""Shortcuts, orderings and stems: the small pieces a residual network is assembled from.

References
- He, Zhang, Ren, Sun (2015), *Deep Residual Learning for Image Recognition*, arXiv:1512.03385.
- He, Zhang, Ren, Sun (2016), *Identity Mappings in Deep Residual Networks*, arXiv:1603.05027.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = [
    "NORMS",
    "ORDERINGS",
    "SHORTCUTS",
    "SHORTCUT_PADS",
    "STEMS",
    "NormLayer",
    "Ordering",
    "PadShortcut",
    "ProjectionShortcut",
    "ShortcutOption",
    "StemSpec",
    "check_choice",
    "check_input",
    "make_shortcut",
    "traced_for_script",
]


def check_choice(kind: str, value: str, choices: Collection[str]) -> None:
    """Raise a ``ValueError`` that lists the valid choices when ``value`` is not one of them."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {valid}")


# --------------------------------------------------------------------------------------------
# Normalisation layers
# --------------------------------------------------------------------------------------------

#: Builds the normalisation layer for ``num_features`` channels (torchvision's ``norm_layer``).
NormLayer = Callable[[int], nn.Module]


def no_norm(num_features: int) -> nn.Module:
    """No normalisation: an identity where the norm layer would be, so the other module names
    (and the rest of the state dict) stay those of the normalised net. Seed 001 asks what deep
    plain nets do without BatchNorm; the gradient-flow sweeps build such nets with this."""
    return nn.Identity()


#: ``ResNetConfig.norm``: the normalisation after each convolution (He et al. 2015 §3.4: BN).
NORMS: dict[str, NormLayer] = {"batch": nn.BatchNorm2d, "none": no_norm}


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

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer | None = None
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        super().__init__(*layers)


def _option_a(
    in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer | None, pad: str
) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return PadShortcut(in_channels, out_channels, stride, placement=pad)


def _option_b(
    in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer | None, pad: str
) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ProjectionShortcut(in_channels, out_channels, stride, norm_layer)


def _option_c(
    in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer | None, pad: str
) -> nn.Module:
    return ProjectionShortcut(in_channels, out_channels, stride, norm_layer)


def _no_shortcut(
    in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer | None, pad: str
) -> None:
    return None


@dataclass(frozen=True)
class ShortcutOption:
    """One way to build a unit's skip path ``h``: ``build(in_channels, out_channels, stride,
    norm_layer, pad)`` returns the module, or None for no skip path (the plain twin); ``pad`` is
    option A's zero-channel placement (a key of :data:`SHORTCUT_PADS`), unused by the others."""

    description: str
    build: Callable[[int, int, int, NormLayer | None, str], nn.Module | None]


#: Shortcut options of He et al. 2015 §4.1, plus ``"none"`` for the plain (no-shortcut) twin.
SHORTCUTS: dict[str, ShortcutOption] = {
    "A": ShortcutOption(
        "identity; zero-padding (and subsampling) where the shape changes, parameter-free",
        _option_a,
    ),
    "B": ShortcutOption("identity; 1x1 projection where the shape changes", _option_b),
    "C": ShortcutOption("1x1 projection on every block", _option_c),
    "none": ShortcutOption(
        "no shortcut: the plain network of He et al. 2015, Table 2", _no_shortcut
    ),
}


def make_shortcut(
    option: str,
    in_channels: int,
    out_channels: int,
    stride: int,
    *,
    norm_layer: NormLayer | None,
    pad: str = "after",
) -> nn.Module | None:
    """The skip path ``h`` of one unit under shortcut ``option`` (a key of :data:`SHORTCUTS`);
    None for ``"none"``. ``norm_layer`` follows a projection (None: a bare 1x1 conv, as in
    pre-activation nets, whose projection reads an already normalised input)."""
    check_choice("shortcut", option, SHORTCUTS)
    check_choice("shortcut_pad", pad, SHORTCUT_PADS)
    return SHORTCUTS[option].build(in_channels, out_channels, stride, norm_layer, pad)


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


#: Per-channel RGB statistics of the data sets the stems were designed for, in [0, 1] pixels:
#: ImageNet's as torchvision and timm use them; CIFAR-10's training set as commonly quoted.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class StemSpec:
    """The layers before the first residual stage, and the input they were designed for."""

    kernel_size: int
    stride: int
    max_pool: bool
    description: str
    image_size: int  # side of the network input in pixels
    crop_pct: float  # image_size / side of the resized image before the centre crop
    mean: tuple[float, ...]  # RGB normalisation of the data set the stem was designed for
    std: tuple[float, ...]

    @property
    def reduction(self) -> int:
        """How much the stem (conv stride and max-pool) shrinks the input's side."""
        return self.stride * (2 if self.max_pool else 1)


STEMS: dict[str, StemSpec] = {
    # He et al. 2015, Table 1: "7x7, 64, stride 2" then "3x3 max pool, stride 2"; 224x224 crops
    # (§3.4), evaluated as torchvision does: resize to 256, centre crop 224.
    "imagenet": StemSpec(
        7,
        2,
        True,
        "7x7/2 conv + 3x3/2 max-pool (ImageNet, Table 1)",
        224,
        0.875,
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
    # He et al. 2015, §4.2: "The first layer is 3x3 convolutions" on 32x32 inputs, no pooling.
    "cifar": StemSpec(
        3, 1, False, "3x3/1 conv, no pooling (CIFAR, §4.2)", 32, 1.0, CIFAR10_MEAN, CIFAR10_STD
    ),
}


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free 'same' convolution (the bias is redundant in front of BN)."""
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )


# fx.wrap: traced graphs keep the check as one call instead of tracing into its branches;
# has_side_effect: and graph clean-ups (create_feature_extractor's) keep that call, which returns
# nothing anyone reads
@fx.node.has_side_effect
@fx.wrap
def check_input(x: Tensor, in_channels: int) -> None:
    """Raise a ``ValueError`` naming both shapes unless ``x`` is ``(N, in_channels, H, W)``.

    Works eagerly, in ``torch.fx`` graphs (each module that calls it registers it with
    ``fx.wrap``), under ``torch.export`` (the channel count is static, so the check becomes the
    exported program's shape guard) and in TorchScript.
    """
    if x.dim() != 4 or x.shape[1] != in_channels:
        if torch.jit.is_scripting():
            raise ValueError(
                f"expected input of shape (N, {in_channels}, H, W); "
                f"this model was built with in_channels={in_channels}"
            )
        raise ValueError(
            f"expected input of shape (N, {in_channels}, H, W), got {tuple(x.shape)}; "
            f"this model was built with in_channels={in_channels}"
        )


def traced_for_script(module: nn.Module, tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """``module``'s ``torch.fx`` graph as a module TorchScript can compile: same submodules under
    the same names. Postponed annotations (``from __future__ import annotations``) reach fx as
    strings TorchScript cannot read back; unannotated arguments are Tensors to it anyway."""
    graph = (tracer or fx.Tracer()).trace(module)
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    return fx.GraphModule(module, graph, type(module).__name__)


def kaiming_init_(module: nn.Module) -> None:
    """He et al. 2015 (§3.4) initialise convolutions as in He et al. (2015b), 'fan_out' mode as
    in torchvision; BN starts at the identity transform."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

"""How a unit combines its shortcut and its branch: the variants of He et al. 2016 §3.1.

A unit computes ``y = h(x) + F(x)`` (He et al. 2016, eq. 1). Section 3.1 ("Experiments on Skip
Connections", Fig. 2, Table 1) asks what happens when the shortcut is *not* a clean identity and
multiplies it (and sometimes ``F``) by a constant, a gate or a dropout mask. Such a unit holds a
``combine`` module that it calls as ``combine(out, shortcut, x)`` (``out`` = F(x), ``shortcut`` =
h(x), ``x`` = what h reads) in place of the sum; the original unit holds none
(:meth:`~reslab.models.blocks.ResidualBlock.join`), so its modules and state dict are unchanged.

Table 1 of He et al. 2016 (ResNet-110 on CIFAR-10, every unit; "fail" = test error > 20%):

======================  ===========  ====  ======================  ========================
case (Fig. 2)           on shortcut  on F  error %                 here
======================  ===========  ====  ======================  ========================
original (a)            1            1     6.61                    ``"add"``
constant scaling (b)    0            1     fail (a plain net)      ``shortcut="none"``
constant scaling (b)    0.5          1     fail                    ``"scale_shortcut"``
constant scaling (b)    0.5          0.5   12.35                   ``"scale"``
exclusive gating (c)    1 - g(x)     g(x)  fail (b_g = 0 to -5)    ``"exclusive_gate_b0"``
exclusive gating (c)    1 - g(x)     g(x)  8.70 (b_g = -6)         ``"exclusive_gate"``
shortcut-only gate (d)  1 - g(x)     1     12.86 (b_g = 0)         ``"shortcut_gate_b0"``
shortcut-only gate (d)  1 - g(x)     1     6.91 (b_g = -6)         ``"shortcut_gate"``
1x1 conv shortcut (e)   1x1 conv     1     12.22                   ``shortcut="C"``
dropout shortcut (f)    dropout 0.5  1     fail                    ``"dropout"``
======================  ===========  ====  ======================  ========================

The 1x1 convolution shortcut is option C of He et al. 2015 (a projection on every unit; BN
follows it, as "BN layers ... are adopted right after the weight layers for all units here",
Fig. 2 caption), so it is a value of ``ResNetConfig.shortcut``, not a combination.

The gate: "g(x) = sigma(W_g x + b_g) ... realized by a 1x1 convolutional layer. The gating
function modulates the signal by element-wise multiplication" (§3.1). Element-wise, as in the
Highway networks it follows (Srivastava et al. 2015), means one gate per channel and position:
a 1x1 convolution from the input's channels to the output's (strided like the unit), with a bias
and no BN (a BN would discard b_g, whose initial value the paper finds decisive). It adds
``in_channels * out_channels + out_channels`` parameters per unit. ``W_g`` is initialised like
every other convolution (He et al. 2015b); only ``b_g`` has the paper's value. Units that change
the shape gate their option-A/B shortcut the same way ("applied to all Residual Units").

For packing several seeds into one wide network: :class:`ConstantScaling` is a parameter-free,
element-wise leaf; the gates are containers of one 1x1 ``nn.Conv2d`` (with a bias) whose forwards
are element-wise; :class:`DropoutShortcut` holds an ``nn.Dropout``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from reslab.models.layers import check_choice

__all__ = [
    "COMBINES",
    "CombineOption",
    "ConstantScaling",
    "DropoutShortcut",
    "ExclusiveGating",
    "ShortcutGating",
    "make_combine",
]


class ConstantScaling(nn.Module):
    """``y = on_branch * F(x) + on_shortcut * h(x)`` (He et al. 2016, Fig. 2(b)).

    With ``on_shortcut = on_branch = 0.5`` it is "similar to the highway gating but with frozen
    gates"; with ``on_branch = 1`` the shortcut alone is scaled down (§3.1).
    """

    def __init__(self, on_shortcut: float, on_branch: float = 1.0) -> None:
        super().__init__()
        self.on_shortcut, self.on_branch = on_shortcut, on_branch

    def forward(self, out: Tensor, shortcut: Tensor, x: Tensor) -> Tensor:
        return self.on_branch * out + self.on_shortcut * shortcut

    def extra_repr(self) -> str:
        return f"on_shortcut={self.on_shortcut}, on_branch={self.on_branch}"


class _Gate(nn.Module):
    """``g(x) = sigmoid(W_g x + b_g)``: a 1x1 convolution with ``b_g`` initialised to ``bias``,
    one gate per output channel and position (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: float) -> None:
        super().__init__()
        self.gate = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=True)
        self.initial_bias = bias
        self.reset_gate_bias()

    def reset_gate_bias(self) -> None:
        """Set ``b_g`` to its initial value (He et al. 2016 search it over 0, -1, ..., -10)."""
        assert self.gate.bias is not None
        nn.init.constant_(self.gate.bias, self.initial_bias)

    def extra_repr(self) -> str:
        return f"gate_bias={self.initial_bias}"


class ExclusiveGating(_Gate):
    """``y = g(x) * F(x) + (1 - g(x)) * h(x)`` (He et al. 2016, Fig. 2(c)): Highway networks'
    exclusive gates, "the F path is scaled by g(x) and the shortcut path is scaled by 1 - g(x)".

    A very negative ``b_g`` opens the shortcut (1 - g near 1) but also suppresses ``F``.
    """

    def forward(self, out: Tensor, shortcut: Tensor, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(x))
        return g * out + (1 - g) * shortcut


class ShortcutGating(_Gate):
    """``y = F(x) + (1 - g(x)) * h(x)`` (He et al. 2016, Fig. 2(d)): "the function F is not
    scaled; only the shortcut path is gated by 1 - g(x)"."""

    def forward(self, out: Tensor, shortcut: Tensor, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(x))
        return out + (1 - g) * shortcut


class DropoutShortcut(nn.Module):
    """``y = F(x) + dropout(h(x))`` (He et al. 2016, Fig. 2(f)), in the original dropout's form
    (Srivastava et al. 2014): a kept element is passed unscaled and evaluation multiplies by the
    keep probability. The paper's reading needs that form: "dropout statistically imposes a scale
    of lambda with an expectation of 0.5 on the shortcut" - PyTorch's inverted dropout would
    rescale the kept half by 2 and keep the expectation at 1.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)  # inverted: keeps with 1 - p and scales by 1 / (1 - p)
        self.keep = 1.0 - p

    def forward(self, out: Tensor, shortcut: Tensor, x: Tensor) -> Tensor:
        # keep * inverted dropout: training passes kept elements as they are, eval scales by keep
        return out + self.keep * self.drop(shortcut)


@dataclass(frozen=True)
class CombineOption:
    """One row of He et al. 2016 Table 1: what multiplies the shortcut and the branch, and how
    to build the module for a unit from ``in_channels`` to ``out_channels`` at ``stride`` (None:
    the plain sum, no module)."""

    description: str
    on_shortcut: str  # Table 1's column "on shortcut"
    on_branch: str  # Table 1's column "on F"
    build: Callable[[int, int, int], nn.Module | None]


def _add(in_channels: int, out_channels: int, stride: int) -> None:
    return None


def _constant(
    in_channels: int, out_channels: int, stride: int, *, on_shortcut: float, on_branch: float
) -> nn.Module:
    return ConstantScaling(on_shortcut, on_branch)


def _dropout(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return DropoutShortcut(0.5)


#: ``ResNetConfig.combine``: how each unit combines ``h(x)`` and ``F(x)`` (He et al. 2016,
#: Table 1; b_g = -6 is the value the paper's search chose for both gates).
COMBINES: dict[str, CombineOption] = {
    "add": CombineOption("original: h(x) + F(x)", "1", "1", _add),
    "scale": CombineOption(
        "constant scaling, frozen gates",
        "0.5",
        "0.5",
        partial(_constant, on_shortcut=0.5, on_branch=0.5),
    ),
    "scale_shortcut": CombineOption(
        "constant scaling of the shortcut only",
        "0.5",
        "1",
        partial(_constant, on_shortcut=0.5, on_branch=1.0),
    ),
    "exclusive_gate": CombineOption(
        "exclusive gating, b_g = -6", "1-g(x)", "g(x)", partial(ExclusiveGating, bias=-6.0)
    ),
    "exclusive_gate_b0": CombineOption(
        "exclusive gating, b_g = 0", "1-g(x)", "g(x)", partial(ExclusiveGating, bias=0.0)
    ),
    "shortcut_gate": CombineOption(
        "shortcut-only gating, b_g = -6", "1-g(x)", "1", partial(ShortcutGating, bias=-6.0)
    ),
    "shortcut_gate_b0": CombineOption(
        "shortcut-only gating, b_g = 0", "1-g(x)", "1", partial(ShortcutGating, bias=0.0)
    ),
    "dropout": CombineOption("dropout shortcut, ratio 0.5", "dropout 0.5", "1", _dropout),
}


def make_combine(option: str, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The module that combines a unit's ``h(x)`` and ``F(x)`` under ``option`` (a key of
    :data:`COMBINES`), None for the plain sum; a gate reads the unit's ``in_channels`` and gates
    ``out_channels``."""
    check_choice("combine", option, COMBINES)
    return COMBINES[option].build(in_channels, out_channels, stride)

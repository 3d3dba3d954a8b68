"""One frozen dataclass describes every convolutional residual network in reslab."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from reslab.models.layers import NORMS, ORDERINGS, SHORTCUT_PADS, SHORTCUTS, STEMS, check_choice
from reslab.models.shortcuts import COMBINES

__all__ = ["ResNetConfig"]


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet as data. Named models in :mod:`reslab.models.zoo` are one line each.

    The defaults are ResNet-18 of He et al. 2015, Table 1.
    """

    block: str = "basic"  # "basic" (two 3x3) or "bottleneck" (1x1-3x3-1x1, expansion 4)
    layers: tuple[int, ...] = (2, 2, 2, 2)  # residual units per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # 3x3 width per stage (x4 at a bottleneck's out)
    stem: str = "imagenet"  # key of STEMS
    stem_width: int = 64  # output channels of the stem convolution
    ordering: str = "original"  # key of ORDERINGS (He et al. 2016, Fig. 4)
    shortcut: str = "B"  # key of SHORTCUTS: "A", "B", "C" or "none" (plain net)
    shortcut_pad: str = "after"  # option A's zero channels: key of SHORTCUT_PADS, after or split
    combine: str = "add"  # key of COMBINES: h(x) + F(x), or He et al. 2016 Table 1's scalings/gates
    stride_in: str = "1x1"  # bottleneck stride on the first 1x1 (paper) or the 3x3 ("v1.5")
    norm: str = "batch"  # key of NORMS: "batch" (BatchNorm, He et al. 2015 §3.4) or "none"
    num_classes: int = 1000  # 0: no classifier, the model returns its pooled features
    in_channels: int = 3
    zero_init_residual: bool = False  # start every unit's branch at zero (Goyal et al. 2017)

    def __post_init__(self) -> None:
        check_choice("block", self.block, ("basic", "bottleneck"))
        check_choice("stem", self.stem, STEMS)
        check_choice("ordering", self.ordering, ORDERINGS)
        check_choice("shortcut", self.shortcut, SHORTCUTS)
        check_choice("shortcut_pad", self.shortcut_pad, SHORTCUT_PADS)
        check_choice("combine", self.combine, COMBINES)
        check_choice("stride_in", self.stride_in, ("1x1", "3x3"))
        check_choice("norm", self.norm, NORMS)
        if len(self.layers) != len(self.widths) or not self.layers:
            raise ValueError(
                f"layers {self.layers} and widths {self.widths} must be non-empty and equally long"
            )
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {self.num_classes}")
        for name in ("in_channels", "stem_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.combine != "add" and self.shortcut == "none":
            raise ValueError(
                f"combine={self.combine!r} scales or gates the shortcut; a plain net "
                "(shortcut='none') has none"
            )
        if self.zero_init_residual and self.shortcut == "none":
            # a plain unit is its branch alone: zeroing it makes every input's features equal
            raise ValueError("zero_init_residual needs a shortcut; a plain net would output 0")

    @property
    def depth(self) -> int:
        """Weight layers counted as the papers do: stem conv + convs in units + fc."""
        per_unit = 2 if self.block == "basic" else 3
        return 1 + per_unit * sum(self.layers) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResNetConfig:
        d = {**d, "layers": tuple(d["layers"]), "widths": tuple(d["widths"])}
        return cls(**d)

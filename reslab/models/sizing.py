"""What a network config would cost to build, known before anything is built.

A checkpoint's ``model_config`` is data from a file: an untrusted or damaged one can ask for
``widths=(10**6, ...)`` (terabytes of weights) or ``layers=(10**6, ...)`` (a million modules,
minutes and gigabytes of Python objects before the first tensor). :func:`check_buildable`
refuses such a config from its numbers alone, with the parameter count it would need.
"""

from __future__ import annotations

import itertools

from reslab.models.config import ResNetConfig
from reslab.models.dense import DenseConfig
from reslab.models.layers import STEMS

__all__ = ["MAX_LAYERS", "MAX_PARAMETERS", "check_buildable", "weight_count"]

#: 2**31 weights = 8 GiB as float32: 35x ResNet-152's 60 M, the largest network in the zoo.
MAX_PARAMETERS = 2**31
#: Residual units (or dense layers): 10x the 1001-layer pre-activation ResNet's 333 units.
MAX_LAYERS = 10_000

_EXPANSION = {"basic": 1, "bottleneck": 4}


def weight_count(config: ResNetConfig | DenseConfig) -> int:
    """The weights of the convolutions and linear layers ``config`` builds: the parameter count
    without normalisation layers, biases and projection shortcuts: a lower bound, within 13% of
    the real count for every network of the zoo. Python integers: never overflows."""
    if isinstance(config, DenseConfig):
        widths = config.widths
        layers = sum(a * b for a, b in itertools.pairwise(widths))
        return layers + widths[-1] * config.num_classes
    stem = STEMS[config.stem]
    total = config.in_channels * config.stem_width * stem.kernel_size**2
    channels = config.stem_width
    expansion = _EXPANSION[config.block]
    for units, width in zip(config.layers, config.widths, strict=True):
        if units:  # the first unit of a stage takes the stage's input, the others its output
            out = width * expansion
            total += _unit(config.block, channels, width) + (units - 1) * _unit(
                config.block, out, width
            )
            channels = out
    return total + channels * config.num_classes


def _unit(block: str, in_channels: int, width: int) -> int:
    if block == "basic":  # 3x3, 3x3
        return 9 * in_channels * width + 9 * width * width
    return in_channels * width + 9 * width * width + 4 * width * width  # 1x1, 3x3, 1x1 (x4)


def check_buildable(config: ResNetConfig | DenseConfig, *, source: str = "the config") -> None:
    """Refuse, before building, a ``config`` that needs more than :data:`MAX_PARAMETERS`
    weights or :data:`MAX_LAYERS` units; the message names ``source`` and the count."""
    layers = sum(config.layers) if isinstance(config, ResNetConfig) else len(config.widths) - 1
    if layers > MAX_LAYERS:
        raise ValueError(
            f"{source} asks for {layers:,} residual layers, over the {MAX_LAYERS:,} reslab builds: "
            "refusing to build it (a damaged or untrusted file?)"
        )
    if min(config.widths) < 1:
        raise ValueError(f"{source} has a width below 1: {config.widths}")
    count = weight_count(config)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{source} asks for a network of at least {count:,} parameters "
            f"({count * 4 / 2**30:,.1f} GiB as float32), over the {MAX_PARAMETERS:,} reslab "
            "builds: refusing to build it (a damaged or untrusted file?)"
        )

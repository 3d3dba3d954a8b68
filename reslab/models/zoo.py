"""The model registry: every named network is one line of data."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from reslab.models.config import ResNetConfig
from reslab.models.dense import DenseConfig, DenseResNet
from reslab.models.features import FeatureListNet
from reslab.models.layers import check_choice
from reslab.models.pretrained import architecture_overrides, load_pretrained
from reslab.models.resnet import ResNet
from reslab.models.sizing import check_buildable
from reslab.models.weights import read_weights

__all__ = [
    "MODELS",
    "build_model",
    "cifar_config",
    "create_model",
    "get_config",
    "list_models",
]

Config = ResNetConfig | DenseConfig

_BASIC, _BOTTLENECK = "basic", "bottleneck"


def cifar_config(depth: int, *, block: str = _BASIC, **overrides: Any) -> ResNetConfig:
    """The CIFAR-10 network of ``depth`` weight layers: three stages on 32x32 inputs with a 3x3
    stem of 16 channels, 10 classes. The one place CIFAR nets are built from a depth.

    - ``block="basic"``: He et al. 2015 §4.2, ``6n + 2`` layers (20, 32, 44, 56, 110, 1202),
      ``2n`` per stage of widths 16/32/64, option A shortcuts.
    - ``block="bottleneck"``: He et al. 2016 §4.2 / Table 3, ``9n + 2`` layers (164, 1001),
      bottleneck outputs 64/128/256, option B shortcuts.

    ``overrides`` are other :class:`ResNetConfig` fields (``ordering``, ``shortcut``, ...).
    """
    check_choice("block", block, (_BASIC, _BOTTLENECK))
    per_unit = 2 if block == _BASIC else 3
    n, rest = divmod(depth - 2, 3 * per_unit)
    if rest or n < 1:
        first = [3 * per_unit * k + 2 for k in (1, 2, 3)]
        raise ValueError(
            f"a CIFAR net of {block} units has {3 * per_unit}n+2 weight layers "
            f"({', '.join(map(str, first))}, ...); got depth {depth}"
        )
    defaults: dict[str, Any] = {
        "stem": "cifar",
        "stem_width": 16,
        "widths": (16, 32, 64),
        "num_classes": 10,
        "shortcut": "A" if block == _BASIC else "B",
    }
    return ResNetConfig(block=block, layers=(n, n, n), **{**defaults, **overrides})


_IMAGENET_LAYERS = {
    18: (_BASIC, (2, 2, 2, 2)),
    34: (_BASIC, (3, 4, 6, 3)),
    50: (_BOTTLENECK, (3, 4, 6, 3)),
    101: (_BOTTLENECK, (3, 4, 23, 3)),
    152: (_BOTTLENECK, (3, 8, 36, 3)),
    200: (_BOTTLENECK, (3, 24, 36, 3)),  # He et al. 2016, Table 5
}


def _imagenet(depth: int, **kw: Any) -> ResNetConfig:
    block, layers = _IMAGENET_LAYERS[depth]
    return ResNetConfig(block=block, layers=layers, **kw)


MODELS: dict[str, Config] = {
    # He et al. 2015, Table 1 (stride on the bottleneck's 1x1, option B shortcuts).
    **{f"resnet{d}": _imagenet(d) for d in (18, 34, 50, 101, 152)},
    # He et al. 2016: full pre-activation units, Table 5 (ResNet-200 included).
    **{
        f"preact_resnet{d}": _imagenet(d, ordering="full_preact")
        for d in (18, 34, 50, 101, 152, 200)
    },
    # He et al. 2015, Table 2: plain twins of ResNet-18/34.
    **{f"plain{d}": _imagenet(d, shortcut="none") for d in (18, 34)},
    # He et al. 2015, §4.2 and Table 6: CIFAR-10 nets of 6n+2 layers.
    **{f"cifar_resnet{d}": cifar_config(d) for d in (20, 32, 44, 56, 110, 1202)},
    **{f"cifar_plain{d}": cifar_config(d, shortcut="none") for d in (20, 32, 44, 56, 110)},
    # He et al. 2016, Tables 3-4: pre-activation CIFAR nets.
    "cifar_preact_resnet110": cifar_config(110, ordering="full_preact"),
    **{
        f"cifar_preact_resnet{d}": cifar_config(d, block=_BOTTLENECK, ordering="full_preact")
        for d in (164, 1001)
    },
    # Seed 000's dense residual layer y + tau*sigma(Wy + b), on flattened 8x8 digits.
    **{
        f"dense_resnet{d}": DenseConfig.uniform(64, 64, d, residual=True, tau=1.0 / d**0.5)
        for d in (10, 100)
    },
    **{f"dense_plain{d}": DenseConfig.uniform(64, 64, d, residual=False) for d in (10, 100)},
}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell-style wildcard (``"*resnet5*"``)."""
    names = sorted(MODELS)
    return fnmatch.filter(names, pattern) if pattern else names


def get_config(name: str, **overrides: Any) -> Config:
    """The registered config of ``name`` with ``overrides`` applied."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(list_models())}")
    base = MODELS[name]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {name!r}; valid options: {', '.join(sorted(fields))}"
        )
    for key in ("layers", "widths", "tau_schedule"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(base, **overrides)


def build_model(config: Config) -> nn.Module:
    """Instantiate a network from its config; one too large to build (over 2**31 weights or
    10,000 units) is refused from its numbers before anything is allocated
    (:func:`reslab.models.sizing.check_buildable`)."""
    check_buildable(config, source=f"the {type(config).__name__}")
    if isinstance(config, DenseConfig):
        return DenseResNet(config)
    return ResNet(config)


def create_model(
    name: str,
    *,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet50", num_classes=10, stem="cifar")``.

    ``overrides`` replace fields of the model's config. ``num_classes=0`` builds it without a
    classifier (it returns pooled features). ``features_only=True`` returns a
    :class:`~reslab.models.features.FeatureListNet` giving the feature maps of the levels in
    ``out_indices`` (0: the stem, ``i``: stage ``i``; an int ``k``: the last ``k``; default all),
    as timm does; convolutional models only.

    ``pretrained=PATH`` (and optionally ``pretrained_sha256=HEX``) then initialises it from a
    weight file with :func:`reslab.models.pretrained.load_pretrained`, adapting the first layer to
    ``in_channels`` and the classifier to ``num_classes``. torchvision and timm bottlenecks stride
    their 3x3 convolution ("ResNet v1.5"), so from their files a bottleneck model is built with
    ``stride_in="3x3"`` unless ``stride_in`` is given; the PyTorch CIFAR ResNet files
    (``linear`` head, option A) get ``shortcut_pad="split"`` unless ``shortcut_pad`` is given.
    What the load report notes beyond that is raised as a warning.
    """
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects feature levels: it needs features_only=True")
    if features_only:
        if not isinstance(get_config(name), ResNetConfig):
            raise ValueError(
                f"features_only needs a convolutional model; {name!r} is a dense net, whose "
                "layers have no spatial feature levels"
            )
        model = create_model(name, **overrides)
        assert isinstance(model, ResNet)
        return FeatureListNet(model, out_indices)

    pretrained = overrides.pop("pretrained", None)
    if pretrained is True:
        raise ValueError(
            "pretrained=True would download weights, which reslab never does: pass the path of "
            f"a weight file instead, e.g. create_model({name!r}, pretrained='weights.pth') "
            "(a reslab checkpoint, or a torchvision or timm state dict)"
        )
    if pretrained is False:
        pretrained = None
    sha256 = overrides.pop("pretrained_sha256", None)
    if sha256 is not None and pretrained is None:
        raise ValueError("pretrained_sha256 needs pretrained=PATH")
    if pretrained is None:
        return build_model(get_config(name, **overrides))

    weights = read_weights(pretrained, sha256=sha256)
    # else the same weights compute another function (ResNet v1.5 strides, option-A placement)
    for key, value in architecture_overrides(weights, get_config(name)).items():
        overrides.setdefault(key, value)
    model = build_model(get_config(name, **overrides))
    report = load_pretrained(model, weights)
    for note in report.notes:
        warnings.warn(f"{pretrained}: {note}", stacklevel=2)
    return model

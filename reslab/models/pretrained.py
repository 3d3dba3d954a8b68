"""Initialise a reslab model from pretrained weights, adapting its first and last layer.

Seed 000, "Transfer Learning": if the input differs, adapt the first layer; if the labels differ,
adapt the last layer; initialise every other layer from the pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.models.config import ResNetConfig
from reslab.models.dense import DenseConfig, DenseResNet
from reslab.models.resnet import ResNet
from reslab.models.sizing import check_buildable
from reslab.models.weights import Weights, read_weights, rename_to_reslab

__all__ = [
    "LoadReport",
    "adapt_input_conv",
    "architecture_overrides",
    "checkpoint_config",
    "load_pretrained",
    "model_from_weights",
]

FIRST_LAYER = "conv1.weight"
HEAD = ("fc.weight", "fc.bias")
# BatchNorm's count of training batches: only used when momentum=None (a cumulative average), and
# absent from files saved before PyTorch 0.4.1 (the CIFAR ResNet family) or by exporters that
# drop buffers. Its absence never makes a file unusable; the model keeps its own counter.
_BN_COUNTER = "num_batches_tracked"


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: which keys loaded, which did not, and why."""

    path: str
    format: str
    loaded: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)  # renames and conventions, in words
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # first/last layer changes, in words
    notes: list[str] = field(default_factory=list)  # warnings that keys cannot reveal
    meta: dict[str, Any] = field(default_factory=dict)  # reslab checkpoints: classes, config ...

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"{self.path} ({self.format}): {len(self.loaded)} tensors loaded"]
        lines += [f"  mapped: {m}" for m in self.mapped]
        lines += [f"  adapted: {a}" for a in self.adapted]
        if self.missing:
            lines.append(f"  missing from the file ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            lines.append(
                f"  unexpected in the file ({len(self.unexpected)}): {_short(self.unexpected)}"
            )
        for key, src, dst in self.mismatched:
            lines.append(f"  shape mismatch: {key}: file {list(src)} vs model {list(dst)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A first-layer kernel for ``in_channels`` inputs from one trained on ``weight.shape[1]``.

    One channel: the sum over the input channels, so a grey image gives the same response as the
    grey image replicated to RGB. k channels: the channels repeated cyclically and scaled by
    c/k so the expected pre-activation stays the same (as timm's ``adapt_input_conv``).
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // c)  # ceil
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (c / in_channels)


def architecture_overrides(weights: Weights, config: Any) -> dict[str, str]:
    """Config fields that make a registered model compute the same function as the file's
    network where the file's names and shapes cannot tell: torchvision and timm bottlenecks
    stride the 3x3 ("ResNet v1.5"), and the CIFAR ResNet family splits option A's zero channels
    before and after the identity's. Callers apply them unless the user set the field."""
    if weights.format == "reslab" or not hasattr(config, "stride_in"):
        return {}
    if weights.format == "cifar-resnet":
        return {"shortcut_pad": "split"}
    return {"stride_in": "3x3"} if config.block == "bottleneck" else {}


def _foreign_notes(model: nn.Module, weights: Weights) -> list[str]:
    """Differences in structure that keys and shapes cannot show."""
    config = getattr(model, "config", None)
    if weights.format == "reslab" or config is None or not hasattr(config, "stride_in"):
        return []
    notes = []
    if weights.format == "cifar-resnet" and config.shortcut == "A":
        if config.shortcut_pad != "split":
            notes.append(
                "the CIFAR ResNet files' option A splits its zero channels before and after the "
                f"identity's; this model puts them {config.shortcut_pad!r} and computes another "
                "function: build it with shortcut_pad='split'"
            )
        return notes
    if config.block == "bottleneck" and config.stride_in == "1x1":
        notes.append(
            "torchvision and timm bottlenecks stride the 3x3 conv ('ResNet v1.5'); this model "
            "strides the 1x1: build it with stride_in='3x3' to reproduce the source network"
        )
    if weights.format == "timm-resnetv2" and config.block == "basic":
        notes.append(
            "timm's PreActBasic feeds the raw input to the first unit's identity shortcut; "
            "reslab feeds the pre-activated one (He et al. 2016, appendix), so outputs differ"
        )
    if weights.format == "timm-resnetv2" and config.ordering != "full_preact":
        notes.append("timm resnetv2 weights are pre-activation: use a preact_* model")
    return notes


def _placement(model: nn.Module, weights: Weights) -> list[str]:
    """Which option-A placement a CIFAR ResNet file was loaded into, for the report."""
    config = getattr(model, "config", None)
    if weights.format != "cifar-resnet" or getattr(config, "shortcut", None) != "A":
        return []
    assert config is not None
    return [f"option-A shortcuts: shortcut_pad={config.shortcut_pad!r}"]


def _adapt_first_layer(source: dict[str, Tensor], target: dict[str, Tensor]) -> list[str]:
    w, t = source.get(FIRST_LAYER), target.get(FIRST_LAYER)
    if w is None or t is None or w.ndim != 4 or t.ndim != 4 or w.shape[1] == t.shape[1]:
        return []
    if w.shape[0] != t.shape[0] or w.shape[2:] != t.shape[2:]:
        return []  # a different stem: reported as a shape mismatch
    c_in, c_out = w.shape[1], t.shape[1]
    source[FIRST_LAYER] = adapt_input_conv(w, c_out)
    rule = "summed" if c_out == 1 else f"repeated, scaled by {c_in}/{c_out}"
    return [f"{FIRST_LAYER}: {c_in} -> {c_out} input channels ({rule})"]


def _replace_head(
    source: dict[str, Tensor], target: dict[str, Tensor], fresh: set[str]
) -> list[str]:
    w, t = source.get(HEAD[0]), target.get(HEAD[0])
    if t is not None and not any(k.startswith("fc.") for k in source):
        # a headless backbone (timm num_classes=0, a feature extractor): nothing to copy
        fresh.update(k for k in HEAD if k in target)
        return [f"fc: file has no classifier; new {t.shape[0]}-class head, freshly initialised"]
    if w is None or t is None or w.shape[0] == t.shape[0] or w.shape[1:] != t.shape[1:]:
        return []
    for key in HEAD:
        source.pop(key, None)
    fresh.update(k for k in HEAD if k in target)
    return [f"fc: new {t.shape[0]}-class head (file has {w.shape[0]}), freshly initialised"]


def load_pretrained(
    model: nn.Module,
    path: str | Path | Weights,
    *,
    sha256: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Copy the weights in ``path`` into ``model``; return a report of what matched.

    ``path`` may also be the :class:`Weights` that :func:`read_weights` already returned (read
    and checked against ``sha256`` then), so a caller that looked at the file is not reading it
    twice.

    The first convolution is adapted when the model's input channels differ from the file's
    (:func:`adapt_input_conv`); the classifier keeps the model's fresh initialisation when the
    number of classes differs or the file has none (a headless backbone). Any other missing,
    unexpected or shape-mismatched key raises a ``ValueError`` carrying the report (nothing is
    loaded) unless ``strict=False``, in which case the matching tensors are loaded and the
    report lists the rest.
    """
    weights = path if isinstance(path, Weights) else read_weights(path, sha256=sha256)
    source, renames = rename_to_reslab(weights)
    target = model.state_dict()
    report = LoadReport(str(weights.path), weights.format, meta=weights.meta)
    report.mapped = [*weights.renamed, *renames, *_placement(model, weights)]
    report.notes = _foreign_notes(model, weights)

    fresh: set[str] = set()  # keys that keep the model's own initialisation on purpose
    report.adapted += _adapt_first_layer(source, target)
    report.adapted += _replace_head(source, target, fresh)
    counters = [k for k in target if k.endswith(_BN_COUNTER) and k not in source]
    if counters:
        fresh.update(counters)
        report.mapped.append(
            f"{_BN_COUNTER}: not in the file; the model's {len(counters)} BatchNorm counter(s) "
            "kept (unused with a momentum)"
        )
    # a counter the model has no BatchNorm for is as harmless: nothing reads it
    source = {k: v for k, v in source.items() if not (k.endswith(_BN_COUNTER) and k not in target)}

    report.missing = [k for k in target if k not in source and k not in fresh]
    report.unexpected = [k for k in source if k not in target]
    report.mismatched = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    ]
    usable = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
    report.loaded = sorted(usable)
    if strict and not report.ok:
        raise ValueError(
            f"weights do not fit the model (pass strict=False to load the rest):\n{report}"
        )
    with torch.no_grad():
        model.load_state_dict(usable, strict=False)
    return report


def checkpoint_config(weights: Weights) -> ResNetConfig | DenseConfig:
    """The architecture a reslab checkpoint records (``model_config``, ``model_kind``), checked:
    a config that does not parse, or whose network is too large to build
    (:func:`reslab.models.sizing.check_buildable`, from its numbers alone), is a ``ValueError``
    naming the file. Foreign state dicts carry no architecture and are refused."""
    path = weights.path
    if weights.format != "reslab":
        raise ValueError(
            f"{path} is a {weights.format} state dict, not a reslab checkpoint: it has no "
            "architecture, classes or input normalisation (fine-tune it first: reslab finetune "
            f"--from {path} --data ...)"
        )
    kind = weights.meta.get("model_kind", "resnet")
    try:
        raw = weights.meta["model_config"]
        config: ResNetConfig | DenseConfig = (
            DenseConfig.from_dict(raw) if kind == "dense" else ResNetConfig.from_dict(raw)
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: invalid model_config ({type(exc).__name__}: {exc})") from None
    check_buildable(config, source=f"the model_config of {path}")
    return config


def model_from_weights(weights: Weights) -> nn.Module:
    """The network a reslab checkpoint describes, with exactly its weights, in eval mode.

    Unlike :func:`load_pretrained` nothing is adapted: the config must build
    (:func:`checkpoint_config`: sized before anything is built) and every tensor must fit it (a
    missing ``num_batches_tracked`` aside), else a ``ValueError`` names the file and what does
    not fit. Foreign state dicts carry no architecture and are refused.
    """
    path = weights.path
    config = checkpoint_config(weights)
    net: nn.Module = DenseResNet(config) if isinstance(config, DenseConfig) else ResNet(config)
    target = net.state_dict()
    state = weights.state_dict
    missing = [k for k in target if k not in state and not k.endswith(_BN_COUNTER)]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: file {list(v.shape)} vs model {list(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            *([f"missing {_short(missing)}"] if missing else []),
            *([f"unexpected {_short(unexpected)}"] if unexpected else []),
            *mismatched[:4],
        ]
        raise ValueError(f"{path}: weights do not fit its model_config: {'; '.join(problems)}")
    with torch.no_grad():
        net.load_state_dict(state, strict=False)
    return net.eval()

"""What a trained network expects of an image, and how an image file becomes that input.

:func:`input_spec` is the one place that reads this from a checkpoint: the input config it
carries (:class:`reslab.data.InputConfig`, checkpoint format 3: size, resize and crop,
interpolation, normalisation), or, in older checkpoints, what the weights fix (a per-pixel
mean's size, a dense input layer). ``reslab predict``, ``reslab export`` and the exported
model's metadata all take it from there.

Resizing happens outside the network (on the image, before batching), exactly as evaluation did
it (:func:`read_image`: the data path's decoder, then the evaluation view); normalisation
happens inside (:class:`reslab.deploy.graph.InferenceModel`), so an exported graph takes raw
pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reslab.data.presets import InputConfig

__all__ = ["InputSpec", "input_spec", "read_image"]


@dataclass(frozen=True)
class InputSpec:
    """A network's input: ``channels`` x ``height`` x ``width`` uint8 images, normalised by
    ``(x / 255 - mean) / std`` (``mean``/``std`` of shape (C, 1, 1), or (C, H, W) for a
    per-pixel mean). ``fixed_size``: the network takes no other size (a per-pixel mean, a dense
    input layer), so ``--image-size`` cannot change it."""

    channels: int
    height: int
    width: int
    mean: Tensor
    std: Tensor
    normalization: str = "none"  # "pixel", "channel" or "none" (only the /255 scaling)
    fixed_size: bool = False
    interpolation: str = "bilinear"  # how images of another size are resized
    # the evaluation view: the shorter side resized to ``resize``, then the centre crop of
    # height x width; None: resized straight to height x width
    resize: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (mean/std as nested lists), as stored in an exported model's metadata."""
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "normalization": self.normalization,
            "fixed_size": self.fixed_size,
            "interpolation": self.interpolation,
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        return cls(
            int(d["channels"]),
            int(d["height"]),
            int(d["width"]),
            torch.tensor(d["mean"], dtype=torch.float32),
            torch.tensor(d["std"], dtype=torch.float32),
            str(d.get("normalization", "none")),
            bool(d.get("fixed_size", False)),
            str(d.get("interpolation", "bilinear")),
            None if d.get("resize") is None else int(d["resize"]),
        )

    def resized(self, side: int | None) -> InputSpec:
        """This spec at ``side`` x ``side`` (``None``: unchanged); refused where the size is
        fixed, with the size the network takes."""
        if side is None or (side, side) == (self.height, self.width):
            return self
        if side < 1:
            raise ValueError(f"image size must be >= 1, got {side}")
        if self.fixed_size:
            what = (
                f"normalises each pixel of {self.height}x{self.width} (HxW) training images"
                if self.normalization == "pixel"
                else f"takes {self.channels}x{self.height}x{self.width} inputs"
            )
            hint = f"--image-size {self.height}, or " if self.height == self.width else ""
            raise ValueError(
                f"this checkpoint {what}, so images are resized to {self.height}x{self.width}: "
                f"pass {hint}no --image-size (got {side})"
            )
        resize = None if self.resize is None else round(self.resize * side / self.height)
        return replace(self, height=side, width=side, resize=resize)

    def input_config(self) -> InputConfig:
        """The evaluation view as an :class:`~reslab.data.InputConfig` (geometry only; the
        normalisation runs in the network)."""
        c = self.channels
        return InputConfig(
            channels=c,
            size=(self.height, self.width),
            resize=self.resize,
            interpolation=self.interpolation,
            mean=(0.0,) * c,
            std=(1.0,) * c,
            normalize="none",
        )


def input_spec(checkpoint: Mapping[str, Any], *, image_size: int | None = None) -> InputSpec:
    """The input a reslab checkpoint's network expects (``checkpoint``: the dict a run saves, or
    :attr:`reslab.models.weights.Weights.meta`).

    The checkpoint's own input config (format 3 on; ``image_size`` resizes it where the network
    allows), else the size the weights fix (a per-pixel mean's, a dense network's input layer),
    else ``image_size``. A checkpoint that records none of these is refused: a guessed size gives
    confident wrong answers (a digits network fed 32-px images).
    """
    dense = checkpoint.get("model_kind") == "dense"
    saved = checkpoint.get("input_config")
    if saved is not None:
        return _from_input_config(InputConfig.from_dict(dict(saved)), dense, image_size)
    return _from_weights(checkpoint, dense, image_size)


def _from_input_config(cfg: InputConfig, dense: bool, image_size: int | None) -> InputSpec:
    """The spec of a checkpoint that carries its input config (format 3 on)."""
    if image_size is not None and not dense:
        cfg = cfg.resized(image_size)
    norm = cfg.normalizer()
    fixed = dense or cfg.normalize == "pixel"
    spec = InputSpec(cfg.channels, cfg.size[0], cfg.size[1], norm.mean, norm.std,
                     cfg.normalize, fixed, cfg.interpolation, cfg.resize)  # fmt: skip
    return spec.resized(image_size) if dense else spec


def _from_weights(checkpoint: Mapping[str, Any], dense: bool, image_size: int | None) -> InputSpec:
    """The spec of an older checkpoint: what its weights fix, else ``image_size``."""
    config = checkpoint.get("model_config") or {}
    norm = checkpoint.get("normalization")
    mean = std = None
    if norm is not None:
        mean = torch.as_tensor(norm["mean"], dtype=torch.float32)
        std = torch.as_tensor(norm["std"], dtype=torch.float32)
    if "in_channels" in config:
        channels = int(config["in_channels"])
    elif mean is not None:
        channels = int(mean.shape[0])
    else:  # a dense net without its normalisation: grey if its inputs make a square, else RGB
        features = int(config["widths"][0])
        channels = 1 if math.isqrt(features) ** 2 == features else 3
    if mean is None or std is None:
        mean, std = torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1)
    mode = str(norm["mode"]) if norm is not None else "none"

    def make(h: int, w: int, fixed: bool) -> InputSpec:
        return InputSpec(channels, h, w, mean, std, mode, fixed)

    if mean.ndim == 3 and tuple(mean.shape[-2:]) != (1, 1):  # a per-pixel mean
        return make(int(mean.shape[-2]), int(mean.shape[-1]), True).resized(image_size)
    if dense:
        features = int(config["widths"][0])  # flattened square images
        side = math.isqrt(features // channels)
        if channels * side * side != features:
            raise ValueError(
                f"this dense checkpoint takes {features} input features, which are not "
                f"{channels} channel(s) of a square image"
            )
        return make(side, side, True).resized(image_size)
    if image_size is None:
        raise ValueError(
            "this checkpoint does not record the image size its network was trained on (it was "
            "written before checkpoints carried their input, format 1 or 2): pass --image-size "
            "N, the side of its training images (8 for the digits, 32 for CIFAR); `reslab eval` "
            "reads its data at their own size"
        )
    if image_size < 1:
        raise ValueError(f"image size must be >= 1, got {image_size}")
    return make(image_size, image_size, False)


def read_image(path: str | Path, spec: InputSpec) -> Tensor:
    """An image file as the uint8 (C, H, W) tensor ``spec`` asks for, made as evaluation made
    it: decoded by the data path's decoder (:func:`reslab.data.images.decode`: EXIF orientation,
    grey/RGBA/CMYK/palette/16-bit converted to the channels, reduced-size JPEG decoding), then
    the evaluation view (shorter side to ``spec.resize`` + centre crop, or straight to the size).
    A file that is not a readable image raises ``ValueError`` naming it."""
    return spec.input_config().read_image(path)

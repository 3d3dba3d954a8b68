"""What a trained network expects of an image, and how an image file becomes that input.

:func:`input_spec` is the one place that reads this from a checkpoint (its normalisation, the
training image size, the architecture): ``reslab predict``, ``reslab export`` and the exported
model's metadata all take it from there, so a change in what checkpoints record (a full input
config with resize, crop and interpolation) is a change to that one function.

Resizing happens outside the network (on the image, before batching); normalisation happens
inside (:class:`reslab.deploy.graph.InferenceModel`), so an exported graph takes raw pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DEFAULT_SIDES", "InputSpec", "input_spec", "read_image"]

# The side a network's stem was designed for, used when the checkpoint does not say: CIFAR's
# 32 pixels (He et al. 2015 §4.2) and ImageNet's 224-pixel crops (Table 1).
DEFAULT_SIDES = {"cifar": 32, "imagenet": 224}


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
    interpolation: str = "bilinear"  # how images of another size are resized (PIL)

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
        return InputSpec(
            self.channels, side, side, self.mean, self.std, self.normalization, False,
            self.interpolation,
        )  # fmt: skip


def input_spec(checkpoint: Mapping[str, Any], *, image_size: int | None = None) -> InputSpec:
    """The input a reslab checkpoint's network expects (``checkpoint``: the dict a run saves, or
    :attr:`reslab.models.weights.Weights.meta`).

    The size is the per-pixel mean's (fixed), a dense network's input layer (fixed), else
    ``image_size``, else the last side of the run's progressive resizing, else the stem's
    design size (:data:`DEFAULT_SIDES`).
    """
    config = checkpoint.get("model_config") or {}
    norm = checkpoint.get("normalization")
    dense = checkpoint.get("model_kind") == "dense"
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

    def spec(h: int, w: int, fixed: bool) -> InputSpec:
        return InputSpec(channels, h, w, mean, std, mode, fixed)

    if mean.ndim == 3 and tuple(mean.shape[-2:]) != (1, 1):  # a per-pixel mean
        return spec(int(mean.shape[-2]), int(mean.shape[-1]), True).resized(image_size)
    if dense:
        features = int(config["widths"][0])  # flattened square images
        side = math.isqrt(features // channels)
        if channels * side * side != features:
            raise ValueError(
                f"this dense checkpoint takes {features} input features, which are not "
                f"{channels} channel(s) of a square image"
            )
        return spec(side, side, True).resized(image_size)
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image size must be >= 1, got {image_size}")
        return spec(image_size, image_size, False)
    resolutions = (checkpoint.get("train_config") or {}).get("resolutions") or ()
    side = int(resolutions[-1][1]) if resolutions else DEFAULT_SIDES[config.get("stem", "cifar")]
    return spec(side, side, False)


def read_image(path: str | Path, spec: InputSpec) -> Tensor:
    """An image file as the uint8 (C, H, W) tensor ``spec`` asks for: converted to grey or RGB,
    resized if its size differs. A file that is not a readable image raises ``ValueError``
    naming it."""
    from PIL import Image, UnidentifiedImageError

    from reslab.data.images import DEFAULT_LIMITS, probe, read_bounded

    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    if not Path(path).exists():
        raise FileNotFoundError(f"no image file at {path}")
    # as the data readers do: a regular file of bounded size, whose declared size is checked
    # before a pixel is decoded (a 9000x9000 PNG of a few KB would decode to 243 MB)
    data = read_bounded(path, DEFAULT_LIMITS.max_file_bytes)
    probe(data, str(path), DEFAULT_LIMITS)
    try:
        with Image.open(io.BytesIO(data)) as file:
            img = _to_8_bit(file).convert("L" if spec.channels == 1 else "RGB")
            if img.size != (spec.width, spec.height):
                resample = Image.Resampling[spec.interpolation.upper()]
                img = img.resize((spec.width, spec.height), resample)
            array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:  # already names the file
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        # PIL's "image file is truncated" does not say which file
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    x = torch.from_numpy(array.copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def _to_8_bit(img: Image.Image) -> Image.Image:
    """16-bit grey ("I;16*", or "I", as which older Pillow opens it) scaled to "L" (x / 257, so
    65535 is 255): PIL's convert would clip every value above 255 to white."""
    from PIL import Image

    if not img.mode.startswith("I"):
        return img
    a = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.round(a / 257), 0, 255).astype(np.uint8), "L")

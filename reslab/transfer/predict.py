"""Top-k predictions of a trained checkpoint on image files, with the class names it stores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["predict_files", "read_image"]

DEFAULT_IMAGE_SIZE = 32  # CIFAR's side, the size reslab's CIFAR stems were designed for


def read_image(path: str | Path, channels: int, size: int | tuple[int, int]) -> Tensor:
    """An image file as uint8 (channels, H, W), the layout the trainer's data uses; ``size`` is
    the side of a square or (H, W). A file that is not a readable image raises ``ValueError``."""
    from PIL import Image, UnidentifiedImageError

    h, w = (size, size) if isinstance(size, int) else size
    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    try:
        with Image.open(path) as img:
            img = _to_8_bit(img)
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
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


def _input_shape(model: nn.Module, requested: int | None) -> tuple[int, tuple[int, int]]:
    """Channels and (H, W) the model takes: a per-pixel mean fixes (H, W) to the training size;
    a dense network takes exactly as many pixels as its first layer has inputs."""
    norm = getattr(model, "input_norm", None)
    config = model.config
    pixel = None  # (H, W) of a per-pixel mean
    if norm is not None and norm.mean.ndim == 3 and tuple(norm.mean.shape[-2:]) != (1, 1):
        pixel = (int(norm.mean.shape[-2]), int(norm.mean.shape[-1]))
    if hasattr(config, "in_channels"):
        channels = int(config.in_channels)
    elif norm is not None:
        channels = int(norm.mean.shape[0])
    else:  # a dense net without its normalisation: grey if its inputs make a square, else RGB
        features = int(config.widths[0])
        channels = 1 if math.isqrt(features) ** 2 == features else 3
    if pixel is not None:
        if requested is not None and (requested, requested) != pixel:
            hint = f"--image-size {pixel[0]}, or " if pixel[0] == pixel[1] else ""
            raise ValueError(
                f"this checkpoint normalises each pixel of {pixel[0]}x{pixel[1]} (HxW) training "
                f"images, so images are resized to {pixel[0]}x{pixel[1]}: pass {hint}no "
                f"--image-size (got {requested})"
            )
        return channels, pixel
    if hasattr(config, "in_channels"):  # a ResNet pools globally: any size
        side = DEFAULT_IMAGE_SIZE if requested is None else requested
        return channels, (side, side)
    features = int(config.widths[0])  # a dense network: flattened square images
    side = math.isqrt(features // channels)
    if channels * side * side != features:
        raise ValueError(
            f"this dense checkpoint takes {features} input features, which are not {channels} "
            "channel(s) of a square image"
        )
    if requested is not None and requested != side:
        raise ValueError(
            f"this dense checkpoint takes {features} input features = {channels}x{side}x{side}: "
            f"pass --image-size {side}, or no --image-size (got {requested})"
        )
    return channels, (side, side)


@torch.no_grad()
def predict_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    *,
    topk: int = 5,
    image_size: int | None = None,
) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each image, the ``topk`` (class name, probability) pairs, most likely first."""
    from reslab.train.checkpoint import find_checkpoint, load_checkpoint, load_model

    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    path = find_checkpoint(Path(checkpoint))
    model = load_model(path)
    classes = load_checkpoint(path).get("classes") or []
    n = int(model.config.num_classes)
    if len(classes) != n:
        classes = [str(i) for i in range(n)]
    channels, size = _input_shape(model, image_size)
    batch = torch.stack([read_image(p, channels, size) for p in images])
    x = model.input_norm(batch) if hasattr(model, "input_norm") else batch.float() / 255
    probs = torch.softmax(model(x).float(), dim=1)
    values, indices = probs.topk(min(topk, n), dim=1)
    return [
        (str(p), [(classes[i], float(v)) for v, i in zip(vs, ix, strict=True)])
        for p, vs, ix in zip(images, values.tolist(), indices.tolist(), strict=True)
    ]

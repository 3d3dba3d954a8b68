"""Top-k predictions of a trained checkpoint on image files, with the class names it stores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from reslab.data.presets import InputConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["input_config", "predict_files", "read_image"]


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


def input_config(model: nn.Module, requested: int | None) -> InputConfig:
    """The input ``model`` takes, as evaluation applies it: the checkpoint's own input config
    (format 3; ``requested`` resizes it where the network allows), else what the weights fix (a
    per-pixel mean's size, a dense network's input layer), else ``requested`` (straight resize).
    A checkpoint that records none of these is refused: a guessed size gives confident wrong
    answers (a digits network fed 32-px images)."""
    saved = getattr(model, "input_config", None)
    if saved is not None:
        return saved if requested is None else saved.resized(requested)
    norm = getattr(model, "input_norm", None)
    channels, fixed = _fixed_input(model, norm)
    if fixed is not None:
        if requested is not None and (requested, requested) != fixed:
            what = (
                f"normalises each pixel of {fixed[0]}x{fixed[1]} (HxW) training images"
                if norm is not None and norm.mode == "pixel"
                else f"takes {channels}x{fixed[0]}x{fixed[1]} inputs"
            )
            hint = f"--image-size {fixed[0]}, or " if fixed[0] == fixed[1] else ""
            raise ValueError(
                f"this checkpoint {what}, so images are resized to {fixed[0]}x{fixed[1]}: pass "
                f"{hint}no --image-size (got {requested})"
            )
        size = fixed
    elif requested is not None:
        size = (requested, requested)
    else:
        raise ValueError(
            "this checkpoint does not record the image size its network was trained on (it was "
            "written before checkpoints carried their input, format 1 or 2): pass --image-size "
            "N, the side of its training images (8 for the digits, 32 for CIFAR); or evaluate "
            "it with `reslab eval`, which reads its data at their own size"
        )
    cfg = InputConfig(channels=channels, size=size, resize=None, mean=(0.0,) * channels,
                      std=(1.0,) * channels, normalize="none")  # fmt: skip
    return cfg.with_normalization(norm) if norm is not None else cfg


def _fixed_input(model: nn.Module, norm: Any) -> tuple[int, tuple[int, int] | None]:
    """(channels, (H, W) the weights fix or None): a per-pixel mean fixes the training size, a
    dense network's first layer takes exactly channels x H x W features."""
    config = model.config
    if hasattr(config, "in_channels"):
        channels = int(config.in_channels)
    elif norm is not None:
        channels = int(norm.mean.shape[0])
    else:  # a dense net without its normalisation: grey if its inputs make a square, else RGB
        features = int(config.widths[0])
        channels = 1 if math.isqrt(features) ** 2 == features else 3
    if norm is not None and norm.mean.ndim == 3 and tuple(norm.mean.shape[-2:]) != (1, 1):
        return channels, (int(norm.mean.shape[-2]), int(norm.mean.shape[-1]))
    if hasattr(config, "in_channels"):  # a ResNet pools globally: any size
        return channels, None
    features = int(config.widths[0])  # a dense network: flattened square images
    side = math.isqrt(features // channels)
    if channels * side * side != features:
        raise ValueError(
            f"this dense checkpoint takes {features} input features, which are not {channels} "
            "channel(s) of a square image"
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
    cfg = input_config(model, image_size)
    batch = torch.stack([cfg.read_image(p) for p in images])
    x = cfg.normalizer()(batch)
    probs = torch.softmax(model(x).float(), dim=1)
    values, indices = probs.topk(min(topk, n), dim=1)
    return [
        (str(p), [(classes[i], float(v)) for v, i in zip(vs, ix, strict=True)])
        for p, vs, ix in zip(images, values.tolist(), indices.tolist(), strict=True)
    ]

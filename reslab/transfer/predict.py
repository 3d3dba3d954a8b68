"""Top-k predictions of a trained checkpoint on image files, with the class names it stores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["predict_files", "read_image"]

DEFAULT_IMAGE_SIZE = 32  # CIFAR's side, the size reslab's CIFAR stems were designed for


def read_image(path: str | Path, channels: int, size: int) -> Tensor:
    """An image file as uint8 (channels, size, size), the layout the trainer's data uses."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(array.copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def _image_size(model: nn.Module, requested: int | None) -> int:
    if requested is not None:
        return requested
    norm = getattr(model, "input_norm", None)  # per-pixel normalisation has the training size
    if norm is not None and norm.mean.ndim == 3 and norm.mean.shape[-1] > 1:
        return int(norm.mean.shape[-1])
    return DEFAULT_IMAGE_SIZE


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

    path = find_checkpoint(Path(checkpoint))
    model = load_model(path)
    classes = load_checkpoint(path).get("classes") or []
    n = int(model.config.num_classes)
    if len(classes) != n:
        classes = [str(i) for i in range(n)]
    size = _image_size(model, image_size)
    channels = int(model.config.in_channels)
    batch = torch.stack([read_image(p, channels, size) for p in images])
    x = model.input_norm(batch) if hasattr(model, "input_norm") else batch.float() / 255
    probs = torch.softmax(model(x).float(), dim=1)
    values, indices = probs.topk(min(topk, n), dim=1)
    return [
        (str(p), [(classes[i], float(v)) for v, i in zip(vs, ix, strict=True)])
        for p, vs, ix in zip(images, values.tolist(), indices.tolist(), strict=True)
    ]

"""Top-k predictions of a trained checkpoint on image files (the library behind ``reslab
predict`` is :mod:`reslab.deploy.predict`; these are its earlier entry points)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from reslab.deploy.inputs import InputSpec
from reslab.deploy.inputs import read_image as _read_image
from reslab.deploy.predict import load_predictor, predict

__all__ = ["predict_files", "read_image"]


def read_image(path: str | Path, channels: int, size: int | tuple[int, int]) -> Tensor:
    """An image file as uint8 (channels, H, W), the layout the trainer's data uses; ``size`` is
    the side of a square or (H, W). A file that is not a readable image raises ``ValueError``."""
    h, w = (size, size) if isinstance(size, int) else size
    spec = InputSpec(channels, h, w, torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1))
    return _read_image(path, spec)


def predict_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    *,
    topk: int = 5,
    image_size: int | None = None,
) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each image, the ``topk`` (class name, probability) pairs, most likely first."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    predictor = load_predictor(checkpoint, device="cpu", image_size=image_size)
    results = predict(predictor, [Path(p) for p in images], topk=topk, workers=0, progress=False)
    return [(r.image, [(c, p) for c, _, p in r.top]) for r in results]

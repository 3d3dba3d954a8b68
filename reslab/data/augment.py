"""Augmentation and normalisation of whole batches on the training device.

He et al. 2015, §4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled from
the padded image or its horizontal flip", and the input is normalised by "the per-pixel mean
subtracted". Every sample draws its own offset and flip; the batch is transformed by one gather,
with no per-image Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Normalize", "crop_flip", "random_crop_flip"]


def random_crop_flip(
    images: Tensor, *, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Zero-pad by ``padding`` pixels, take a random crop of the original size, mirror half.

    ``images`` is (N, C, H, W) of any dtype on any device; the random draws come from ``generator``
    (a CPU generator, so a run's augmentation does not depend on the device) and are moved over.
    Padding with zeros on uint8 images pads black, as torchvision's ``RandomCrop(32, padding=4)``.
    """
    n = len(images)
    if padding == 0 and not flip:
        return images
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return crop_flip(images, dy, dx, mirror, padding=padding)


def crop_flip(images: Tensor, dy: Tensor, dx: Tensor, mirror: Tensor, *, padding: int) -> Tensor:
    """The crops of :func:`random_crop_flip` at given offsets: image ``i`` zero-padded by
    ``padding``, cropped at row ``dy[i]``, column ``dx[i]`` (each in [0, 2 * padding]) to its
    original size, mirrored where ``mirror[i]``; one gather for the whole batch."""
    n, c, h, w = images.shape
    dev = images.device
    dy, dx = dy.view(n, 1).to(dev, non_blocking=True), dx.view(n, 1).to(dev, non_blocking=True)
    mirror = mirror.view(n, 1).to(dev)
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = dy + torch.arange(h, device=dev)  # (N, H): source row of each output row
    ar = torch.arange(w, device=dev)
    cols = dx + torch.where(mirror, w - 1 - ar, ar)  # (N, W): source column, mirrored or not
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    padded = F.pad(images, (padding,) * 4) if padding else images
    return torch.gather(padded.reshape(n, c, hp * wp), 2, index).view(n, c, h, w)


@dataclass(frozen=True)
class Normalize:
    """``(x / 255 - mean) / std`` for uint8 images, as one fused multiply-add.

    ``mode="pixel"``: subtract the per-pixel mean of the training images, std 1 (He et al. 2015,
    §4.2); ``mode="channel"``: per-channel mean and standard deviation (the common modern choice).
    """

    mode: str
    mean: Tensor  # (C, H, W) or (C, 1, 1), in units of the [0, 1] image range
    std: Tensor  # same shape as mean

    @classmethod
    def fit(cls, images: Tensor, mode: str = "pixel") -> Normalize:
        """Statistics of the training images (uint8, N C H W)."""
        x = images.float().div_(255.0) if images.numel() else torch.zeros(1, *images.shape[1:])
        if mode == "pixel":
            mean = x.mean(0)
            std = torch.ones_like(mean)
        elif mode == "channel":
            mean = x.mean((0, 2, 3))[:, None, None]
            std = x.std((0, 2, 3))[:, None, None].clamp_min(1e-3)
        else:
            raise ValueError(f"unknown normalize mode {mode!r}; valid choices: pixel, channel")
        return cls(mode, mean, std)

    @classmethod
    def identity(cls, channels: int) -> Normalize:
        """Only the /255 scaling: what a model that was never fitted sees."""
        return cls("none", torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1))

    def __call__(self, images: Tensor) -> Tensor:
        scale = (1.0 / (255.0 * self.std)).to(images.device)
        shift = (-self.mean / self.std).to(images.device)
        return torch.addcmul(shift, images.float(), scale)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict) -> Normalize:
        return cls(d["mode"], d["mean"], d["std"])

"""The ImageNet evaluation protocols of He et al. 2015, §3.4, as functions over a model.

- single crop: resize the shorter side to 256, centre crop 224 (``InputConfig`` defaults);
- 10-crop: the four corner crops and the centre crop of that resized image, and their mirrors
  (Krizhevsky et al. 2012), softmax scores averaged;
- fully convolutional multi-scale: the whole image with its shorter side resized to each of
  {224, 256, 384, 480, 640}, scores averaged over the scales (Simonyan & Zisserman 2015). A
  reslab ResNet ends in global average pooling, so at a larger input its classifier averages the
  scores of every 224-sized window, which is the fully convolutional form.

All take uint8 images and the device-side normaliser, and return class probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from reslab.data.presets import InputConfig, _interp

__all__ = ["MULTI_SCALES", "multiscale_probs", "single_crop_probs", "ten_crop_probs"]

MULTI_SCALES = (224, 256, 384, 480, 640)


def _probs(model: nn.Module, x: Tensor, normalize: Callable[[Tensor], Tensor]) -> Tensor:
    device = next(model.parameters()).device
    return torch.softmax(model(normalize(x.to(device))).float(), dim=-1)


@torch.no_grad()
def single_crop_probs(
    model: nn.Module, images: Sequence[Tensor] | Tensor, cfg: InputConfig
) -> Tensor:
    """(N, classes): the evaluation transform of ``cfg`` on each uint8 (C, H, W) image."""
    t = cfg.eval_transform()
    x = torch.stack([t(im) for im in images])
    return _probs(model, x, cfg.normalizer())


@torch.no_grad()
def ten_crop_probs(model: nn.Module, images: Sequence[Tensor] | Tensor, cfg: InputConfig) -> Tensor:
    """(N, classes): the mean softmax over 10 crops of ``cfg.size`` (corners, centre, mirrored)
    of each image resized to ``cfg.resize`` on its shorter side; one forward pass for the crops
    of all ``images``."""
    from torchvision.transforms.v2 import functional as F

    side = cfg.resize or max(cfg.size)
    crops = []
    for im in images:
        r = F.resize(im, [side], interpolation=_interp(cfg.interpolation), antialias=True)
        crops.append(torch.stack(F.ten_crop(r, list(cfg.size))))  # (10, C, h, w)
    probs = _probs(model, torch.cat(crops), cfg.normalizer())
    return probs.view(len(crops), 10, -1).mean(1)


@torch.no_grad()
def multiscale_probs(
    model: nn.Module,
    images: Sequence[Tensor] | Tensor,
    cfg: InputConfig,
    scales: Sequence[int] = MULTI_SCALES,
    *,
    flip: bool = False,
) -> Tensor:
    """(N, classes): the mean softmax over ``scales`` of the whole image, shorter side resized to
    each scale, through the network as a fully convolutional one (``flip``: and its mirror).
    Images that come out of a resize at the same size share a forward pass.

    Normalisation: per-channel statistics apply at any size; a per-pixel mean (``cfg.normalize
    == "pixel"``) is defined at ``cfg.size`` only, so its channel means are subtracted instead.
    """
    from torchvision.transforms.v2 import functional as F

    norm: Callable[[Tensor], Tensor] = cfg.normalizer()
    if cfg.normalize == "pixel":
        assert cfg.pixel_mean is not None
        channel = cfg.pixel_mean.mean((1, 2))
        norm = InputConfig(
            channels=cfg.channels,
            size=cfg.size,
            resize=cfg.resize,
            mean=tuple(channel.tolist()),
            std=(1.0,) * cfg.channels,
        ).normalizer()
    total: Tensor | None = None
    for s in scales:
        resized = [F.resize(im, [s], interpolation=_interp(cfg.interpolation), antialias=True)
                   for im in images]  # fmt: skip
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(resized):
            by_shape.setdefault(tuple(r.shape), []).append(i)
        scores: list[Tensor | None] = [None] * len(resized)
        for idx in by_shape.values():
            batch = torch.stack([resized[i] for i in idx])
            p = _probs(model, batch, norm)
            if flip:
                p = (p + _probs(model, batch.flip(-1), norm)) / 2
            for i, row in zip(idx, p, strict=True):
                scores[i] = row
        stacked = torch.stack([x for x in scores if x is not None])
        total = stacked if total is None else total + stacked
    assert total is not None
    return total / len(scales)

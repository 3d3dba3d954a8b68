"""What a network expects at its input, and the transforms that produce it.

:class:`InputConfig` is the evaluation side (channels, size, resize + crop policy, interpolation,
normalisation) as one frozen record that travels with the weights, so ``eval``, ``predict`` and
export apply exactly training's evaluation transform. :class:`ClassificationPresetTrain` and
:class:`ClassificationPresetEval` follow torchvision's references/classification/presets.py: all
of a recipe's per-image transforms in two objects, built from torchvision transforms v2 and
applied to uint8 (C, H, W) tensors in DataLoader workers. Normalisation is not among them: it runs
on the training device on whole uint8 batches (:meth:`InputConfig.normalizer`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from reslab.data.augment import Normalize

if TYPE_CHECKING:
    from reslab.data.images import Limits

__all__ = [
    "IMAGENET_EIGVAL",
    "IMAGENET_EIGVEC",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RECIPES",
    "ClassificationPresetEval",
    "ClassificationPresetTrain",
    "InputConfig",
    "PCALighting",
    "RandomResizedCropFlip",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's and timm's ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)
# principal components of ImageNet's RGB pixel values in [0, 1] (Krizhevsky et al. 2012, §4.1), as
# published with fb.resnet.torch, which He et al.'s Torch re-implementation used
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
NORMALIZE_MODES = ("channel", "pixel", "none")
CROPS = ("center", "none")
RECIPES = ("photo", "cifar", "imagenet")


def _interp(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
    }[name]


@dataclass(frozen=True)
class InputConfig:
    """The input a network was trained on, and how to turn any image into it for evaluation.

    Evaluation transform: resize the shorter side to ``resize`` (keeping the aspect ratio), then
    a centre crop of ``size`` (``crop="center"``); ``resize=None`` resizes straight to ``size``.
    Then, on the device, ``x / 255`` normalised per ``normalize``: "channel" ``(x - mean) / std``;
    "pixel" minus ``pixel_mean`` (C, H, W), std 1 (He et al. 2015, §3.4 and §4.2); "none".
    """

    channels: int = 3
    size: tuple[int, int] = (224, 224)  # (H, W)
    resize: int | None = 256  # shorter side before the crop: 224/256 = 0.875 of it is kept
    crop: str = "center"
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN  # per channel, in [0, 1] units
    std: tuple[float, ...] = IMAGENET_STD
    normalize: str = "channel"
    pixel_mean: Tensor | None = field(default=None, compare=False, repr=False)  # (C, H, W)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (H, W) with positive sides, got {self.size}")
        if self.resize is not None and self.resize < min(self.size):
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.size}")
        for name, value, valid in (
            ("crop", self.crop, CROPS),
            ("interpolation", self.interpolation, INTERPOLATIONS),
            ("normalize", self.normalize, NORMALIZE_MODES),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(valid)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean}, {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.normalize == "pixel":
            want = (self.channels, *self.size)
            if self.pixel_mean is None or tuple(self.pixel_mean.shape) != want:
                got = None if self.pixel_mean is None else tuple(self.pixel_mean.shape)
                raise ValueError(f"normalize='pixel' needs a pixel_mean of shape {want}, got {got}")

    @property
    def crop_pct(self) -> float:
        """The share of the resized shorter side the centre crop keeps (timm's ``crop_pct``)."""
        return min(self.size) / self.resize if self.resize else 1.0

    @classmethod
    def from_default_cfg(cls, cfg: dict[str, Any]) -> InputConfig:
        """From a timm-style ``default_cfg``/``pretrained_cfg`` dict: ``input_size`` (C, H, W),
        ``mean``, ``std``, ``interpolation``, ``crop_pct`` (resize = floor(size / crop_pct), as
        timm's ``transforms_factory``)."""
        c, h, w = cfg.get("input_size", (3, 224, 224))
        crop_pct = float(cfg.get("crop_pct", 0.875))
        interp = cfg.get("interpolation", "bilinear")
        interp = interp if interp in INTERPOLATIONS else "bilinear"  # timm's "random" etc.
        squash = cfg.get("crop_mode") == "squash"  # timm: resize both sides, then the crop
        return cls(
            channels=int(c),
            size=(int(h), int(w)),
            # timm resizes the shorter side to floor(size / crop_pct) whatever crop_pct is, so
            # crop_pct 1 (CIFAR stems) is shorter side = size + centre crop, not a squash
            resize=None if squash else math.floor(min(h, w) / crop_pct),
            crop="center",
            interpolation=interp,
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
        )

    def with_normalization(self, norm: Normalize) -> InputConfig:
        """This config normalised as ``norm`` (statistics fitted to the training images, or a
        pretrained network's): "channel" mean/std, "pixel" mean, or "none"."""
        if norm.mode == "pixel":
            return replace(
                self,
                normalize="pixel",
                pixel_mean=norm.mean.detach().float().cpu().clone(),
                mean=tuple(norm.mean.float().mean((1, 2)).tolist()),
                std=(1.0,) * self.channels,
            )
        if norm.mode == "channel":
            mean, std = tuple(norm.mean.flatten().tolist()), tuple(norm.std.flatten().tolist())
            return replace(self, normalize="channel", mean=mean, std=std, pixel_mean=None)
        if norm.mode != "none":
            raise ValueError(f"unknown normalisation mode {norm.mode!r}")
        return replace(self, normalize="none", pixel_mean=None)

    def describe(self) -> dict[str, Any]:
        """JSON-ready (the per-pixel mean as its shape): config.json's record of the input."""
        d = self.to_dict()
        if self.pixel_mean is not None:
            d["pixel_mean"] = f"tensor of shape {list(self.pixel_mean.shape)} (in the checkpoint)"
        return d

    def to_dict(self) -> dict[str, Any]:
        """Plain values (and ``pixel_mean`` as a tensor), for checkpoints."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown input config keys {unknown}; valid: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("pixel_mean"), list):
            d["pixel_mean"] = torch.tensor(d["pixel_mean"], dtype=torch.float32)
        return cls(**d)

    def normalizer(self) -> Normalize:
        """The device-side normalisation of uint8 batches."""
        if self.normalize == "pixel":
            assert self.pixel_mean is not None
            return Normalize("pixel", self.pixel_mean, torch.ones_like(self.pixel_mean))
        if self.normalize == "none":
            return Normalize.identity(self.channels)
        shape = (self.channels, 1, 1)
        return Normalize(
            "channel", torch.tensor(self.mean).view(shape), torch.tensor(self.std).view(shape)
        )

    def eval_transform(self) -> ClassificationPresetEval:
        return ClassificationPresetEval(self)

    def resized(self, side: int) -> InputConfig:
        """This input at ``side`` x ``side``, its resize scaled alike (256/224 stays 256/224);
        a per-pixel mean is defined at one size only, so that is refused."""
        if (side, side) == tuple(self.size):
            return self
        if self.normalize == "pixel":
            h, w = self.size
            raise ValueError(
                f"this network normalises each pixel of {h}x{w} (HxW) images, so it takes no "
                f"other size (asked for {side})"
            )
        resize = None if self.resize is None else round(self.resize * side / min(self.size))
        return replace(self, size=(side, side), resize=resize)

    def read_image(self, path: str | Path, *, limits: Limits | None = None) -> Tensor:
        """An image file as this input, uint8 (C, H, W): read and decoded as the data path
        decodes a training image (:func:`reslab.data.images.decode`: orientation, channels,
        reduced-size JPEG decoding), then the evaluation transform; so a prediction sees
        exactly the pixels evaluation saw. Errors name the file."""
        from reslab.data.images import DEFAULT_LIMITS, decode, read_bounded

        limits = limits or DEFAULT_LIMITS
        transform = self.eval_transform()
        if Path(path).is_dir():
            raise ValueError(f"{path} is a directory, not an image file")
        if not Path(path).exists():
            raise FileNotFoundError(f"image not found: {path}")
        data = read_bounded(path, limits.max_file_bytes)
        image = decode(
            data, str(path), channels=self.channels, min_side=transform.min_side, limits=limits
        )
        return transform(image)


class PCALighting:
    """AlexNet-style colour augmentation (Krizhevsky et al. 2012, §4.1): add to every pixel
    ``eigvec @ (alpha * eigval)``, alpha ~ N(0, ``std``) per image, in [0, 1] units. He et al.
    2015, §3.4 use it for ImageNet. torchvision and timm have no such transform, hence this one;
    it draws from torch's global RNG like the v2 transforms, so a seeded sample repeats exactly.
    """

    def __init__(
        self,
        std: float = 0.1,
        eigval: tuple[float, ...] = IMAGENET_EIGVAL,
        eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC,
    ) -> None:
        self.std = std
        self.eigval, self.eigvec = torch.tensor(eigval), torch.tensor(eigvec)

    def __repr__(self) -> str:
        return f"PCALighting(std={self.std})"

    def __call__(self, image: Tensor) -> Tensor:
        if self.std == 0 or image.shape[-3] != 3:
            return image
        alpha = torch.randn(3) * self.std
        rgb = self.eigvec @ (alpha * self.eigval)  # (3,), [0, 1] units
        out = image.float() + (rgb * 255.0).view(3, 1, 1).to(image.device)
        return out.round_().clamp_(0, 255).to(image.dtype)


class RandomResizedCropFlip:
    """torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` (the same algorithm: up to
    10 draws of area share in ``scale`` and log-uniform aspect in ``ratio``, else the centre crop
    clamped to ``ratio``; then a mirror with probability ``hflip``), 3x faster on decoded uint8
    images, which matters because it is the largest cost after decoding.

    Why not v2's own: ``v2.functional.resized_crop`` first makes the image contiguous (C, H, W),
    while torchvision's decoders return a channels-last view, on which PyTorch's antialiased
    bilinear resize has a vectorised uint8 kernel (0.7 ms instead of 1.7 ms for a 400x350
    photo); and its parameter draws are eight small torch calls (0.4 ms), here one torch draw
    seeds a Python RNG. Other interpolations resize through v2.
    """

    def __init__(
        self,
        size: list[int],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        hflip: float = 0.5,
    ) -> None:
        self.size, self.scale, self.ratio, self.hflip = list(size), scale, ratio, hflip
        self.interpolation = interpolation
        self._log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(size={self.size}, scale={self.scale}, hflip={self.hflip})"

    def params(
        self, height: int, width: int, rng: random.Random
    ) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip), as torchvision's ``RandomResizedCrop.get_params``."""
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self._log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                return top, left, h, w, rng.random() < self.hflip
        in_ratio = width / height  # fallback: the whole image, clamped to the ratio range
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w, rng.random() < self.hflip

    def __call__(self, image: Tensor) -> Tensor:
        # one draw from torch's RNG, so the seeded worker state decides everything
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))
        top, left, h, w, flip = self.params(image.shape[-2], image.shape[-1], rng)
        return resized_crop_uint8(image, (top, left, h, w), self.size, self.interpolation, flip)


def resized_crop_uint8(
    image: Tensor, box: tuple[int, int, int, int], size: list[int], interpolation: str, flip: bool
) -> Tensor:
    """The ``box`` (top, left, h, w) of ``image`` resized to ``size`` (antialiased), mirrored if
    ``flip``: equal to ``v2.functional.resized_crop`` (+ ``horizontal_flip``)."""
    top, left, h, w = box
    crop = image[..., top : top + h, left : left + w]
    if interpolation == "bilinear" and image.dtype == torch.uint8 and image.ndim == 3:
        out = torch.nn.functional.interpolate(
            crop[None], size=size, mode="bilinear", antialias=True, align_corners=False
        )[0]
    else:
        from torchvision.transforms.v2 import functional as F

        out = F.resize(crop, size, interpolation=_interp(interpolation), antialias=True)
    return out.flip(-1) if flip else out


class ClassificationPresetEval:
    """Resize the shorter side + centre crop (or straight resize), on uint8 (C, H, W)."""

    def __init__(self, cfg: InputConfig) -> None:
        from torchvision.transforms import v2

        self.cfg = cfg
        interp = _interp(cfg.interpolation)
        steps: list[Callable[[Tensor], Tensor]]
        if cfg.resize is None:
            steps = [v2.Resize(list(cfg.size), interpolation=interp, antialias=True)]
        else:
            steps = [v2.Resize(cfg.resize, interpolation=interp, antialias=True)]
            if cfg.crop == "center":
                steps.append(v2.CenterCrop(list(cfg.size)))
        self.transform = v2.Compose(steps)

    @property
    def min_side(self) -> int:
        """The shortest image side this transform needs (for reduced-size JPEG decoding)."""
        return self.cfg.resize or max(self.cfg.size)

    def __call__(self, image: Tensor) -> Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"ClassificationPresetEval({self.transform})"


class ClassificationPresetTrain:
    """Training augmentation of one recipe, on uint8 (C, H, W); the output is ``cfg.size``.

    - "photo": RandomResizedCrop (area ``scale``, aspect ``ratio``) + horizontal flip, the modern
      default for photo data and fine-tuning (Szegedy et al. 2015; torchvision's references).
    - "cifar": the image brought to ``cfg.size`` by the evaluation transform, then ``padding``
      zero pixels on each side, a random crop of ``cfg.size`` and a flip (He et al. 2015, §4.2).
    - "imagenet": shorter side random in ``scale_range`` ([256, 480]), a random ``cfg.size``
      crop, flip, PCA colour noise with std ``pca_std`` (He et al. 2015, §3.4); the per-pixel
      mean is subtracted on the device (``InputConfig(normalize="pixel")``).
    """

    def __init__(
        self,
        cfg: InputConfig,
        recipe: str = "photo",
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        padding: int = 4,
        scale_range: tuple[int, int] = (256, 480),
        pca_std: float = 0.1,
    ) -> None:
        from torchvision.transforms import v2

        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; valid choices: {', '.join(RECIPES)}")
        self.cfg, self.recipe = cfg, recipe
        interp = _interp(cfg.interpolation)
        size = list(cfg.size)
        steps: list[Callable[[Tensor], Tensor]]
        if recipe == "photo":
            steps = [
                RandomResizedCropFlip(
                    size, scale=scale, ratio=ratio, interpolation=cfg.interpolation, hflip=hflip
                )
            ]
            hflip = 0  # the flip is part of RandomResizedCropFlip
            # the smallest crop (area scale[0]) keeps full resolution from this shorter side on
            self._min_side = math.ceil(max(size) / math.sqrt(scale[0]))
        elif recipe == "cifar":
            steps = [ClassificationPresetEval(cfg), v2.RandomCrop(size, padding=padding, fill=0)]
            self._min_side = cfg.resize or max(size)
        else:
            lo, hi = scale_range
            if lo < max(size):
                raise ValueError(f"scale_range {scale_range} must start at >= the crop {size}")
            steps = [
                v2.RandomShortestSize(
                    list(range(lo, hi + 1)), interpolation=interp, antialias=True
                ),
                v2.RandomCrop(size),
            ]
            self._min_side = hi
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if recipe == "imagenet" and pca_std > 0:
            steps.append(PCALighting(pca_std))
        self.transform = v2.Compose(steps)

    @property
    def min_side(self) -> int:
        """The shortest image side this transform needs (for reduced-size JPEG decoding)."""
        return self._min_side

    def __call__(self, image: Tensor) -> Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"ClassificationPresetTrain({self.recipe!r}, {self.transform})"

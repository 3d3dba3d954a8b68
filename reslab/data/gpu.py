"""GPU decoding: DataLoader workers only read bytes and draw the crop; nvJPEG decodes the batch on
the device (``torchvision.io.decode_jpeg(list, device="cuda")``) and the crop, resize and flip run
there too. It frees the CPU workers where they are the limit (a many-core GPU node decodes ~1-3k
photos/s per core; an H200 trains ResNet-50 faster).

UNMEASURED: no GPU was available while this was written. The CPU half (crop boxes, flips, the
crop-resize-flip arithmetic) is tested by running the same code with the CPU decoder; whether it
beats CPU workers on a given machine is for benchmarks/data_throughput.py to show there.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reslab.data.images import BadImageError, decode
from reslab.data.presets import RandomResizedCropFlip
from reslab.data.stream import ImageDataset, StreamingBatches, sample_seed

__all__ = ["EncodedDataset", "GpuDecodeBatches", "crop_resize_flip", "gpu_decode_available"]


def gpu_decode_available() -> bool:
    """Whether batched nvJPEG decoding can run here."""
    return torch.cuda.is_available()


class EncodedDataset(ImageDataset):
    """Item ``(epoch, i)``: ``(encoded bytes (uint8 1-D), label, box (top, left, h, w), flip)``.

    The box and flip are :class:`RandomResizedCropFlip`'s, drawn from the image size the index
    holds (no decode needed) with the same per-sample seed as the CPU path.
    """

    def __init__(
        self,
        *args: Any,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        index = args[0]
        s = kwargs.get("split", args[1] if len(args) > 1 else "train")
        s = index.split(s) if isinstance(s, str) else s
        self.widths, self.heights = s.widths.copy(), s.heights.copy()
        self._crop = RandomResizedCropFlip([1, 1], scale=scale, ratio=ratio, hflip=hflip)

    def params(self, epoch: int, i: int) -> tuple[tuple[int, int, int, int], bool]:
        h, w = int(self.heights[i]), int(self.widths[i])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
            rng = random.Random(int(torch.randint(0, 2**62, (1,))))  # as RandomResizedCropFlip
        top, left, bh, bw, flip = self._crop.params(h, w, rng)
        return (top, left, bh, bw), flip

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        try:
            data, _ = self.read(i)
        except BadImageError as exc:
            if not self.skip_bad:
                raise
            return None, int(self.labels[i]), exc.where, exc.reason
        box, flip = self.params(epoch, i)
        where = self.store.where(self.names[i])
        return (
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            int(self.labels[i]),
            box,
            flip,
            where,
        )


def collate_encoded(samples: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    good = [s for s in samples if s[0] is not None and len(s) == 5]
    skipped = [(s[2], s[3]) for s in samples if s[0] is None]
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    boxes = torch.tensor([s[2] for s in good], dtype=torch.int64).reshape(-1, 4)
    flips = torch.tensor([s[3] for s in good], dtype=torch.bool)
    return [s[0] for s in good], labels, boxes, flips, [s[4] for s in good], skipped


def crop_resize_flip(
    images: list[Tensor], boxes: Tensor, flips: Tensor, size: tuple[int, int]
) -> Tensor:
    """uint8 (N, C, *size): each image's box, resized (bilinear, antialiased, as torchvision's
    ``resized_crop``), mirrored where ``flips``; on the images' device."""
    out = []
    for im, (top, left, h, w), f in zip(images, boxes.tolist(), flips.tolist(), strict=True):
        crop = im[:, top : top + h, left : left + w][None].float()
        r = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(r.flip(-1) if f else r)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


class GpuDecodeBatches(StreamingBatches):
    """:class:`StreamingBatches` whose decode and augmentation run on ``device`` (nvJPEG for
    JPEGs; other formats, and any image nvJPEG refuses, decode on the CPU of the main process)."""

    def __init__(self, dataset: EncodedDataset, *, size: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=collate_encoded, **kwargs)
        self.size = size
        self.decode_device = self.device or torch.device("cpu")

    def _decode(self, datas: list[Tensor], wheres: list[str]) -> list[Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = [i for i, d in enumerate(datas) if len(d) > 2 and d[0] == 0xFF and d[1] == 0xD8]
        out: list[Tensor | None] = [None] * len(datas)
        if jpeg:
            try:
                decoded = decode_jpeg(
                    [datas[i] for i in jpeg],
                    mode=ImageReadMode.RGB,
                    device=self.decode_device,
                    apply_exif_orientation=True,
                )
                for i, x in zip(jpeg, decoded, strict=True):
                    out[i] = x
            except RuntimeError:
                pass  # one bad image fails the batch call: decode each on the CPU, which names it
        for i, x in enumerate(out):
            if x is None:
                out[i] = decode(datas[i].numpy().tobytes(), wheres[i]).to(self.decode_device)
        return [x for x in out if x is not None]

    def _finish(self, batch: Any) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
        datas, labels, boxes, flips, wheres, skipped = batch
        if not datas:
            return torch.zeros(0, 3, *self.size, dtype=torch.uint8), labels, skipped
        images = self._decode(datas, wheres)
        for im, (top, left, h, w), where in zip(images, boxes.tolist(), wheres, strict=True):
            if top + h > im.shape[-2] or left + w > im.shape[-1]:  # index and decoder disagree
                raise BadImageError(where, f"decoded as {tuple(im.shape[-2:])}, indexed smaller")
        return crop_resize_flip(images, boxes, flips, self.size), labels, skipped

"""One image file in, one uint8 (C, H, W) tensor out: bounded, checked, oriented, converted.

The header is read first (:func:`probe`): the declared size is checked against :class:`Limits`
before a single pixel is decoded, so a 9000x9000 PNG costs a few hundred bytes of reading, not
243 MB of memory. Decoding uses torchvision's own decoders (libjpeg-turbo, libpng, libwebp, giflib)
and falls back to Pillow only for the formats they lack (BMP, TIFF, PPM) and for reduced-size
JPEG decoding (see :func:`decode`), and for PNG (see ``_TORCHVISION_FORMATS``).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_SUFFIXES",
    "BadImageError",
    "ImageHeader",
    "Limits",
    "decode",
    "probe",
    "read_bounded",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which is not a dependency here
# and which torchvision 0.26 (the oldest supported) predates: its warning, once per call, says
# nothing a user can act on
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated"
)
# formats decoded by torchvision.io.decode_image; the rest go through Pillow. Not PNG: torchvision's
# PNG decoder (0.29) ends the whole process with a segmentation fault on damaged compressed data
# (libpng's error longjmp), which no except clause can catch and which would kill a DataLoader
# worker anonymously; Pillow raises an error instead (tests/test_data_sources.py damages one)
_TORCHVISION_FORMATS = {"JPEG", "MPO", "GIF", "WEBP"}


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file and says why."""

    def __init__(self, where: str, reason: str | None = None) -> None:
        # one argument: a whole message (how a DataLoader re-raises a worker's exception)
        super().__init__(where if reason is None else f"cannot use image {where}: {reason}")
        self.where = where
        self.reason = reason or ""

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survives a DataLoader worker's pickle
        return (type(self), (self.where, self.reason))


@dataclass(frozen=True)
class Limits:
    """What one image may cost before it is decoded.

    ``max_pixels`` 2**26 = 67 MP (8192x8192, 192 MiB as RGB uint8) admits any camera photo up
    to ~60 MP and refuses decompression bombs; Pillow's own guard warns only from 89 MP, which a
    9000x9000 image passes. ``max_file_bytes`` bounds what is read from disk for one image.
    """

    max_pixels: int = 2**26
    max_file_bytes: int = 2**28  # 256 MiB

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_file_bytes <= 0:
            raise ValueError(f"image limits must be positive, got {self}")


DEFAULT_LIMITS = Limits()
DRAFT_FROM = 4  # reduced-size JPEG decoding from this ratio of shorter side to need (decode())


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: format, Pillow mode, and the size after EXIF orientation."""

    format: str
    mode: str
    width: int
    height: int


def read_bounded(path: str | Path, limit: int, where: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (a FIFO or device would block or
    never end; an oversized file is refused before it is read)."""
    where = where or str(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadImageError(where, exc.strerror or str(exc)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError(where, "not a regular file")
    if st.st_size > limit:
        raise BadImageError(where, f"file is {st.st_size:,} bytes, over the limit {limit:,}")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since the stat
        raise BadImageError(where, f"file is over the limit {limit:,} bytes")
    return data


def _tail_ok(fmt: str, data: bytes) -> str | None:
    """Why the file is cut short, or None. Truncation (an interrupted copy or download) is the
    common damage and shows at the end of the file, which costs nothing to look at; damage inside
    the compressed data shows only when decoding (an error naming the file, then)."""
    tail = data[-64:].rstrip(b"\0\r\n ")
    if fmt in ("JPEG", "MPO") and not tail.endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    if fmt == "GIF" and not tail.endswith(b";"):
        return "truncated GIF (no trailer)"
    if fmt == "WEBP" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        return "truncated WebP (shorter than its RIFF size)"
    if fmt == "BMP" and len(data) < int.from_bytes(data[2:6], "little"):
        return "truncated BMP (shorter than its declared size)"
    return None


def probe(
    data: bytes, where: str, limits: Limits = DEFAULT_LIMITS, *, orientation: bool = True
) -> ImageHeader:
    """Read the header only: the format, the declared size (checked against ``limits``) and
    whether the file is complete. Raises :class:`BadImageError` naming ``where``. The size is
    the displayed one (EXIF rotation applied) unless ``orientation=False``, which skips parsing
    the EXIF block (the decoders still apply it; the decoder's own check needs no more)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_file_bytes:
        raise BadImageError(where, f"{len(data):,} bytes, over the limit {limits.max_file_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, (w, h) = str(im.format), im.mode, im.size
                turn = orientation and fmt in ("JPEG", "MPO", "WEBP")
                rotation = im.getexif().get(0x0112, 1) if turn else 1
    except UnidentifiedImageError:
        raise BadImageError(where, "not an image Pillow or torchvision can read") from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, above 2 x 89 MP
        raise BadImageError(where, str(exc)) from None
    except Exception as exc:
        raise BadImageError(where, f"unreadable header: {exc}") from exc
    if w * h > limits.max_pixels:
        raise BadImageError(
            where,
            f"declared size {w}x{h} = {w * h / 1e6:.1f} MP is over the limit of "
            f"{limits.max_pixels / 1e6:.1f} MP (max_pixels={limits.max_pixels})",
        )
    if w <= 0 or h <= 0:
        raise BadImageError(where, f"empty image ({w}x{h})")
    reason = _tail_ok(fmt, data)
    if reason:
        raise BadImageError(where, reason)
    if rotation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap width and height
        w, h = h, w
    return ImageHeader(fmt, mode, w, h)


def _to_uint8(t: Tensor) -> Tensor:
    if t.dtype == torch.uint8:
        return t
    # 16-bit PNG: the exact rounding of v * 255 / 65535 (Pillow's "RGB" conversion clips instead)
    return ((t.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def _to_channels(t: Tensor, channels: int) -> Tensor:
    """torchvision's GIF decoder ignores the requested mode: convert as Pillow would."""
    if t.shape[0] == channels:
        return t
    if t.shape[0] in (2, 4):  # grey + alpha, RGBA: drop alpha
        t = t[:-1]
    if channels == 3 and t.shape[0] == 1:
        return t.expand(3, -1, -1).contiguous()
    if channels == 1 and t.shape[0] == 3:
        from torchvision.transforms.v2 import functional as F

        return F.rgb_to_grayscale(t)
    return t


def _decode_pil(data: bytes, channels: int, draft_side: int | None) -> Tensor:
    """Pillow: BMP/TIFF/PPM, and JPEGs decoded at 1/2, 1/4 or 1/8 scale by ``draft``."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            if draft_side is not None and im.format == "JPEG":
                # libjpeg's DCT scaling keeps the smallest scale with both sides >= the request,
                # so the shorter side stays >= draft_side
                s = draft_side / min(im.size)
                im.draft(
                    "RGB" if channels == 3 else "L", (round(im.width * s), round(im.height * s))
                )
            im.seek(0)  # the first frame of an animation
            img: Image.Image = ImageOps.exif_transpose(im)
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                a = np.asarray(img, dtype=np.float64)
                scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 1.0
                img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))
            a = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    a = np.array(a, copy=True)  # writable, owned
    return torch.from_numpy(a).permute(2, 0, 1) if a.ndim == 3 else torch.from_numpy(a)[None]


def decode(
    data: bytes,
    where: str,
    *,
    channels: int = 3,
    header: ImageHeader | None = None,
    min_side: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Tensor:
    """Decode to uint8 (``channels``, H, W): grey, RGBA, CMYK, palette and 16-bit images are
    converted to ``channels`` (1 or 3; alpha is dropped as Pillow's ``convert`` does), EXIF
    orientation is applied, an animation gives its first frame.

    ``min_side``: the shortest side the caller needs. A JPEG whose shorter side is at least four
    times that is decoded at 1/4 or 1/8 scale by libjpeg's DCT scaling (Pillow's ``draft``),
    which skips most of the inverse DCT. benchmarks/data_throughput.py, two runs, to a 256-px
    shorter side: 1.5x and 1.8x faster than torchvision's full decode + resize at 1600x1200 (1/4),
    3.0x and 3.7x at 4000x3000 (1/8); at 1/2 scale (800x600) the two were even (1.07x, 0.91x),
    so no scaling is used there and torchvision's decoder (2x Pillow's at 400x350) decodes.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    # the size check before decoding; the shorter side (for draft) is the same either way round
    header = header or probe(data, where, limits, orientation=False)
    try:
        if (
            min_side is not None
            and header.format == "JPEG"
            and min(header.width, header.height) >= DRAFT_FROM * min_side
        ):
            return _decode_pil(data, channels, min_side)
        if header.format in _TORCHVISION_FORMATS:
            from torchvision.io import ImageReadMode, decode_image

            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            t = decode_image(buf, mode=mode, apply_exif_orientation=True)
            if t.ndim == 4:  # an animated GIF: (frames, C, H, W)
                t = t[0]
            return _to_channels(_to_uint8(t), channels)
        return _decode_pil(data, channels, None)
    except BadImageError:
        raise
    except Exception as exc:
        # torchvision's messages start with a C++ source location: keep only the reason
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BadImageError(where, f"cannot decode: {msg}") from exc

"""Generated image files in every format and mode reslab reads (shared by the data tests)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random image: JPEG keeps it close, so lossy formats can be compared too."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def mixed_images(seed: int = 0) -> dict[str, bytes]:
    """{file name: bytes} of one image per mode/format, of different sizes and aspects."""
    a = rgb(40, 56, seed)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    gif = Image.fromarray(a).convert("P")
    gif2 = Image.fromarray(255 - a).convert("P")
    sixteen = (rgb(30, 20, seed + 1)[..., 0].astype(np.uint16) * 257) + 3
    return {
        "grey.png": encode(Image.fromarray(rgb(33, 47, seed + 2)[..., 0]), "PNG"),
        "rgba.png": encode(Image.fromarray(np.dstack([a, a[..., :1]]), "RGBA"), "PNG"),
        "cmyk.jpg": encode(Image.fromarray(rgb(48, 36, seed + 3)).convert("CMYK"), "JPEG"),
        "palette.png": encode(Image.fromarray(rgb(25, 61, seed + 4)).convert("P"), "PNG"),
        "sixteen.png": encode(Image.fromarray(sixteen), "PNG"),
        "exif.jpg": encode(Image.fromarray(rgb(20, 44, seed + 5)), "JPEG", exif=exif),
        "anim.gif": encode(gif, "GIF", save_all=True, append_images=[gif2]),
        "photo.webp": encode(Image.fromarray(rgb(64, 48, seed + 6)), "WEBP", lossless=True),
        "photo.bmp": encode(Image.fromarray(rgb(28, 28, seed + 7)), "BMP"),
        "photo.jpg": encode(Image.fromarray(rgb(90, 120, seed + 8)), "JPEG", quality=95),
    }


def reference(data: bytes) -> np.ndarray:
    """What the image should decode to as (H, W, 3) uint8: Pillow, EXIF applied, first frame,
    16-bit scaled exactly."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16"):
            v = np.asarray(im, dtype=np.int64)
            g = ((v * 255 + 32767) // 65535).astype(np.uint8)
            return np.dstack([g, g, g])
        return np.asarray(im.convert("RGB"))


def write_tree(root: Path, tree: dict[str, dict[str, dict[str, bytes]]]) -> None:
    """root/<split>/<class>/<name> from {split: {class: {name: bytes}}}."""
    for split, classes in tree.items():
        for cls, files in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (root / split / cls / name).write_bytes(data)


def png_bomb(side: int) -> bytes:
    """A valid grey PNG of side x side zeros: ~side**2 bytes decoded from a few hundred KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

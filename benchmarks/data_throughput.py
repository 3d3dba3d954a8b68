"""Images/s of photo decoding + RandomResizedCrop 224 + flip: reslab's streaming loader against the
conventional torchvision ImageFolder + PIL transforms DataLoader and bare libjpeg-turbo decoding
of the same files (the limit), in one run, same folder, same worker count; and the streaming
loader's peak memory (RSS) over 10k and 50k images.

The photos are CIFAR-10 JPEGs upscaled to 400x350 and re-encoded (quality 90) into a temporary
folder, never kept; the 50k set repeats the 10k files under other names (hard links), which is what
the memory measurement needs (an index 5x larger, the same decoding work per batch).

    python benchmarks/data_throughput.py [--images 10000] [--workers 2] [--measure 3000]

Prints the numbers and writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from _common import write_result
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.zip"
SIZE = (400, 350)  # (W, H) of the generated photos


def make_photos(dest: Path, n: int) -> None:
    """dest/train/<class>/<i>.jpg: the first n CIFAR-10 training JPEGs upscaled to SIZE."""
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        names = sorted(m for m in zf.namelist() if "/train/" in m and m.endswith(".jpg"))
        step = max(1, len(names) // n)
        for k, name in enumerate(names[::step][:n]):
            cls = name.split("/")[-2]
            (dest / "train" / cls).mkdir(parents=True, exist_ok=True)
            im = Image.open(io.BytesIO(zf.read(name))).convert("RGB").resize(SIZE, Image.BICUBIC)
            im.save(dest / "train" / cls / f"{k:06d}.jpg", quality=90)


def link_copies(src: Path, dest: Path, copies: int) -> None:
    """dest holds every file of src `copies` times under different names (hard links)."""
    for f in src.rglob("*.jpg"):
        rel = f.relative_to(src)
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            os.link(f, dest / rel.parent / f"{c}_{rel.name}")


def rate(loader, measure: int, warmup: int) -> float:  # type: ignore[no-untyped-def]
    """Images/s over `measure` images after `warmup` images (workers started, caches warm)."""
    seen, t0 = 0, None
    for batch in loader:
        n = len(batch[0]) if isinstance(batch[0], torch.Tensor) else len(batch[1])
        seen += n
        if t0 is None and seen >= warmup:
            t0, seen = time.perf_counter(), 0
        elif t0 is not None and seen >= measure:
            break
    assert t0 is not None, "not enough images for the warm-up"
    return seen / (time.perf_counter() - t0)


def reslab_loader(root: Path, workers: int, batch: int, cache: Path):  # type: ignore[no-untyped-def]
    from reslab.data import ClassificationPresetTrain, InputConfig, index_source
    from reslab.data.stream import ImageDataset, StreamingBatches

    idx = index_source(root, cache_dir=cache, progress=False)
    t = ClassificationPresetTrain(InputConfig(), "photo")
    return StreamingBatches(ImageDataset(idx, "train", t), batch_size=batch, num_workers=workers)


def conventional_loader(root: Path, workers: int, batch: int):  # type: ignore[no-untyped-def]
    from torchvision import datasets, transforms

    t = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),  # uint8, as reslab's batches: no float conversion counted
        ]
    )
    ds = datasets.ImageFolder(str(root / "train"), transform=t)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True
    )


class _BareDecode(torch.utils.data.Dataset):
    """Read + libjpeg-turbo decode (torchvision.io.decode_jpeg), nothing else."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> int:
        from torchvision.io import decode_jpeg

        data = torch.frombuffer(bytearray(self.files[i].read_bytes()), dtype=torch.uint8)
        return int(decode_jpeg(data).shape[-1])


def bare_loader(root: Path, workers: int, batch: int):  # type: ignore[no-untyped-def]
    files = sorted(root.rglob("*.jpg"))
    return torch.utils.data.DataLoader(
        _BareDecode(files),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        collate_fn=lambda xs: (torch.tensor(xs),),
    )


def _ms(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    """Milliseconds per call, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def draft_vs_full(tmp: Path) -> dict:
    """Large photos to a 256-px shorter side: reduced-size JPEG decode (DCT scaling) vs
    torchvision's full decode + resize, single thread, ms per image."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from reslab.data.images import decode

    torch.set_num_threads(1)
    out = {}
    rng = np.random.default_rng(0)
    for w, h in ((800, 600), (1600, 1200), (4000, 3000)):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        reps = max(5, int(2e8 // (w * h)))

        full = _ms(lambda t=t: F.resize(decode_jpeg(t), [256], antialias=True), reps)
        reduced = _ms(
            lambda d=data: F.resize(decode(d, "x", min_side=256), [256], antialias=True), reps
        )
        out[f"{w}x{h}"] = {
            "full_decode_resize_ms": full,
            "reduced_decode_resize_ms": reduced,
            "speedup": full / reduced,
        }
    return out


def rss_child(root: str, workers: int, batches: int, cache: str) -> None:
    """Run in a subprocess: stream `batches` batches, print peak RSS (self, workers) in MiB."""
    loader = reslab_loader(Path(root), workers, 64, Path(cache))
    for k, _ in enumerate(loader):
        if k + 1 >= batches:
            break
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del loader  # workers exit: their peak is then in RUSAGE_CHILDREN
    import gc

    gc.collect()
    time.sleep(1)
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"self_mib": self_mb, "worker_peak_mib": child_mb}))


def _uptime() -> str:
    """`uptime`'s line: the load average the numbers were measured under."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10_000, help="photos generated")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, all loaders")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--measure", type=int, default=3000, help="images timed per loader")
    ap.add_argument("--rss-batches", type=int, default=40, help="batches streamed per RSS run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_throughput.json")
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.workers, args.rss_batches, args.rss_child[1])
        return
    if not CIFAR_ZIP.exists():
        raise SystemExit(f"needs a CIFAR-10 JPEG archive at {CIFAR_ZIP}")
    load_before = _uptime()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        photos, big, cache = tmp / "photos", tmp / "photos50k", tmp / "cache"
        t0 = time.perf_counter()
        make_photos(photos, args.images)
        print(f"made {args.images} photos {SIZE[0]}x{SIZE[1]} in {time.perf_counter() - t0:.0f} s")
        warm = 2 * args.batch * max(1, args.workers)
        rates = {}
        for name, make in (
            ("reslab_stream", lambda: reslab_loader(photos, args.workers, args.batch, cache)),
            (
                "torchvision_imagefolder_pil",
                lambda: conventional_loader(photos, args.workers, args.batch),
            ),
            ("bare_decode_jpeg", lambda: bare_loader(photos, args.workers, args.batch)),
        ):
            rates[name] = rate(make(), args.measure, warm)
            print(f"{name}: {rates[name]:.0f} images/s")
        link_copies(photos, big, 5)
        rss = {}
        for n, root in ((args.images, photos), (5 * args.images, big)):
            cmd = [
                sys.executable,
                __file__,
                "--workers",
                str(args.workers),
                "--rss-batches",
                str(args.rss_batches),
                "--rss-child",
                str(root),
                str(cache),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rss[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"peak RSS streaming from {n} images: {rss[str(n)]}")
        drafts = draft_vs_full(tmp)
        for k, v in drafts.items():
            print(f"{k} to 256 px: reduced-size decode {v['speedup']:.2f}x faster")
    small, large = rss[str(args.images)], rss[str(5 * args.images)]
    result = {
        "command": "python benchmarks/data_throughput.py " + " ".join(sys.argv[1:]),
        "photos": {"count": args.images, "size_wh": SIZE, "quality": 90},
        "workers": args.workers,
        "batch": args.batch,
        "images_per_s": rates,
        "reslab_over_conventional": rates["reslab_stream"] / rates["torchvision_imagefolder_pil"],
        "reslab_over_bare_decode": rates["reslab_stream"] / rates["bare_decode_jpeg"],
        "peak_rss_mib": rss,
        "rss_ratio_50k_over_10k": {k: large[k] / small[k] for k in ("self_mib", "worker_peak_mib")},
        "reduced_size_decode": drafts,
        "targets": {"over_conventional": 1.5, "over_bare_decode": 0.7, "rss_flat": 0.1},
        "uptime_before": load_before,
        "uptime_after": _uptime(),
        "note": "the machine's load (uptime, before and after) says how shared it was",
    }
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "reslab_over_conventional",
                    "reslab_over_bare_decode",
                    "rss_ratio_50k_over_10k",
                )
            },
            indent=1,
        )
    )
    write_result(args.out, result, device="cpu")


if __name__ == "__main__":
    main()

"""Data layer: readers, cache, splits, on-device augmentation and normalisation."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reslab.data as data_mod
from reslab.data import Normalize, load_data, random_crop_flip

CIFAR_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.zip"
CLASSES10 = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# -- fixtures: tiny data sets in the real formats --
def _cifar_batch(n: int, rng: np.random.Generator) -> dict:
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"batch_label": b"tiny",
    }


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """CIFAR-10 python format: 5 train batches of 8 images, a test batch of 6, and the meta file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, n in [*((f"data_batch_{i}", 8) for i in range(1, 6)), ("test_batch", 6)]:
        (root / name).write_bytes(pickle.dumps(_cifar_batch(n, rng)))
    meta = {b"label_names": [c.encode() for c in CLASSES10]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder_zip(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """top/{train,test}/{cat,dog}/*.png in a zip; PNG is lossless, so pixels can be compared."""
    rng = np.random.default_rng(1)
    pixels = {}
    path = tmp_path / "pets.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 6), ("test", 2)):
            for cls in ("dog", "cat"):
                for i in range(n):
                    a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                    name = f"top/{split}/{cls}/{i:03d}.png"
                    zf.writestr(name, _png(a))
                    pixels[name] = a
    return path, pixels


# -- readers --
def test_digits_fixed_test_split_and_seeded_val() -> None:
    a, b = load_data("digits", seed=0), load_data("digits", seed=1)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.val) == (len(a.train) + len(a.val)) // 10  # the 45k/5k proportion
    assert torch.equal(a.test.images, b.test.images)  # the test split never moves
    assert not torch.equal(a.val.labels, b.val.labels) or not torch.equal(
        a.val.images, b.val.images
    )
    assert a.num_classes == 10 and a.in_channels == 1 and a.image_size == 8
    assert int(a.train.images.max()) == 255


def test_cifar_python_folder_and_tar_gz(cifar_dir: Path, tmp_path: Path) -> None:
    tar = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(cifar_dir, arcname="cifar-10-batches-py")
    d = load_data(str(cifar_dir), cache_dir=tmp_path / "cache", val_size=0)
    t = load_data(str(tar), cache_dir=tmp_path / "cache", val_size=0)
    assert d.classes == CLASSES10 and t.classes == CLASSES10
    assert len(d.train) == 40 and len(d.test) == 6
    assert torch.equal(d.train.images, t.train.images) and torch.equal(d.test.labels, t.test.labels)
    # the row layout is 1024 red, then green, then blue values, row-major
    first = pickle.loads((cifar_dir / "data_batch_1").read_bytes())[b"data"][0]
    assert torch.equal(d.train.images[0], torch.from_numpy(first.reshape(3, 32, 32)))
    assert d.train.images.shape == (40, 3, 32, 32)


def test_image_folder_zip_and_dir(folder_zip, tmp_path: Path) -> None:
    path, pixels = folder_zip
    s = load_data(str(path), cache_dir=tmp_path / "cache", val_size=0)
    assert s.classes == ["cat", "dog"]  # sorted folder names
    assert len(s.train) == 12 and len(s.test) == 4
    expected = torch.from_numpy(pixels["top/train/cat/000.png"]).permute(2, 0, 1)
    assert torch.equal(s.train.images[0], expected) and int(s.train.labels[0]) == 0
    expected = torch.from_numpy(pixels["top/test/dog/001.png"]).permute(2, 0, 1)
    assert torch.equal(s.test.images[-1], expected) and int(s.test.labels[-1]) == 1
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(path) as zf:
        zf.extractall(folder)
    f = load_data(str(folder), cache_dir=tmp_path / "cache", val_size=0)
    assert torch.equal(f.train.images, s.train.images) and f.classes == s.classes


def test_classes_and_train_fraction(folder_zip, tmp_path: Path) -> None:
    path, _ = folder_zip
    s = load_data(str(path), cache_dir=tmp_path, classes=["dog"], val_size=0, train_fraction=0.5)
    assert s.classes == ["dog"] and set(s.train.labels.tolist()) == {0}
    assert len(s.train) == 3 and len(s.test) == 2
    with pytest.raises(ValueError, match="unknown classes"):
        load_data(str(path), cache_dir=tmp_path, classes=["cow"])


def test_cache_hit_and_invalidation(folder_zip, tmp_path: Path, monkeypatch) -> None:
    path, _ = folder_zip
    cache = tmp_path / "cache"
    first = load_data(str(path), cache_dir=cache)
    assert len(list(cache.glob("pets.zip.*.pt"))) == 1

    def fail(p: Path, **options: object) -> None:
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(data_mod, "read_image_folder", fail)
    again = load_data(str(path), cache_dir=cache)  # a hit: the reader is not called
    assert torch.equal(first.train.images, again.train.images)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the source changed: a miss
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(str(path), cache_dir=cache)


@pytest.mark.skipif(
    not CIFAR_ZIP.exists(), reason=f"real CIFAR-10 JPEG archive absent: {CIFAR_ZIP}"
)
def test_real_cifar10_reloads_from_the_cache(monkeypatch) -> None:
    """The second load is a cache hit (the decoder is never called). How long the reload takes is
    measured by benchmarks/data_cache.py, not asserted here: tests carry no timings."""
    load_data(str(CIFAR_ZIP))  # decodes once (~15 s) if the cache is cold

    def fail(p: Path, **options: object) -> None:
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(data_mod, "read_image_folder", fail)
    s = load_data(str(CIFAR_ZIP))
    assert (len(s.train), len(s.val), len(s.test)) == (45_000, 5_000, 10_000)  # He et al. §4.2
    assert s.classes == CLASSES10 and s.train.images.shape[1:] == (3, 32, 32)


# -- errors name the file --
def test_missing_and_corrupt_files_are_named(tmp_path: Path, folder_zip) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.zip"):
        load_data(str(tmp_path / "nowhere.zip"))
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"bad\.zip"):
        load_data(str(bad), cache_dir=tmp_path)
    broken = tmp_path / "broken.zip"  # a valid archive holding one corrupt image
    with zipfile.ZipFile(folder_zip[0]) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        dst.writestr("top/train/cat/999.png", b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"broken.zip:top/train/cat/999.png"):
        load_data(str(broken), cache_dir=tmp_path)
    tar = tmp_path / "cifar-10-python.tar.gz"
    tar.write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz"):
        load_data(str(tar), cache_dir=tmp_path)


def test_cifar_batch_that_runs_code_is_refused(cifar_dir: Path, tmp_path: Path) -> None:
    (cifar_dir / "test_batch").write_bytes(pickle.dumps(os.system))
    with pytest.raises(ValueError, match="test_batch"):
        load_data(str(cifar_dir), cache_dir=tmp_path)


def test_cifar_missing_batch_is_named(cifar_dir: Path, tmp_path: Path) -> None:
    (cifar_dir / "data_batch_3").unlink()  # was skipped: 32 train images loaded, no error
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_data(str(cifar_dir), cache_dir=tmp_path)
    for i in (1, 2, 4, 5):  # none at all: was torch.cat's error, naming no file
        (cifar_dir / f"data_batch_{i}").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_data(str(cifar_dir), cache_dir=tmp_path)
    c100 = tmp_path / "cifar-100-python"  # CIFAR-100 needs train, test and meta
    c100.mkdir()
    (c100 / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple"]}))
    (c100 / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(FileNotFoundError, match="'train'"):
        load_data(str(c100), cache_dir=tmp_path)


def test_corrupt_tar_gz_is_refused_and_named(cifar_dir: Path, tmp_path: Path) -> None:
    """tarfile never reads a .tar.gz to its end, so the gzip CRC went unchecked: most damaged
    bytes loaded silently as wrong pixels (and were cached)."""
    good = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        tf.add(cifar_dir, arcname="cifar-10-batches-py")
    blob = good.read_bytes()
    offsets = [64 + k * (len(blob) - 128) // 7 for k in range(8)] + [len(blob) - 3]  # + length
    for k, pos in enumerate(offsets):
        b = bytearray(blob)
        b[pos] ^= 0x55
        bad = tmp_path / f"bad{k}.tar.gz"
        bad.write_bytes(bytes(b))
        with pytest.raises(ValueError, match=rf"bad{k}\.tar\.gz"):
            load_data(str(bad), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("bad*"))  # nothing damaged was cached
    plain = tmp_path / "plain.tar"  # a damaged header ended the listing: "data_batch_3 missing"
    with tarfile.open(plain, "w:") as tf:
        tf.add(cifar_dir, arcname="cifar-10-batches-py")
    with tarfile.open(plain) as tf:
        offset = tf.getmember("cifar-10-batches-py/data_batch_3").offset
    b = bytearray(plain.read_bytes())
    b[offset + 5] ^= 0x55
    plain.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"plain\.tar: unreadable tar header.*data_batch_2"):
        load_data(str(plain), cache_dir=tmp_path / "cache")


def test_corrupt_zip_member_is_named(folder_zip, tmp_path: Path) -> None:
    src, _ = folder_zip
    path = tmp_path / "deflated.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("top/train/cat/001.png")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for j in range(start + 2, start + 12):  # damage the deflate stream: was a bare zlib.error
        data[j] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"deflated\.zip:top/train/cat/001\.png"):
        load_data(str(path), cache_dir=tmp_path)


def _image_tree(root: Path, tree: dict[str, dict[str, list[np.ndarray]]]) -> None:
    """root/<split>/<class>/<i>.png from {split: {class: [H x W x 3 arrays]}}."""
    for split, classes in tree.items():
        for cls, arrays in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i, a in enumerate(arrays):
                (root / split / cls / f"{i}.png").write_bytes(_png(a))


def test_image_folder_one_size_across_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)

    def imgs(side: int) -> list[np.ndarray]:
        return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(2)]

    root = tmp_path / "sizes"
    _image_tree(root, {"train": {"a": imgs(8), "b": imgs(8)}, "test": {"a": imgs(16)}})
    with pytest.raises(ValueError, match=r"test/a/0\.png.*\(16, 16, 3\).*train/a/0\.png"):
        load_data(str(root), cache_dir=tmp_path / "cache")


def test_classes_when_test_lacks_a_train_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)

    def imgs(n: int = 3) -> list[np.ndarray]:
        return [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(n)]

    root = tmp_path / "abc"  # test/ has no 'c' (allowed): the label map was sized by test's max
    _image_tree(root, {"train": {"a": imgs(), "b": imgs(), "c": imgs()}, "test": {"a": imgs()}})
    s = load_data(str(root), cache_dir=tmp_path / "cache", classes=["a", "b", "c"], val_size=0)
    assert s.test.labels.tolist() == [0, 0, 0] and len(s.train) == 9
    s = load_data(str(root), cache_dir=tmp_path / "cache", classes=["c", "a"], val_size=0)
    assert (
        s.test.labels.tolist() == [1, 1, 1] and sorted(s.train.labels.tolist()) == [0] * 3 + [1] * 3
    )


def test_zip_member_names_kept_and_macos_files_skipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    a = {n: rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for n in ("tr", "te")}
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"  # Finder metadata, not a PNG
    path = tmp_path / "finder.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("./train/x/0.png", _png(a["tr"]))  # read back as 'train/x/0.png': KeyError
        zf.writestr("./test/x/0.png", _png(a["te"]))
        zf.writestr("__MACOSX/train/x/._0.png", apple_double)
        zf.writestr("./train/x/._0.png", apple_double)
    s = load_data(str(path), cache_dir=tmp_path / "cache", val_size=0)
    assert len(s.train) == 1 and len(s.test) == 1 and s.classes == ["x"]
    assert torch.equal(s.train.images[0], torch.from_numpy(a["tr"]).permute(2, 0, 1))
    folder = tmp_path / "unzipped"  # the same files extracted: ._ files skipped there too
    with zipfile.ZipFile(path) as zf:
        zf.extractall(folder)
    f = load_data(str(folder), cache_dir=tmp_path / "cache", val_size=0)
    assert torch.equal(f.train.images, s.train.images) and torch.equal(f.test.images, s.test.images)


# -- augmentation --
def _marker_batch(n: int = 64, size: int = 32) -> torch.Tensor:
    """Identical images, each with one bright pixel at (10, 12) so its displacement shows."""
    x = torch.full((n, 3, size, size), 7, dtype=torch.uint8)
    x[:, :, 10, 12] = 255
    return x


def test_crop_moves_content_per_sample_within_padding() -> None:
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(_marker_batch(), padding=4, flip=False, generator=g)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8
    shifts = set()
    for img in out:
        pos = torch.nonzero(img[0] == 255)
        if len(pos):  # the marker may leave the frame only when shifted > 10 px: never here
            shifts.add((int(pos[0, 0]) - 10, int(pos[0, 1]) - 12))
    assert len(shifts) > 20  # per-sample offsets, not one per batch
    assert all(-4 <= dy <= 4 and -4 <= dx <= 4 for dy, dx in shifts)
    # zero padding: whenever content moved, a border row or column of zeros came in
    moved = [img for img in out if not torch.equal(img, _marker_batch(1)[0])]
    assert moved and all((img == 0).any() for img in moved)


def test_flip_mirrors_half_and_keeps_pixels() -> None:
    x = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 60 < int(mirrored.sum()) < 140  # about half, drawn per sample


def test_augmentation_deterministic_under_seed() -> None:
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalize_pixel_and_channel() -> None:
    x = torch.randint(0, 256, (100, 3, 4, 4), dtype=torch.uint8)
    pixel = Normalize.fit(x, "pixel")
    assert pixel.mean.shape == (3, 4, 4)
    assert pixel(x).mean(0).abs().max() < 1e-5  # per-pixel mean subtracted (He et al. §4.2)
    channel = Normalize.fit(x, "channel")
    y = channel(x)
    assert y.mean((0, 2, 3)).abs().max() < 1e-5 and (y.std((0, 2, 3)) - 1).abs().max() < 1e-3
    again = Normalize.from_dict(channel.to_dict())
    assert torch.equal(again(x), y)


def test_cifar_folder_with_two_copies_of_a_batch_is_refused(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """A backup copy in a subfolder replaced the batch silently (files were keyed by name)."""
    backup = cifar_dir / "old"
    backup.mkdir()
    (backup / "data_batch_2").write_bytes((cifar_dir / "data_batch_1").read_bytes())
    with pytest.raises(ValueError, match="two files named data_batch_2"):
        load_data(str(cifar_dir), cache_dir=tmp_path)


def test_images_below_a_class_folder_are_an_error_not_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)

    def imgs(n: int = 2) -> list[np.ndarray]:
        return [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(n)]

    root = tmp_path / "nested"
    _image_tree(root, {"train": {"a": imgs(), "b": imgs()}, "test": {"a": imgs()}})
    (root / "train" / "a" / "more").mkdir()
    (root / "train" / "a" / "more" / "x.png").write_bytes(_png(imgs(1)[0]))
    with pytest.raises(ValueError, match=r"1 image\(s\) sit below a class folder.*train/a/more"):
        load_data(str(root), cache_dir=tmp_path / "cache")
    wrap = tmp_path / "wrap"  # a top folder named like a split is no nesting: test/train/a/0.png
    _image_tree(wrap / "test", {"train": {"a": imgs()}, "test": {"a": imgs()}})
    assert len(load_data(str(wrap), cache_dir=tmp_path / "cache", val_size=0).train) == 2


def test_cifar_labels_out_of_range_are_refused(cifar_dir: Path, tmp_path: Path) -> None:
    """A label >= the number of class names loaded and crashed at step 0 (issue 15)."""
    batch = pickle.loads((cifar_dir / "data_batch_2").read_bytes())
    batch[b"labels"][3] = 12
    (cifar_dir / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"data_batch_2.*label 12.*10 class names"):
        load_data(str(cifar_dir), cache_dir=tmp_path)

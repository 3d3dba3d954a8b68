"""Image sources of any size, format and mode: indexing, checks before decoding, both paths."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import encode, mixed_images, png_bomb, reference, rgb, write_tree
from PIL import Image

from reslab.data import (
    BadImageError,
    InputConfig,
    Limits,
    index_source,
    load_data,
)
from reslab.data.images import decode, probe
from reslab.data.stream import ImageDataset


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """train/{a,b} with every mode/format; val/ and test/ with a few JPEGs of other sizes."""
    files = mixed_images()
    names = sorted(files)
    tree = {
        "train": {
            "a": {n: files[n] for n in names[::2]},
            "b": {n: files[n] for n in names[1::2]},
        },
        "val": {
            c: {f"v{i}.jpg": encode(Image.fromarray(rgb(50 + i, 70, i)), "JPEG") for i in range(2)}
            for c in "ab"
        },
        "test": {
            c: {
                f"t{i}.png": encode(Image.fromarray(rgb(31, 29 + i, 9 + i)), "PNG")
                for i in range(2)
            }
            for c in "ab"
        },
    }
    root = tmp_path / "mixed"
    write_tree(root, tree)
    return root


def test_every_mode_decodes_like_pillow() -> None:
    """grey, RGBA, CMYK, palette, 16-bit, EXIF-rotated, GIF (first frame), WebP, BMP: RGB uint8
    as Pillow shows them (EXIF applied, 16-bit scaled by 255/65535, not clipped)."""
    for name, data in mixed_images().items():
        ref = reference(data)
        x = decode(data, name)
        assert x.dtype == torch.uint8 and x.shape == (3, *ref.shape[:2]), name
        diff = np.abs(x.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).max()
        assert diff <= 1, (name, diff)  # same decoder family: identical up to rounding
        grey = decode(data, name, channels=1)
        assert grey.shape == (1, *ref.shape[:2])
    exif = mixed_images()["exif.jpg"]
    assert decode(exif, "exif.jpg").shape[1:] == (44, 20)  # stored 20x44 (HxW), rotated 90
    assert probe(exif, "exif.jpg").height == 44  # the index knows the displayed size
    sixteen = decode(mixed_images()["sixteen.png"], "s")
    assert int(sixteen.max()) > 200  # Pillow's RGB conversion clips 16-bit values to 255


def test_large_jpeg_decodes_at_reduced_size_when_allowed() -> None:
    data = encode(Image.fromarray(rgb(800, 1000, 3)), "JPEG", quality=92)
    full = decode(data, "big.jpg")
    reduced = decode(data, "big.jpg", min_side=200)  # 800 >= 4 * 200: DCT scaling to 1/4
    assert full.shape == (3, 800, 1000) and reduced.shape == (3, 200, 250)
    assert decode(data, "big.jpg", min_side=300).shape == (3, 800, 1000)  # 800 < 4 * 300
    from torchvision.transforms.v2 import functional as F

    small = F.resize(full, [200], antialias=True)
    assert (reduced.float() - small.float()).abs().mean() < 4  # the same picture


def test_mixed_folder_indexes_with_val_and_test(mixed: Path, tmp_path: Path) -> None:
    idx = index_source(mixed, cache_dir=tmp_path / "cache")
    assert idx.classes == ["a", "b"]
    assert [len(idx.splits[s]) for s in ("train", "val", "test")] == [10, 4, 4]
    assert not idx.notes  # every split is the folder's own
    assert not idx.uniform()
    (w0, h0), (w1, h1) = idx.size_range()
    assert (w0, h0) == (20, 25) and (w1, h1) == (120, 90)  # smallest width, smallest height


def test_both_paths_load_the_mixed_folder(mixed: Path, tmp_path: Path) -> None:
    """In memory (resized to one size) and streamed (each sample decoded by the worker path):
    the same images, the right shapes, and val/ used as validation."""
    s = load_data(str(mixed), cache_dir=tmp_path / "c", image_size=24, val_size=3)
    assert s.train.images.shape == (10, 3, 24, 24) and s.train.images.dtype == torch.uint8
    assert len(s.val) == 4 and len(s.test) == 4  # val/ as it is; val_size is not applied
    assert s.val.labels.tolist() == [0, 0, 1, 1]
    idx = index_source(mixed, cache_dir=tmp_path / "c")
    cfg = InputConfig(size=(24, 24), resize=24)
    ds = ImageDataset(idx, "train", cfg.eval_transform())
    streamed = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(streamed, s.train.images)  # one decoder, one transform, two paths
    raw = ImageDataset(idx, "train")  # no transform: the decoded image itself
    for i, name in enumerate(idx.splits["train"].files):
        ref = reference((mixed / name).read_bytes())
        assert raw[i][0].shape == (3, *ref.shape[:2])


def test_mixed_sizes_in_memory_without_a_size_say_how_to_fix(mixed: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"differ in size.*image_size.*loader='stream'"):
        load_data(str(mixed), cache_dir=tmp_path)


def test_missing_test_split_is_held_out_of_train_with_a_note(tmp_path: Path) -> None:
    root = tmp_path / "novaltest"
    write_tree(
        root,
        {
            "train": {
                c: {f"{i}.png": encode(Image.fromarray(rgb(8, 8, i)), "PNG") for i in range(20)}
                for c in "xyz"
            }
        },
    )
    idx = index_source(root, cache_dir=tmp_path / "c")
    assert len(idx.splits["test"]) == 6 and len(idx.splits["train"]) == 54  # 10% per class
    assert sorted(idx.splits["test"].labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert any("seed 0" in n and "test" in n for n in idx.notes)
    again = index_source(root, cache_dir=tmp_path / "other-cache")
    assert again.splits["test"].files == idx.splits["test"].files  # fixed, whatever the run
    s = load_data(str(root), cache_dir=tmp_path / "c", seed=3)
    assert any(n.startswith("val:") and "seed 3" in n for n in s.notes)
    assert len(s.test) == 6 and len(s.train) + len(s.val) == 54


def test_csv_and_tsv_lists(tmp_path: Path) -> None:
    imgs = tmp_path / "pics"
    imgs.mkdir()
    for i in range(6):
        (imgs / f"{i}.png").write_bytes(encode(Image.fromarray(rgb(8, 8, i)), "PNG"))
    (tmp_path / "list.csv").write_text(
        "path,label,split\n"
        + "".join(
            f"pics/{i}.png,{'cat' if i % 2 else 'dog'},{'test' if i > 3 else 'train'}\n"
            for i in range(6)
        )
    )
    idx = index_source(tmp_path / "list.csv", cache_dir=tmp_path / "c")
    assert idx.classes == ["cat", "dog"] and len(idx.splits["test"]) == 2
    assert idx.splits["train"].files == ["pics/1.png", "pics/3.png", "pics/0.png", "pics/2.png"]
    (tmp_path / "list.tsv").write_text("".join(f"pics/{i}.png\t{i % 3}\n" for i in range(6)))
    t = index_source(tmp_path / "list.tsv", cache_dir=tmp_path / "c")
    assert t.classes == ["0", "1", "2"] and sum(len(s) for s in t.splits.values()) == 6
    s = load_data(str(tmp_path / "list.csv"), cache_dir=tmp_path / "c", val_size=0)
    assert s.train.images.shape == (4, 3, 8, 8)
    (tmp_path / "bad.csv").write_text("pics/0.png,cat\npics/9.png,dog\n")
    with pytest.raises(BadImageError, match=r"pics/9\.png"):
        index_source(tmp_path / "bad.csv", cache_dir=tmp_path / "c")
    (tmp_path / "short.csv").write_text("pics/0.png,cat\npics/1.png\n")
    with pytest.raises(ValueError, match=r"short\.csv, line 2"):
        index_source(tmp_path / "short.csv", cache_dir=tmp_path / "c")


def _with_file(mixed: Path, name: str, data: bytes) -> None:
    (mixed / "train" / "a" / name).write_bytes(data)


def test_truncated_jpeg_is_named_before_training_or_skipped(mixed: Path, tmp_path: Path) -> None:
    good = mixed_images()["photo.jpg"]
    _with_file(mixed, "cut.jpg", good[: len(good) // 2])
    with pytest.raises(BadImageError, match=r"train/a/cut\.jpg.*truncated JPEG"):
        index_source(mixed, cache_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable"):
        idx = index_source(mixed, cache_dir=tmp_path, skip_bad=True)
    assert len(idx.skipped) == 1 and idx.skipped[0][0].endswith("train/a/cut.jpg")
    assert "cut.jpg" not in " ".join(idx.splits["train"].files)
    s = load_data(str(mixed), cache_dir=tmp_path, skip_bad=True, image_size=16)
    assert len(s.skipped) == 1 and len(s.train) + len(s.val) == 14


def test_damage_inside_the_data_is_named_when_decoding(mixed: Path, tmp_path: Path) -> None:
    """A PNG whose compressed data is damaged passes the header check; decoding names it."""
    data = bytearray(mixed_images()["grey.png"])
    data[60] ^= 0xFF  # inside IDAT: its CRC no longer matches
    _with_file(mixed, "damaged.png", bytes(data))
    with pytest.raises(BadImageError, match=r"train/a/damaged\.png.*cannot decode"):
        load_data(str(mixed), cache_dir=tmp_path, image_size=16)
    s = load_data(str(mixed), cache_dir=tmp_path, image_size=16, skip_bad=True)
    assert [w.rsplit("/", 1)[-1] for w, _ in s.skipped] == ["damaged.png"]


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    """A small zip of 9000x9000 PNGs (81 MP each, 243 MB decoded as RGB) is refused by the header
    check, naming the file and the limit, before any pixel is decoded."""
    bomb = png_bomb(9000)
    assert len(bomb) < 200_000
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"train/x/{i}.png", bomb)
        zf.writestr("test/x/0.png", encode(Image.fromarray(rgb(8, 8, 0)), "PNG"))
    with pytest.raises(BadImageError, match=r"bomb\.zip:train/x/0\.png.*9000x9000.*max_pixels"):
        load_data(str(path), cache_dir=tmp_path / "c")
    with pytest.raises(BadImageError, match=r"over the limit"):
        decode(bomb, "direct.png")  # the decoder checks the header too
    x = decode(png_bomb(300), "ok.png", limits=Limits(max_pixels=300 * 300))
    assert x.shape == (3, 300, 300)


def test_oversized_and_special_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_tree(root, {"train": {"a": {"0.png": encode(Image.fromarray(rgb(8, 8, 0)), "PNG")}}})
    with pytest.raises(BadImageError, match=r"0\.png.*over the limit 100"):
        index_source(root, cache_dir=tmp_path / "c", limits=Limits(max_file_bytes=100))
    os.mkfifo(root / "train" / "a" / "pipe.png")  # would block a plain read forever
    with pytest.raises(BadImageError, match=r"pipe\.png: not a regular file"):
        index_source(root, cache_dir=tmp_path / "c2")


def test_index_cache_hit_checksum_and_unwritable_fallback(
    mixed: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    first = index_source(mixed, cache_dir=cache)
    import reslab.data.index as index_mod

    def fail(*a: object, **k: object) -> None:
        raise AssertionError("indexed again despite a valid cache")

    monkeypatch.setattr(index_mod, "_build", fail)
    assert index_source(mixed, cache_dir=cache).splits["val"].files == first.splits["val"].files
    (file,) = cache.glob("*.index.json.gz")
    import gzip
    import json

    blob = json.loads(gzip.decompress(file.read_bytes()))
    blob["index"]["splits"]["train"]["labels"][0] = 1  # wrong labels served: must be caught
    file.write_bytes(gzip.compress(json.dumps(blob).encode()))
    with pytest.warns(UserWarning, match="checksum mismatch"), pytest.raises(AssertionError):
        index_source(mixed, cache_dir=cache)
    monkeypatch.undo()
    blocked = tmp_path / "a-file"  # a cache folder that cannot be made (works as root too)
    blocked.write_text("")
    with pytest.warns(UserWarning, match="cannot write the index cache"):
        idx = index_source(mixed, cache_dir=blocked / "sub")
    assert len(idx.splits["train"]) == 10
    with pytest.warns(UserWarning, match="cannot write the (data|index) cache"):
        s = load_data(str(mixed), cache_dir=blocked / "sub", image_size=8)
    assert len(s.train) == 10


def test_tensor_cache_checksum_catches_wrong_pixels(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_tree(
        root,
        {
            s: {"a": {f"{i}.png": encode(Image.fromarray(rgb(8, 8, i)), "PNG") for i in range(4)}}
            for s in ("train", "test")
        },
    )
    cache = tmp_path / "c"
    first = load_data(str(root), cache_dir=cache, val_size=0)
    (file,) = cache.glob("d.*.pt")
    d = torch.load(file, weights_only=True)
    d["train_images"][0, 0, 0, 0] ^= 0xFF
    torch.save(d, file)
    with pytest.warns(UserWarning, match="checksum mismatch"):
        again = load_data(str(root), cache_dir=cache, val_size=0)
    assert torch.equal(again.train.images, first.train.images)  # decoded again, right pixels


def test_zip_sources_stream_in_workers(mixed: Path, tmp_path: Path) -> None:
    path = tmp_path / "mixed.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(mixed.rglob("*")):
            if f.is_file():
                zf.write(f, f"top/{f.relative_to(mixed).as_posix()}")
    idx = index_source(path, cache_dir=tmp_path / "c")
    assert idx.store.kind == "zip" and len(idx.splits["train"]) == 10
    ds = ImageDataset(idx, "val", InputConfig(size=(16, 16), resize=16).eval_transform())
    assert torch.stack([ds[i][0] for i in range(len(ds))]).shape == (4, 3, 16, 16)

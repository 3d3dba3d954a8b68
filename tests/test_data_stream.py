"""The streaming path, the in-memory batches, shards, presets and the data CLI."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from image_files import encode, mixed_images, rgb, write_tree
from PIL import Image

from reslab.cli import main
from reslab.data import (
    BadImageError,
    ClassificationPresetEval,
    ClassificationPresetTrain,
    InputConfig,
    index_source,
)
from reslab.data.feed import InMemoryBatches, choose_loader, pad_crop_flip
from reslab.data.shards import PackConfig, pack, read_shard_index
from reslab.data.stream import ImageDataset, ResumableSampler, StreamingBatches


def _id_image(i: int, side: int = 8) -> bytes:
    """A PNG whose pixels say which sample it is (lossless, so the id survives every path)."""
    a = np.zeros((side, side, 3), np.uint8)
    a[..., 0], a[..., 1] = i % 256, i // 256
    return encode(Image.fromarray(a), "PNG")


def _ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


@pytest.fixture
def numbered(tmp_path: Path) -> Path:
    """60 train images in 3 classes + 6 test images, each carrying its id in its pixels."""
    tree = {
        "train": {
            c: {f"{i:03d}.png": _id_image(i) for i in range(k * 20, k * 20 + 20)}
            for k, c in enumerate("abc")
        },
        "test": {c: {f"{i}.png": _id_image(100 + i)} for i, c in enumerate("abc")},
    }
    root = tmp_path / "numbered"
    write_tree(root, tree)
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Photo-like JPEGs of mixed sizes in two classes (and the mixed modes in train/)."""
    files = mixed_images()
    tree = {
        "train": {
            "a": {
                f"{i}.jpg": encode(Image.fromarray(rgb(60 + 7 * i, 90 - 5 * i, i)), "JPEG")
                for i in range(8)
            }
            | {n: files[n] for n in sorted(files)[:5]},
            "b": {
                f"{i}.jpg": encode(Image.fromarray(rgb(80 - 3 * i, 50 + 9 * i, 50 + i)), "JPEG")
                for i in range(8)
            }
            | {n: files[n] for n in sorted(files)[5:]},
        },
        "val": {c: {"v.jpg": encode(Image.fromarray(rgb(70, 70, 99)), "JPEG")} for c in "ab"},
    }
    root = tmp_path / "photos"
    write_tree(root, tree)
    return root


def _batches(idx, *, seed=0, workers=0, batch=8, transform=None, **kw) -> StreamingBatches:
    cfg = InputConfig(size=(32, 32), resize=32)
    t = transform or ClassificationPresetTrain(cfg, "photo", scale=(0.3, 1.0))
    ds = ImageDataset(idx, "train", t, seed=seed)
    return StreamingBatches(ds, batch_size=batch, seed=seed, num_workers=workers, **kw)


def test_stream_is_deterministic_whatever_the_workers(photos: Path, tmp_path: Path) -> None:
    idx = index_source(photos, cache_dir=tmp_path)
    a = [(x.clone(), y.clone()) for x, y in _batches(idx, workers=0)]
    b = [(x.clone(), y.clone()) for x, y in _batches(idx, workers=2)]
    assert len(a) == len(_batches(idx)) == len(idx.splits["train"]) // 8 == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.dtype == torch.uint8 and xa.shape == (8, 3, 32, 32)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = [x for x, _ in _batches(idx, seed=1)]
    assert not all(torch.equal(x, y) for x, (y, _) in zip(c, a, strict=True))


def test_stream_epochs_differ_and_position_resumes(photos: Path, tmp_path: Path) -> None:
    idx = index_source(photos, cache_dir=tmp_path)
    ref = _batches(idx, batch=4)
    epoch0 = [x.clone() for x, _ in ref]
    epoch1 = [x.clone() for x, _ in ref]  # a full pass moved the position to the next epoch
    assert ref.state_dict()["epoch"] == 2 and ref.state_dict()["batch"] == 0
    assert not torch.equal(torch.stack(epoch0), torch.stack(epoch1))
    run = _batches(idx, batch=4, workers=2)
    for _ in run:  # one epoch (an iteration is one epoch's remaining batches)
        pass
    it = iter(run)
    next(it), next(it)  # two batches into the next, then "killed"
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    resumed = _batches(idx, batch=4, workers=1)
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(epoch1) - 2
    assert all(torch.equal(x, y) for x, y in zip(rest, epoch1[2:], strict=True))
    other = _batches(idx, batch=4, seed=5)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    seeked = _batches(idx, batch=4)
    seeked.seek(len(seeked) + 3)
    assert torch.equal(next(iter(seeked))[0], epoch1[3])


def test_worker_error_names_the_file_and_skip_bad_counts(photos: Path, tmp_path: Path) -> None:
    data = bytearray(mixed_images()["grey.png"])
    data[60] ^= 0xFF  # damaged inside IDAT: passes the header check, fails to decode
    (photos / "train" / "a" / "broken.png").write_bytes(bytes(data))
    idx = index_source(photos, cache_dir=tmp_path)
    with pytest.raises(BadImageError) as err:
        for _ in _batches(idx, workers=2, batch=2):
            pass
    msg = str(err.value)
    assert "train/a/broken.png" in msg and "Traceback" not in msg and "\n" not in msg
    ds = ImageDataset(
        idx, "train", InputConfig(size=(16, 16), resize=16).eval_transform(), skip_bad=True
    )
    run = StreamingBatches(ds, batch_size=5, num_workers=2, drop_last=False)
    seen = sum(len(y) for _, y in run)
    assert seen == len(ds) - 1
    assert len(run.skipped) == 1 and run.skipped[0][0].endswith("broken.png")


def test_sampler_ranks_disjoint_and_complete() -> None:
    for world in (1, 2, 3):
        parts = []
        for rank in range(world):
            s = ResumableSampler(
                50, batch_size=4, seed=3, rank=rank, world_size=world, drop_last=False
            )
            parts.append(s.indices())
        assert len({len(p) for p in parts}) == 1  # the same number of steps on every rank
        assert set(np.concatenate(parts)) == set(range(50))
        if world > 1:  # only wrap-around padding may repeat
            assert len(np.concatenate(parts)) - 50 < world


def test_in_memory_batches_share_the_interface() -> None:
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(40)
    make = lambda: InMemoryBatches(x, y, batch_size=8, seed=2, augment=pad_crop_flip(2))  # noqa: E731
    a = make()
    first = [(xb.clone(), yb.clone()) for xb, yb in a]
    assert len(first) == 5 and a.state_dict()["epoch"] == 1
    assert sorted(torch.cat([yb for _, yb in first]).tolist()) == list(range(40))
    b = make()
    b.load_state_dict({"epoch": 0, "batch": 3})
    rest = list(b)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(rest, first[3:], strict=True))


def test_streaming_splits_follow_load_data_rules(
    numbered: Path, photos: Path, tmp_path: Path
) -> None:
    from reslab.data.feed import streaming_splits

    idx = index_source(numbered, cache_dir=tmp_path)
    splits, notes = streaming_splits(idx, val_size=9, seed=1)
    assert len(splits["val"]) == 9 and len(splits["train"]) == 51 and len(splits["test"]) == 3
    assert sorted(splits["val"].labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # stratified
    assert not set(splits["val"].files) & set(splits["train"].files)
    assert any("seed 1" in n for n in notes)
    again, _ = streaming_splits(idx, val_size=9, seed=2)
    assert again["val"].files != splits["val"].files
    own, _ = streaming_splits(index_source(photos, cache_dir=tmp_path), val_size=5)
    assert len(own["val"]) == 2  # the folder's own val/: nothing held out
    ds = ImageDataset(idx, splits["val"])
    assert len(ds) == 9


def test_choose_loader_says_why(numbered: Path, photos: Path, tmp_path: Path) -> None:
    small = index_source(numbered, cache_dir=tmp_path)
    c = choose_loader(small)
    assert c.kind == "memory" and "fits in memory" in c.reason
    assert choose_loader(small, budget=100).kind == "stream"
    assert choose_loader(small, loader="stream").kind == "stream"
    mixed = index_source(photos, cache_dir=tmp_path)
    c = choose_loader(mixed)
    assert c.kind == "stream" and "sizes differ" in c.reason
    with pytest.raises(ValueError, match="sizes differ"):
        choose_loader(mixed, loader="memory")


def test_pack_round_trip_resume_and_tar_layout(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "packed"
    cfg = PackConfig(max_side=40, shard_samples=7)
    idx = pack(photos, dest, cfg, workers=2, cache_dir=tmp_path / "c", progress=False)
    src = index_source(photos, cache_dir=tmp_path / "c")
    assert idx.classes == src.classes
    for name, split in src.splits.items():
        assert sorted(idx.splits[name].labels.tolist()) == sorted(split.labels.tolist())
    train = idx.splits["train"]
    assert int(np.maximum(train.widths, train.heights).max()) <= 40
    ds = ImageDataset(idx, "train")
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, int(train.heights[i]), int(train.widths[i]))
    shards = sorted(dest.glob("train-*.tar"))
    assert len(shards) == -(-len(src.splits["train"]) // 7)
    with tarfile.open(shards[0]) as tar:  # WebDataset layout: KEY.jpg/.png + KEY.cls
        names = tar.getnames()
        key = names[0].rsplit(".", 1)[0]
        assert f"{key}.cls" in names
        fobj = tar.extractfile(f"{key}.cls")
        assert fobj is not None
        label = int(fobj.read())
    first = next(i for i, f in enumerate(train.files) if f.startswith(shards[0].name + "/"))
    assert int(train.labels[first]) == label
    before = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if interrupted before this shard was written
    killed = dest / ".train-000001.tar.999999999.tmp"  # what kill -9 mid-write leaves
    killed.write_bytes(b"half a shard")
    pack(photos, dest, cfg, workers=1, cache_dir=tmp_path / "c", progress=False)
    after = {p: p.stat().st_mtime_ns for p in sorted(dest.glob("train-*.tar"))}
    assert [p for p in after if after[p] != before.get(p)] == [shards[1]]  # only it was redone
    assert not list(dest.glob(".*.tmp"))
    with pytest.raises(ValueError, match="other settings"):
        pack(photos, dest, PackConfig(max_side=20), cache_dir=tmp_path / "c", progress=False)
    assert read_shard_index(dest).splits["val"].files == idx.splits["val"].files


def _rank_main(rank: int, world: int, dest: str, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        idx = read_shard_index(Path(dest))
        ds = ImageDataset(idx, "train")
        run = StreamingBatches(ds, batch_size=4, num_workers=0, drop_last=False)
        assert run.sampler.rank == rank and run.sampler.world_size == world
        opened = sorted({ds.names[int(i)].split("/")[0] for i in run.sampler.indices()})
        ids = [i for x, _ in run for i in _ids(x)]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"ids": ids, "shards": opened, "steps": len(run)})
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_stream_disjoint_shards(numbered: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    pack(
        numbered,
        dest,
        PackConfig(shard_samples=6),
        workers=1,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    out = tmp_path / "ranks.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_main, args=(2, str(dest), init, str(out)), nprocs=2, join=True)
    r0, r1 = json.loads(out.read_text())
    assert r0["steps"] == r1["steps"]  # DDP needs the same number of steps on every rank
    assert not set(r0["shards"]) & set(r1["shards"])  # each rank opens only its own shards
    assert not set(r0["ids"]) & set(r1["ids"])
    assert set(r0["ids"]) | set(r1["ids"]) == set(range(60))  # the union is the data set


def test_input_config_round_trip_and_timm_default_cfg() -> None:
    cfg = InputConfig(size=(224, 224), resize=256, interpolation="bicubic")
    assert InputConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict()))["size"] == [224, 224]
    with pytest.raises(ValueError, match="unknown input config keys"):
        InputConfig.from_dict({"sise": 3})
    with pytest.raises(ValueError, match="pixel_mean"):
        InputConfig(normalize="pixel")
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet50", pretrained=False)
    dcfg = resolve_data_config({}, model=model)
    ours = InputConfig.from_default_cfg(model.pretrained_cfg)
    theirs = create_transform(**dcfg)  # Resize(floor(224 / crop_pct)), CenterCrop, Normalize
    resize, crop = theirs.transforms[0], theirs.transforms[1]
    assert ours.resize == resize.size and list(ours.size) == list(crop.size)
    assert ours.mean == tuple(dcfg["mean"]) and ours.std == tuple(dcfg["std"])
    assert ours.interpolation == dcfg["interpolation"]


def test_presets_shapes_and_seeded_repeats() -> None:
    img = torch.from_numpy(rgb(300, 400, 1)).permute(2, 0, 1).contiguous()
    cfg = InputConfig()
    ev = ClassificationPresetEval(cfg)
    from torchvision.transforms.v2 import functional as F

    want = F.center_crop(F.resize(img, [256], antialias=True), [224, 224])
    assert torch.equal(ev(img), want)  # resize 256 + centre crop 224
    for recipe in ("photo", "imagenet", "cifar"):
        t = ClassificationPresetTrain(cfg, recipe)
        torch.manual_seed(0)
        a = t(img)
        torch.manual_seed(0)
        b = t(img)
        assert a.shape == (3, 224, 224) and a.dtype == torch.uint8 and torch.equal(a, b)
    imagenet = ClassificationPresetTrain(cfg, "imagenet", hflip=0, pca_std=0)
    outs = []
    for s in range(20):  # shorter side in [256, 480] then a 224 crop: never the eval view
        torch.manual_seed(s)
        outs.append(imagenet(img))
    assert len({o.float().mean().item() for o in outs}) > 10


def test_fast_random_resized_crop_follows_torchvision() -> None:
    """The pixels of v2.functional.resized_crop (+ flip) at the drawn box, on the channels-last
    views the decoders return and on contiguous images; boxes within the scale and ratio
    ranges; the fallback as torchvision's; about half mirrored."""
    import random

    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from reslab.data import RandomResizedCropFlip

    data = encode(Image.fromarray(rgb(350, 400, 2)), "JPEG", quality=90)
    decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    t = RandomResizedCropFlip([224, 224])
    flips = 0
    for img in (decoded, decoded.contiguous()):
        for s in range(40):
            top, left, h, w, flip = t.params(350, 400, random.Random(s))
            assert 0.08 * 0.99 <= h * w / (350 * 400) <= 1.0 and 0.74 <= w / h <= 1.35
            want = F.resized_crop(img, top, left, h, w, [224, 224], antialias=True)
            want = F.horizontal_flip(want) if flip else want
            rng = random.Random(s)
            got = t.params(350, 400, rng)
            assert got == (top, left, h, w, flip)
            from reslab.data.presets import resized_crop_uint8

            assert torch.equal(
                resized_crop_uint8(img, (top, left, h, w), [224, 224], "bilinear", flip), want
            )
            flips += flip
        torch.manual_seed(0)
        a = t(img)
        torch.manual_seed(0)
        assert torch.equal(t(img), a) and a.shape == (3, 224, 224)
    assert 20 < flips < 60
    narrow = RandomResizedCropFlip([8, 8], scale=(0.99, 1.0))
    assert narrow.params(10, 100, random.Random(0))[:4] == (0, 43, 10, 13)  # clamped to 4:3


def test_pca_lighting_moves_colour_along_imagenet_components() -> None:
    from reslab.data import PCALighting
    from reslab.data.presets import IMAGENET_EIGVEC

    grey = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    shifts = torch.stack([PCALighting(0.1)(grey)[:, 0, 0].float() - 128 for _ in range(300)])
    assert shifts.abs().max() > 1 and shifts.abs().max() < 40
    # the first component (all channels together, brightness) carries most of the variance
    v = torch.tensor(IMAGENET_EIGVEC)[:, 0]
    along = (shifts @ v).var()
    assert along > 0.8 * shifts.var(0).sum()


def test_data_cli_info_and_pack(photos: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RESLAB_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["data", "info", str(photos)]) == 0
    out = capsys.readouterr().out
    assert "train: 24 images" in out and "val: 2 images" in out and "loader: stream" in out
    assert "test: no test/ split" in out
    assert (
        main(
            ["data", "pack", str(photos), str(tmp_path / "p"), "--max-side", "32", "--workers", "1"]
        )
        == 0
    )
    assert (tmp_path / "p" / "reslab-shards.json").is_file()
    (photos / "train" / "a" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["data", "info", str(photos)]) == 2
    assert "cut.jpg" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        assert main(["data", "info", str(photos), "--skip-bad"]) == 0
    assert "skipped 1 unreadable" in capsys.readouterr().out

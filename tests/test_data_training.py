"""Training on any source: the CLI end to end on photo folders, the loader choice, bad files,
exact resume and DDP on the streaming path, recipes and the input config in checkpoints."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from image_files import encode, mixed_images, rgb, write_tree
from PIL import Image

from reslab import create_model
from reslab.cli import main
from reslab.data import Split, load_data
from reslab.data.presets import IMAGENET_MEAN, IMAGENET_STD
from reslab.data.reading import open_data
from reslab.data.shards import PackConfig, pack
from reslab.data.training import EvalBatches, MemoryData, StreamData
from reslab.train import TrainConfig, TrainingInterrupted, evaluate, fit, learning_rate, train_size
from reslab.train.checkpoint import BEST, FORMAT_VERSION, LATEST, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _jpeg(h: int, w: int, seed: int) -> bytes:
    return encode(Image.fromarray(rgb(h, w, seed)), "JPEG", quality=90)


def _photo_tree(*, val: bool = True) -> dict:
    """Two classes of photo-like images of mixed sizes, formats and modes (grey, RGBA, CMYK,
    palette, 16-bit, EXIF-rotated, GIF, WebP, BMP), with val/ and test/."""
    odd = mixed_images(seed=3)
    tree: dict = {"train": {}, "test": {}}
    for k, c in enumerate(("cats", "dogs")):
        tree["train"][c] = {f"{i}.jpg": _jpeg(30 + 5 * i, 50 - 2 * i + 9 * k, 10 * k + i)
                            for i in range(10)}  # fmt: skip
        tree["test"][c] = {f"t{i}.jpg": _jpeg(40 + i, 36, 50 + 10 * k + i) for i in range(3)}
        if val:
            tree.setdefault("val", {})[c] = {
                f"v{i}.png": encode(Image.fromarray(rgb(24 + i, 44, 80 + k + i)), "PNG")
                for i in range(2)
            }
    for i, (name, data) in enumerate(sorted(odd.items())):
        tree["train"][("cats", "dogs")[i % 2]][name] = data
    return tree


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_tree(root, _photo_tree())
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RESLAB_CACHE_DIR", str(tmp_path / "cache"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


SMALL = ["--image-size", "16", "--batch-size", "8", "--workers", "0"]


# -- the CLI end to end ----------------------------------------------------------------------------
def test_photo_folder_trains_evaluates_and_finetunes_through_the_cli(
    photos: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    argv = ["train", "cifar_resnet20", "--data", str(photos), *SMALL, "--iters", "4"]
    assert main([*argv, "--eval-every", "2", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    said = next(line for line in out.splitlines() if line.startswith("data: photos: loader"))
    assert "loader stream (" in said and "sizes differ" in said  # which, and why
    config = _json(run / "config.json")
    data = config["data"]
    assert (data["train"], data["val"], data["test"]) == (30, 4, 6)  # val/ is the validation set
    assert not any(n.startswith("val:") for n in data["notes"])
    assert data["input"]["size"] == [16, 16] and data["augmentation"] == "cifar"
    ckpt = torch.load(run / LATEST, weights_only=True)
    assert ckpt["format_version"] == FORMAT_VERSION == 3
    cfg = ckpt["input_config"]
    assert cfg["size"] == [16, 16] and cfg["normalize"] == "pixel"  # the paper recipe's
    assert tuple(cfg["pixel_mean"].shape) == (3, 16, 16)
    summary = _json(run / "summary.json")
    assert summary["loader"] == "stream" and summary["skipped"] == 0

    assert main(["eval", str(run / LATEST), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6 and report["loader"] == "stream"
    assert report["accuracy"] == summary["test_accuracy"]  # the final model, same view
    assert main(["eval", str(run), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    assert main(["eval", str(run), "--crops", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6

    ft = tmp_path / "ft"
    assert main(["finetune", "--from", str(run), "--data", str(photos), "--iters", "2",
                 "--batch-size", "8", "--workers", "0", "--out", str(ft)]) == 0  # fmt: skip
    capsys.readouterr()
    ft_data = _json(ft / "config.json")["data"]
    assert ft_data["loader"].startswith("stream") and ft_data["input"]["size"] == [16, 16]
    assert main(["eval", str(ft), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6


def test_a_missing_val_split_is_held_out_with_its_seed_and_size_recorded(
    tmp_path: Path, capsys
) -> None:
    root = tmp_path / "noval"
    write_tree(root, _photo_tree(val=False))
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), *SMALL, "--iters", "1", "--out", str(run)]) == 0
    note = "val: 3 images held out of train/ per class (seed 0)"
    assert f"data: {note}" in capsys.readouterr().out
    config = _json(run / "config.json")
    assert note in config["data"]["notes"] and config["data"]["val"] == 3


def test_a_corrupt_jpeg_is_named_or_skipped_and_counted(photos: Path, tmp_path: Path, capsys):
    cut = photos / "train" / "cats" / "cut.jpg"
    cut.write_bytes(_jpeg(40, 40, 7)[:-200])  # a truncated copy: no end-of-image marker
    argv = ["train", "--data", str(photos), *SMALL, "--iters", "2"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"cannot use image {cut}: truncated JPEG" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()  # stopped before anything was written

    broken = bytearray(mixed_images()["grey.png"])
    broken[60] ^= 0xFF  # damaged inside the compressed data: passes the header check
    (photos / "train" / "dogs" / "broken.png").write_bytes(bytes(broken))
    run = tmp_path / "b"
    assert main([*argv, "--skip-bad", "--out", str(run)]) == 0
    summary = _json(run / "summary.json")
    assert summary["skipped"] == 2
    assert sorted(Path(f).name for f, _ in summary["skipped_files"]) == ["broken.png", "cut.jpg"]
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().out


def test_the_loader_flag_overrides_the_choice_and_refuses_what_cannot_work(
    photos: Path, tmp_path: Path, capsys
) -> None:
    argv = ["train", "--data", str(photos), "--iters", "1", "--workers", "0"]
    assert main([*argv, "--loader", "memory", "--out", str(tmp_path / "m")]) == 2
    assert "loader='memory' cannot hold" in capsys.readouterr().err
    assert main(["train", "--loader", "stream", "--iters", "1", "--out", str(tmp_path / "d")]) == 2
    assert "digits is read into memory whole" in capsys.readouterr().err


def test_streamed_evaluation_equals_the_in_memory_one(tmp_path: Path) -> None:
    """One-size images read both ways: the streamed split never becomes one tensor, and the
    report is the same, image for image."""
    root = tmp_path / "uniform"
    tree = {s: {c: {f"{i}.png": encode(Image.fromarray(rgb(12, 12, 100 * k + i + (s == "test"))),
                                       "PNG") for i in range(8)} for k, c in enumerate("abc")}
            for s in ("train", "test")}  # fmt: skip
    write_tree(root, tree)
    memory = open_data(str(root))
    stream = open_data(str(root), loader="stream", image_size=12, resize=None, workers=0)
    assert isinstance(memory, MemoryData) and isinstance(stream, StreamData)
    assert memory.loader.kind == "memory" and "fits in memory" in memory.loader.reason
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=3).eval()
    cpu = torch.device("cpu")
    batches = stream.eval_batches("test", batch_size=5, device=cpu)
    assert isinstance(batches, EvalBatches) and len(batches) == 24
    a = evaluate(model, memory.eval_batches("test", batch_size=5, device=cpu), batch_size=5)
    b = evaluate(model, batches)
    assert a["n"] == b["n"] == 24 and a["confusion"] == b["confusion"]


def test_ten_crops_of_images_at_the_input_size_are_the_mirror_average(digits) -> None:
    """At the input size the 10 crops are the image and its mirror, five times each, so the
    10-crop protocol must agree with image + mirror on every image; multi-scale runs at the
    paper's scales scaled to the 8-px input."""
    from reslab.data import DataSplits
    from reslab.train.evaluation import evaluate_crops

    test = Split(digits.test.images[:96], digits.test.labels[:96])
    data = MemoryData(DataSplits(digits.train, digits.val, test, digits.classes, "digits"))
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", in_channels=1, num_classes=10).eval()
    cfg = data.input.with_normalization(data.normalization("channel"))
    model.input_norm = cfg.normalizer()
    ten = evaluate_crops(model, data.images("test"), cfg, "10")
    flip = evaluate(model, test, flip=True)
    assert ten["confusion"] == flip["confusion"] and ten["n"] == 96
    single = evaluate_crops(model, data.images("test"), cfg, "1")
    assert single["confusion"] == evaluate(model, test)["confusion"]
    assert evaluate_crops(model, data.images("test"), cfg, "multiscale")["n"] == 96


# -- exact resume and DDP on the streaming path -------------------------------------------------
def _stream_cfg(**kw) -> TrainConfig:
    base = {"iters": 9, "batch_size": 6, "eval_every": 3, "augmentation": "photo"}
    return TrainConfig.preset("digits", **{**base, "flip": True, "eval_test": False, **kw})


def test_streaming_resume_through_fit_is_bit_identical(photos: Path, tmp_path: Path) -> None:
    """Interrupted at step 6 of 9 (the middle of the second epoch of 5 steps) and resumed with
    another number of workers: every loss and weight as the straight run."""

    def data(workers: int) -> StreamData:
        d = open_data(str(photos), image_size=16, resize=None, workers=workers)
        assert isinstance(d, StreamData)
        return d

    def model(seed: int = 0):
        torch.manual_seed(seed)
        return create_model("cifar_resnet20", num_classes=2)

    straight = fit(model(), data(0), _stream_cfg(), tmp_path / "straight")

    def stop_at_6(step: int, m) -> None:
        if step == 6:
            signal.raise_signal(signal.SIGTERM)

    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        fit(model(), data(0), _stream_cfg(), out, on_step=stop_at_6)
    position = torch.load(out / LATEST, weights_only=True)["batches"]
    assert (position["epoch"], position["batch"]) == (1, 2)  # 30 images / 6 = 5 steps an epoch
    resumed = fit(model(seed=1), data(1), _stream_cfg(), out, resume=True)
    assert resumed.losses == straight.losses
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _id_png(i: int) -> bytes:
    a = np.zeros((8, 8, 3), np.uint8)
    a[..., 0], a[..., 1] = i % 256, i // 256
    return encode(Image.fromarray(a), "PNG")


def _rank_fit(rank: int, world: int, port: int, dest: str, out: str) -> None:
    """fit's own batches of packed shards on two gloo ranks: which images each rank reads in
    one epoch, and the weights each ends with."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    data = open_data(dest, loader="stream", image_size=8, resize=None, workers=0)
    cfg = _stream_cfg(iters=2, batch_size=12, augmentation="none", device="cpu")
    torch.manual_seed(0)
    result = fit(create_model("cifar_resnet20", num_classes=3), data, cfg, None, verbose=False)
    batches = data.train_batches(12, seed=cfg.seed, device=torch.device("cpu"),
                                 augment="none", rank=rank, world_size=world)  # fmt: skip
    ids = [int(x[0, 0, 0]) + 256 * int(x[1, 0, 0]) for images, _ in batches for x in images]
    shards = sorted({batches.dataset.names[i].split("/")[0] for i in batches.sampler.indices()})
    gathered: list = [None] * world
    weights = result.model.fc.weight.detach().clone()
    dist.all_gather_object(gathered, {"ids": ids, "shards": shards, "steps": len(batches),
                                      "fc": weights.tolist()})  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_train_on_disjoint_shards_whose_union_is_the_data(tmp_path: Path) -> None:
    root = tmp_path / "numbered"
    tree = {"train": {c: {f"{i:03d}.png": _id_png(i) for i in range(20 * k, 20 * k + 20)}
                      for k, c in enumerate("abc")},
            "test": {c: {"t.png": _id_png(100 + k)} for k, c in enumerate("abc")}}  # fmt: skip
    write_tree(root, tree)
    dest = tmp_path / "shards"
    pack(root, dest, PackConfig(shard_samples=6), workers=1, progress=False)
    out = tmp_path / "ranks.json"
    mp.spawn(_rank_fit, args=(2, _free_port(), str(dest), str(out)), nprocs=2, join=True)
    r0, r1 = json.loads(out.read_text())
    train = open_data(str(dest), image_size=8, resize=None, workers=0).split_size("train")
    assert r0["steps"] == r1["steps"] >= 1
    assert not set(r0["shards"]) & set(r1["shards"])  # each rank opens only its own shards
    assert not set(r0["ids"]) & set(r1["ids"])
    assert len(set(r0["ids"]) | set(r1["ids"])) >= train - 6  # all but a last partial batch
    assert r0["fc"] == r1["fc"]  # DDP kept the ranks' weights equal


# -- recipes -------------------------------------------------------------------------------------
def test_progressive_resizing_is_relative_to_the_data_size(digits) -> None:
    """The fast recipe's 16/24/32 px trains the 8x8 digits at 4, 6, 8 px (was: at 16, 24 and 32
    px, upsampled, and then evaluated at 8), and 224-px photos at 112, 168, 224."""
    fast = TrainConfig.preset("fast")
    total = 100
    steps = (0, 39, 40, 69, 70, 99)
    assert [train_size(s, total, fast, (32, 32)) for s in steps] == [
        (16, 16), (16, 16), (24, 24), (24, 24), None, None
    ]  # fmt: skip
    assert [train_size(s, total, fast, (224, 224)) for s in (0, 40, 70)] == [
        (112, 112), (168, 168), None
    ]  # fmt: skip
    seen: list[tuple[int, int]] = []
    model = create_model("cifar_resnet20", in_channels=1, num_classes=10)
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    cfg = TrainConfig.preset("digits", iters=10, eval_every=0, eval_test=False,
                             resolutions=fast.resolutions)  # fmt: skip
    fit(model, digits, cfg)
    assert seen[:10] == [(4, 4)] * 4 + [(6, 6)] * 3 + [(8, 8)] * 3


def test_imagenet_recipe_is_he_et_al_section_3_4() -> None:
    cfg = TrainConfig.preset("imagenet")
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (256, 0.1, 0.9, 1e-4)
    assert cfg.iters == 600_000 and cfg.warmup == "none" and cfg.schedule == "step"
    assert (cfg.augmentation, cfg.normalize) == ("imagenet", "pixel")
    lrs = [learning_rate(s, cfg.iters, cfg) for s in (0, 149_999, 150_000, 300_000, 450_000)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001])
    assert pytest.approx(30, abs=0.05) == 150_000 * 256 / 1_281_167  # epoch 30 of ImageNet


def test_batch_size_without_lr_scales_the_learning_rate(capsys) -> None:
    from reslab.cli import build_parser
    from reslab.commands.options import train_config

    args = build_parser().parse_args(["train", "--batch-size", "64", "--data", "x"])
    assert train_config(args, command="train", data="x").lr == pytest.approx(0.05)
    assert "the paper recipe's 0.1 at batch 128, scaled linearly" in capsys.readouterr().out
    args = build_parser().parse_args(["train", "--batch-size", "64", "--lr", "0.3"])
    assert train_config(args, command="train", data="x").lr == 0.3


def test_finetuning_photos_from_torchvision_weights_uses_their_input(
    photos: Path, tmp_path: Path
) -> None:
    """A torchvision file: the model's 224 px input, resize 256 + centre crop for evaluation,
    RandomResizedCrop + flip for training, ImageNet's mean and std."""
    import torchvision

    from reslab.data.presets import ClassificationPresetTrain, RandomResizedCropFlip
    from reslab.transfer.finetune import (
        pretrained_model,
        source_input,
        source_normalization,
    )

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    data = open_data(str(photos), default_cfg=source_input(path, "resnet18"), workers=0)
    assert isinstance(data, StreamData)
    assert data.image_size == (224, 224) and data.input.resize == 256
    t = data.train_transform("auto")
    assert isinstance(t, ClassificationPresetTrain) and t.recipe == "photo"
    assert isinstance(t.transform.transforms[0], RandomResizedCropFlip)
    net, report = pretrained_model(path, num_classes=2, in_channels=3, model="resnet18")
    norm = source_normalization(net, report)
    assert norm is not None and norm.mode == "channel"
    assert norm.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert norm.std.flatten().tolist() == pytest.approx(IMAGENET_STD)


# -- checkpoints carry the input ------------------------------------------------------------------
def test_checkpoints_carry_the_input_config_and_old_ones_still_evaluate(
    tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--iters", "3", "--out", str(run)]) == 0
    model = load_model(run)
    cfg = model.input_config
    assert cfg.size == (8, 8) and cfg.channels == 1 and cfg.normalize == "channel"
    x = load_data("digits").test.images[:4]
    assert torch.equal(cfg.normalizer()(x), model.input_norm(x))
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    new = json.loads(capsys.readouterr().out)
    for name in (BEST, LATEST):  # as a format-2 run wrote them: no input config
        ckpt = torch.load(run / name, weights_only=True)
        del ckpt["input_config"]
        ckpt["format_version"] = 2
        torch.save(ckpt, run / name)
    assert load_model(run).input_config is None
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["confusion"] == new["confusion"]


def test_in_memory_data_resized_to_another_input_size() -> None:
    digits = open_data("digits", image_size=16)
    assert isinstance(digits, MemoryData) and digits.image_size == (16, 16)
    assert isinstance(digits.splits.test, Split) and digits.splits.test.images.shape[-1] == 16
    assert any("resized from 8x8 to 16x16" in n for n in digits.notes)


# -- predict sees what evaluation saw -----------------------------------------------------------
def _eval_predictions(run: Path, split: str = "test") -> tuple[list[int], list[int]]:
    """(predicted class, label) of every image of a run's split, as `reslab eval` computes them."""
    model = load_model(run / LATEST)
    config = _json(run / "config.json")
    data = open_data(config["data_spec"], input=model.input_config, workers=0,
                     val_size=config.get("val_size"))  # fmt: skip
    preds, labels = [], []
    with torch.no_grad():
        for x, y in data.eval_batches(split, batch_size=64, device=torch.device("cpu")):
            preds += model(model.input_norm(x)).argmax(1).tolist()
            labels += y.tolist()
    return preds, labels


def test_predict_agrees_with_eval_on_the_default_digits_run(tmp_path: Path, capsys) -> None:
    """The default job's run, its own 359 test images as 8x8 PNG files: predict's top class is
    eval's on every image. (Before checkpoints carried their input, predict resized them to 32 px
    and answered 0 -> "6" at 64.8 %.) A checkpoint without the input config is refused with how
    to give the size, not guessed."""
    from reslab.transfer.predict import predict_files

    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--out", str(run)]) == 0
    preds, labels = _eval_predictions(run)
    test = load_data("digits").test
    assert labels == test.labels.tolist()
    files = []
    for i, image in enumerate(test.images):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(image[0].numpy()).save(files[-1])
    top = [int(t[0][0]) for _, t in predict_files(run, files, topk=1)]
    assert top == preds
    assert sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels) > 0.5
    capsys.readouterr()
    assert main(["predict", str(run), str(files[0]), "--topk", "1"]) == 0
    assert capsys.readouterr().out.split()[-1] == str(preds[0])

    for name in (BEST, LATEST):  # as a format-2 run wrote them
        ckpt = torch.load(run / name, weights_only=True)
        del ckpt["input_config"]
        ckpt["format_version"] = 2
        torch.save(ckpt, run / name)
    assert main(["predict", str(run), str(files[0])]) == 2
    err = capsys.readouterr().err
    assert "does not record the image size" in err and "--image-size N" in err
    assert [int(t[0][0]) for _, t in predict_files(run, files, topk=1, image_size=8)] == preds


def test_predict_agrees_with_eval_on_a_streamed_photo_run(photos: Path, tmp_path: Path) -> None:
    """Mixed sizes and modes, read at 24 px with a resize of 28 + centre crop: predict applies the
    checkpoint's evaluation view to each file, and agrees with eval on every test image."""
    from reslab.transfer.predict import predict_files

    run = tmp_path / "run"
    argv = ["train", "--data", str(photos), "--image-size", "24", "--resize", "28",
            "--batch-size", "8", "--workers", "0", "--iters", "6", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    model = load_model(run)
    assert (model.input_config.size, model.input_config.resize) == ((24, 24), 28)
    preds, labels = _eval_predictions(run)
    files = sorted((photos / "test").rglob("*.jpg"))  # the index's order: class, then name
    assert [["cats", "dogs"].index(f.parent.name) for f in files] == labels
    top = [t[0][0] for _, t in predict_files(run / LATEST, files, topk=1)]
    assert [["cats", "dogs"].index(c) for c in top] == preds


CIFAR_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.zip"


def test_predict_agrees_with_eval_on_a_cifar10_run(tmp_path: Path) -> None:
    """Real CIFAR-10 JPEGs (20 training and 10 test images of each class, from the zip), a
    cifar_resnet20 run on them in memory at their own 32 px: predict on the test files answers
    eval's class on every one."""
    import zipfile

    from reslab.transfer.predict import predict_files

    if not CIFAR_ZIP.is_file():
        pytest.skip(f"needs the CIFAR-10 JPEG zip (cifar10-jpeg.zip) at {CIFAR_ZIP}")
    root = tmp_path / "cifar"
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        for split, per_class in (("train", 20), ("test", 10)):
            taken: dict[str, int] = {}
            for n in names:
                _, s, c, _ = n.split("/")
                if s == split and taken.get(c, 0) < per_class:
                    taken[c] = taken.get(c, 0) + 1
                    (root / s / c).mkdir(parents=True, exist_ok=True)
                    (root / s / c / Path(n).name).write_bytes(z.read(n))
    run = tmp_path / "run"
    argv = ["train", "--data", str(root), "--loader", "memory", "--iters", "8", "--batch-size",
            "32", "--val-size", "20", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    preds, labels = _eval_predictions(run)
    classes = sorted(p.name for p in (root / "test").iterdir())
    files = sorted((root / "test").rglob("*.jpg"))  # the index's order: class, then name
    assert [classes.index(f.parent.name) for f in files] == labels
    top = [t[0][0] for _, t in predict_files(run / LATEST, files, topk=1)]
    assert [classes.index(c) for c in top] == preds

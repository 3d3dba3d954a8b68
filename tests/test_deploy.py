"""Deployment: the input a checkpoint expects, BatchNorm folding, export to ONNX and .pt2 with
parity against the eager network, int8, and `reslab predict` over files, folders and globs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_transfer import randomize_bn as randomized  # random BN: folding is not a no-op
from torch import nn

from reslab import create_model
from reslab.cli import main
from reslab.data import InputConfig, Normalize
from reslab.deploy import InferenceModel, InputSpec, fold_batchnorm, input_spec, load_trained
from reslab.deploy.export import ExportOptions, ExportResult, export_model
from reslab.models.shortcuts import COMBINES
from reslab.train.checkpoint import model_record

CIFAR_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cli(argv: list[str]) -> int:
    """``reslab.cli.main``, with argparse's own exits returned as statuses."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def save_checkpoint(
    model: nn.Module, path: Path, classes: list[str], norm: Normalize | None, **extra: object
) -> Path:
    record = model_record(model)
    record["normalization"] = norm.to_dict() if norm is not None else None
    torch.save({**record, "classes": classes, "step": 0, "train_config": {}, **extra}, path)
    return path


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained cifar_resnet20 with random BN statistics and a per-channel normalisation."""
    torch.manual_seed(0)
    net = randomized(create_model("cifar_resnet20"))
    g = torch.Generator().manual_seed(1)
    norm = Normalize("channel", 0.3 + 0.4 * torch.rand(3, 1, 1, generator=g),
                     0.2 + 0.1 * torch.rand(3, 1, 1, generator=g))  # fmt: skip
    # as every checkpoint since format 3 records it: 32x32 inputs, the CIFAR evaluation view
    view = InputConfig(size=(32, 32), resize=32).with_normalization(norm)
    return save_checkpoint(net, tmp_path_factory.mktemp("ckpt") / "c.pt", CLASSES, norm,
                           input_config=view.to_dict())  # fmt: skip


def cifar_test_images(n: int) -> torch.Tensor:
    """The first ``n`` test images of each class... in archive order, uint8 (N, 3, 32, 32)."""
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"CIFAR-10 JPEG zip not found at {CIFAR_ZIP} (real-image parity)")
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if "/test/" in n and n.endswith(".jpg"))
        step = max(1, len(names) // n)
        out = []
        for name in names[::step][:n]:
            with zf.open(name) as f, Image.open(f) as img:
                out.append(torch.from_numpy(np.asarray(img.convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def eager_logits(
    checkpoint: Path, images: torch.Tensor, *, image_size: int | None = None
) -> torch.Tensor:
    """The trainer's arithmetic: Normalize(uint8) then the network."""
    trained = load_trained(checkpoint, image_size=image_size)
    norm = Normalize(trained.spec.normalization, trained.spec.mean, trained.spec.std)
    with torch.no_grad():
        return trained.net(norm(images))


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """Within ``tol`` of the largest logit's scale (1e-4 absolute for logits of order 1)."""
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), (err, want.abs().max().item())


# -- the input a checkpoint expects ------------------------------------------------------------
def test_input_spec_from_the_checkpoint() -> None:
    pixel = {"model_config": {"in_channels": 3, "stem": "cifar"},
             "normalization": {"mode": "pixel", "mean": torch.rand(3, 12, 8),
                               "std": torch.ones(3, 12, 8)}}  # fmt: skip
    spec = input_spec(pixel)
    assert (spec.height, spec.width, spec.fixed_size) == (12, 8, True)
    with pytest.raises(ValueError, match="12x8"):
        input_spec(pixel, image_size=32)
    channel = {"model_config": {"in_channels": 1, "stem": "imagenet"},
               "normalization": {"mode": "channel", "mean": torch.rand(1, 1, 1),
                                 "std": torch.ones(1, 1, 1)}}  # fmt: skip
    # a checkpoint of format 1 or 2 with a per-channel normalisation records no size: given,
    # not guessed (a stem's design size or the last progressive-resizing side would be a guess)
    with pytest.raises(ValueError, match=r"does not record the image size.*--image-size N"):
        input_spec(channel)
    resized = {**channel, "train_config": {"resolutions": [[0.0, 16], [0.7, 40]]}}
    with pytest.raises(ValueError, match="does not record the image size"):
        input_spec(resized)
    assert (
        input_spec(channel, image_size=64).width,
        input_spec(channel, image_size=64).fixed_size,
    ) == (64, False)
    # format 3: the checkpoint's own input config, its evaluation view scaled with --image-size
    view = InputConfig(channels=1, size=(224, 224), resize=256, mean=(0.5,), std=(0.25,))
    spec = input_spec({**channel, "input_config": view.to_dict()})
    assert (spec.height, spec.resize, spec.normalization, spec.fixed_size) == (
        224,
        256,
        "channel",
        False,
    )
    assert spec.mean.flatten().tolist() == [0.5] and spec.std.flatten().tolist() == [0.25]
    assert (input_spec({**channel, "input_config": view.to_dict()}, image_size=112).resize) == 128
    dense = {"model_kind": "dense", "model_config": {"widths": [64, 64]}, "normalization": None}
    spec = input_spec(dense)
    assert (spec.channels, spec.height, spec.fixed_size) == (1, 8, True)
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).to_dict() == spec.to_dict()


# -- BatchNorm folding ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "overrides", "left"),
    [
        ("cifar_resnet20", {}, 0),
        ("resnet18", {"layers": (1, 1, 1, 1)}, 0),  # option B: the projection's BN folds too
        ("resnet18", {"layers": (1, 1, 1, 1), "ordering": "bn_after_add"}, 4),
        # pre-activations stay, except the first unit's, which reads the stem conv's output
        ("cifar_preact_resnet110", {"layers": (1, 1, 1)}, 3),
        ("cifar_preact_resnet164", {"layers": (1, 1, 1)}, 3),
        # He et al. 2016 Table 1's variants: a gate's 1x1 conv has no BN (nothing to fold, its
        # bias kept), option C's projection BN folds, the scalings and dropout hold no weights
        *[
            ("cifar_resnet20", {"layers": (1, 1, 1), "combine": key}, 0)
            for key in sorted(COMBINES)
            if key != "add"
        ],
        ("cifar_resnet20", {"layers": (1, 1, 1), "shortcut": "C"}, 0),
    ],
)
def test_fold_batchnorm_keeps_the_outputs(name: str, overrides: dict, left: int) -> None:
    torch.manual_seed(0)
    model = randomized(create_model(name, **overrides))
    x = torch.randn(3, 3, 64, 64)
    folded = fold_batchnorm(model, x[:2])
    bns = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == left
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is intact
    with torch.no_grad():
        assert_close(folded(x), model(x), 1e-5)
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in model.parameters())


def test_normalisation_is_inside_the_graph(cifar_checkpoint: Path) -> None:
    trained = load_trained(cifar_checkpoint)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    want = eager_logits(cifar_checkpoint, images)
    with torch.no_grad():
        u8 = InferenceModel(trained.net, trained.spec, "uint8")(images)
        f32 = InferenceModel(trained.net, trained.spec, "float")(images.float() / 255)
    assert torch.equal(u8, want)  # the trainer's own arithmetic
    assert_close(f32, want, 1e-5)


# -- export with parity ---------------------------------------------------------------------------
EXPORTS = [("onnx", False, "float"), ("onnx", True, "uint8"), ("pt2", True, "float"),
           ("pt2", False, "uint8")]  # fmt: skip


@pytest.fixture(scope="module", params=EXPORTS, ids=["-".join(map(str, e)) for e in EXPORTS])
def exported(
    request: pytest.FixtureRequest, cifar_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, object]:
    """Each format, with and without folded BatchNorm, for float and uint8 input."""
    fmt, fold, dtype = request.param
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX Runtime (pip install reslab[export])")
    out = tmp_path_factory.mktemp("export") / f"m.{fmt}"
    result = export_model(
        cifar_checkpoint, out, ExportOptions(fmt, fold_bn=fold, input_dtype=dtype)
    )
    return out, dtype, result


def test_export_agrees_with_eager(
    cifar_checkpoint: Path, exported: tuple[Path, str, object]
) -> None:
    """Within 1e-4 on random and (when the zip is present) real CIFAR-10 images, batch 1 and
    N through the same file (a dynamic batch dimension)."""
    from reslab.deploy import load_exported

    out, dtype, result = exported
    assert isinstance(result, ExportResult) and result.path == out and out.is_file()
    assert result.max_abs_diff is not None  # the check export_model runs itself
    assert result.max_abs_diff <= 1e-4 * max(1.0, result.max_abs_logit or 0)
    model = load_exported(out)
    random = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert_close(model(random), eager_logits(cifar_checkpoint, random))
    assert_close(model(random[:1]), eager_logits(cifar_checkpoint, random[:1]))
    check_metadata(out, cifar_checkpoint, dtype)
    real = cifar_test_images(64)
    assert_close(model(real), eager_logits(cifar_checkpoint, real))


def check_metadata(path: Path, checkpoint: Path, dtype: str) -> None:
    """What a consumer needs, embedded: classes, input shape/dtype/range, mean/std, version."""
    from reslab import __version__
    from reslab.deploy.runtime import read_metadata

    meta = read_metadata(path)
    assert meta["classes"] == CLASSES and meta["reslab_version"] == __version__
    assert meta["input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["input"]["dtype"] == {"uint8": "uint8", "float": "float32"}[dtype]
    assert meta["input"]["value_range"] == ([0, 255] if dtype == "uint8" else [0.0, 1.0])
    spec = load_trained(checkpoint).spec
    assert torch.allclose(torch.tensor(meta["normalization"]["mean"]), spec.mean)
    assert torch.allclose(torch.tensor(meta["normalization"]["std"]), spec.std)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path))
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["reslab"]) == meta and json.loads(props["classes"]) == CLASSES
        assert props["input_size"] == "3x32x32" and props["reslab_version"] == __version__
        assert torch.allclose(torch.tensor(json.loads(props["std"])), spec.std)
        assert model.graph.input[0].name == "images" and model.graph.output[0].name == "logits"
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    else:
        sidecar = path.with_suffix(".json")
        assert json.loads(sidecar.read_text()) == meta
        sidecar.unlink()  # the archive carries it too
        assert read_metadata(path) == meta


def test_export_command_and_bad_input(
    cifar_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_best.pt").write_bytes(cifar_checkpoint.read_bytes())
    assert cli(["export", str(run), "--format", "pt2", "--fold-bn"]) == 0
    out = capsys.readouterr().out
    assert (run / "model-folded.pt2").is_file() and (run / "model-folded.json").is_file()
    assert "max |logit difference|" in out

    cases = {
        "no checkpoint or run": [str(tmp_path / "missing")],
        "not a reslab checkpoint": [str(_torchvision_file(tmp_path))],
        "corrupt or unreadable": [str(_text_file(tmp_path))],
        "is not a regular file, not a weight file": [str(_named_pipe(tmp_path))],  # no hang
        "int8 calibration needs the run's training images": [str(run), "--int8"],
        "is a folder": [str(run), "--out", str(tmp_path)],
        "corrupt or unreadable zip": [str(run), "--int8", "--data", str(_text_file(tmp_path))],
    }  # fmt: skip
    for words, argv in cases.items():
        assert cli(["export", *argv]) == 2, words
        err = capsys.readouterr().err
        assert err.startswith("reslab export: error:") and len(err.strip().splitlines()) == 1, err
        assert words in err, err
    assert cli(["export", str(run), "--format", "tflite"]) == 2  # argparse's choices
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    left = {p.name for p in run.iterdir()}  # nothing half-written by the failed exports
    assert left == {"checkpoint_best.pt", "model-folded.pt2", "model-folded.json"}


def test_failed_export_leaves_no_file(
    cifar_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(program: object, f: object, **kwargs: object) -> None:
        f.write(b"half a program")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    (tmp_path / "m.pt2").write_bytes(b"the previous export")
    monkeypatch.setattr(torch.export, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_model(cifar_checkpoint, tmp_path / "m.pt2", ExportOptions("pt2"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]
    assert (tmp_path / "m.pt2").read_bytes() == b"the previous export"


def _torchvision_file(folder: Path) -> Path:
    import torchvision

    path = folder / "tv.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _named_pipe(folder: Path) -> Path:
    import os

    path = folder / "pipe.pt"
    os.mkfifo(path)
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not weights, not images\n")
    return path


# -- reslab predict -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 PNG/JPEG images of varied sizes in nested folders, plus a text file to be ignored."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = root / f"group{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        side = 32 if i % 4 else 48  # some need resizing
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.{'png' if i % 3 else 'jpg'}")
    (root / "README.txt").write_text("not an image\n")
    return root


def predictions(out: str) -> dict[str, list[dict]]:
    rows = [json.loads(line) for line in out.splitlines()]
    return {Path(r["image"]).name: r.get("top", r.get("error")) for r in rows}


def test_predict_folders_globs_and_formats(
    cifar_checkpoint: Path, image_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = sorted(p for p in image_tree.rglob("*") if p.suffix in (".png", ".jpg"))
    assert cli(["predict", str(cifar_checkpoint), str(image_tree), "--json", "--topk", "3",
                "--batch-size", "5", "--workers", "2"]) == 0  # fmt: skip
    by_folder = predictions(capsys.readouterr().out)
    assert sorted(by_folder) == sorted(p.name for p in files)  # recursive, README.txt ignored
    assert all(len(top) == 3 for top in by_folder.values())
    for top in by_folder.values():
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and all(t["class"] in CLASSES for t in top)

    # the same images by glob pattern and by name, in one call: same answers
    pattern = str(image_tree / "**" / "*.png")
    jpgs = [str(p) for p in files if p.suffix == ".jpg"]
    assert cli(["predict", str(cifar_checkpoint), pattern, *jpgs, "--json", "--topk", "3"]) == 0
    by_name = predictions(capsys.readouterr().out)
    assert sorted(by_name) == sorted(by_folder)
    for name, top in by_name.items():  # other batches: equal up to float rounding
        assert [t["class"] for t in top] == [t["class"] for t in by_folder[name]]
        assert max(abs(a["probability"] - b["probability"])
                   for a, b in zip(top, by_folder[name], strict=True)) < 1e-5  # fmt: skip

    # eager reference: each file read, resized and normalised as the trainer would
    trained = load_trained(cifar_checkpoint)
    from reslab.deploy import read_image

    x = torch.stack([read_image(p, trained.spec) for p in files])
    want = eager_logits(cifar_checkpoint, x).softmax(1)
    for p, probs in zip(files, want, strict=True):
        top = by_folder[p.name]
        assert (
            top[0]["index"] == int(probs.argmax()) and top[0]["class"] == CLASSES[top[0]["index"]]
        )
        assert abs(top[0]["probability"] - float(probs.max())) < 1e-5

    out = tmp_path / "p.csv"
    assert cli(["predict", str(cifar_checkpoint), str(image_tree), "--csv", "--topk", "2",
                "--output", str(out)]) == 0  # fmt: skip
    rows = out.read_text().splitlines()
    assert rows[0] == "image,class_1,probability_1,class_2,probability_2"
    assert len(rows) == 1 + len(files) and capsys.readouterr().out == ""
    first = rows[1].split(",")
    assert Path(first[0]).name == files[0].name and first[1] == by_folder[files[0].name][0]["class"]


def test_predict_unreadable_images(
    cifar_checkpoint: Path, image_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = sorted(image_tree.rglob("*.png"))[:3]
    argv = ["predict", str(cifar_checkpoint), *map(str, good), str(bad), "--json"]
    out = tmp_path / "out.jsonl"
    assert cli([*argv, "--output", str(out)]) == 2  # stops, names the file, writes nothing
    err = capsys.readouterr().err
    assert f"cannot use image {bad}: not an image" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert cli([*argv, "--skip-unreadable"]) == 0
    captured = capsys.readouterr()
    found = predictions(captured.out)
    assert list(found)[:3] == [p.name for p in good] and "not an image" in found["broken.png"]
    assert "skipped 1 unreadable image(s)" in captured.err and str(bad) in captured.err
    assert cli(["predict", str(_named_pipe(tmp_path)), *map(str, good)]) == 2  # not read: no hang
    assert "is not a regular file" in capsys.readouterr().err
    for argv, words in (
        ([str(tmp_path / "nope.png")], "no such image file or folder"),
        ([str(tmp_path / "*.gif")], "no files match"),
        ([str(tmp_path / "empty")], "no image files"),
    ):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert cli(["predict", str(cifar_checkpoint), *argv]) == 2
        assert words in capsys.readouterr().err


def test_predict_streams_batch_by_batch(cifar_checkpoint: Path, tmp_path: Path) -> None:
    """The first batch's answers come before later files are even read: the third image is
    written only after the first two are predicted."""
    from reslab.deploy.predict import load_predictor, predict

    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for p in paths[:2]:
        Image.new("RGB", (32, 32), (10, 200, 30)).save(p)
    stream = predict(load_predictor(cifar_checkpoint, device="cpu"), paths, batch_size=2, workers=0)
    first = [next(stream), next(stream)]
    Image.new("RGB", (32, 32), (10, 200, 30)).save(paths[2])
    last = next(stream)
    assert [r.image for r in [*first, last]] == list(map(str, paths))
    assert [c for c, _, _ in last.top] == [c for c, _, _ in first[0].top]  # the same picture
    assert abs(last.top[0][2] - first[0].top[0][2]) < 1e-5


def test_predict_with_an_exported_model(
    cifar_checkpoint: Path,
    exported: tuple[Path, str, object],
    image_tree: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`reslab predict model.onnx|pt2 FOLDER` reads the size, normalisation and class names
    from the file's metadata and gives the checkpoint's probabilities."""
    path, _, _ = exported
    argv = [str(image_tree), "--json", "--topk", "10"]
    assert cli(["predict", str(cifar_checkpoint), *argv]) == 0
    want = predictions(capsys.readouterr().out)
    assert cli(["predict", str(path), *argv]) == 0
    got = predictions(capsys.readouterr().out)
    assert list(got) == list(want)
    for name, top in got.items():
        ref = {t["class"]: t["probability"] for t in want[name]}
        assert max(abs(t["probability"] - ref[t["class"]]) for t in top) < 1e-4, name
    assert cli(["predict", str(path), str(image_tree), "--image-size", "64"]) == 2
    assert "was exported for 32x32 images" in capsys.readouterr().err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real run on the bundled digits (~96% test accuracy)."""
    run = tmp_path_factory.mktemp("digits") / "run"
    assert cli(["train", "--data", "digits", "--epochs", "3", "--out", str(run)]) == 0
    return run


@pytest.mark.slow
def test_predict_agrees_with_eval_on_every_digit(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A digits run's own test images, as PNG files: `reslab predict` gives every image the
    class `reslab eval` counts for it (same confusion matrix, image by image)."""
    from reslab.data import load_data

    run = digits_run
    test = load_data("digits").test
    files = []
    for i, (image, label) in enumerate(zip(test.images, test.labels, strict=True)):
        files.append(tmp_path / "test" / str(int(label)) / f"{i:03d}.png")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(files[-1])
    capsys.readouterr()
    assert cli(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the run normalises per channel, which records no image size: the digits' 8 is given
    assert cli(["predict", str(run), str(tmp_path / "test"), "--json", "--topk", "1",
                "--image-size", "8", "--batch-size", "50"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(test) == report["n"]
    predicted = {r["image"]: int(r["top"][0]["class"]) for r in rows}
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    for path in files:
        confusion[int(path.parent.name), predicted[str(path)]] += 1
    assert confusion.tolist() == report["confusion"]
    trained = load_trained(run)
    with torch.no_grad():
        norm = Normalize(trained.spec.normalization, trained.spec.mean, trained.spec.std)
        per_image = trained.net(norm(test.images)).argmax(1)  # what evaluate() computes
    assert [predicted[str(p)] for p in files] == per_image.tolist()
    assert 0.8 < report["accuracy"] < 1.0  # a trained net, not a constant answer


@pytest.mark.slow
def test_int8_export_of_a_digits_run(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reslab export --int8`, calibrated on the run's training images, as ONNX (ONNX Runtime's
    int8 kernels) and .pt2: the same top-1 class as fp32 on nearly every test digit."""
    from reslab.data import load_data
    from reslab.deploy import load_exported

    pytest.importorskip("onnxruntime", reason="ONNX Runtime (pip install reslab[export])")
    test = load_data("digits").test
    want = eager_logits(digits_run / "checkpoint_best.pt", test.images).argmax(1)
    for fmt, dtype in (("onnx", "uint8"), ("pt2", "float")):
        out = tmp_path / f"q.{fmt}"
        argv = ["export", str(digits_run), "--int8", "--format", fmt, "--input", dtype,
                "--image-size", "8", "--calibration-images", "256", "--out", str(out)]  # fmt: skip
        assert cli(argv) == 0, capsys.readouterr().err
        assert "top-1 agreement with fp32" in capsys.readouterr().out
        got = load_exported(out)(test.images).argmax(1)
        agreement = (got == want).float().mean().item()
        drop = ((want == test.labels).float().mean() - (got == test.labels).float().mean()).item()
        assert agreement >= 0.97 and drop <= 0.02, (fmt, agreement, drop)
        assert load_exported(out).meta["int8"]["calibration_images"] == 256
    # the checkpoint records its input config (format 3): no --image-size needed, none guessed
    assert cli(["export", str(digits_run), "--int8", "--out", str(tmp_path / "x.onnx")]) == 0
    assert load_exported(tmp_path / "x.onnx").meta["input"]["shape"][1:] == [1, 8, 8]


def test_a_missing_extra_is_one_line(
    cifar_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name)
    )
    assert cli(["export", str(cifar_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err == "reslab export: error: ONNX export needs onnxscript: pip install reslab[export]\n"


# -- int8 on a trained CIFAR-10 network ---------------------------------------------------------
def trained_cifar_run() -> Path:
    """A trained cifar_resnet20 run folder: RESLAB_CIFAR_RUN, else runs/cifar20-fast (the fast
    recipe's 19 epochs, ~85 % single view; hours of a CPU, so no test trains it)."""
    import os

    run = Path(os.environ.get("RESLAB_CIFAR_RUN", Path(__file__).resolve().parents[1] / "runs"
                              / "cifar20-fast"))  # fmt: skip
    if not (run / "checkpoint_best.pt").is_file():
        pytest.skip(
            f"no trained CIFAR-10 run at {run}: train one (reslab train --data "
            "cifar10-jpeg.zip --recipe fast --out runs/cifar20-fast) or set RESLAB_CIFAR_RUN"
        )
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"CIFAR-10 JPEG zip not found at {CIFAR_ZIP}")
    return run


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_1000_cifar10_test_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's bar: int8 (calibrated on 512 of the run's training images) gives fp32's
    top-1 class on >= 99 % of 1,000 CIFAR-10 test images (a fixed shuffle, every class), as the
    .pt2 program (its quantise/dequantise graph, and compiled to oneDNN int8 kernels) and as
    ONNX under ONNX Runtime's int8 kernels."""
    from reslab.data import load_data
    from reslab.deploy import load_exported
    from reslab.deploy.quantize import compile_for_cpu

    pytest.importorskip("onnxruntime", reason="ONNX Runtime (pip install reslab[export])")
    pytest.importorskip("torchao", reason="torchao (pip install reslab[export])")
    run = trained_cifar_run()
    data = load_trained(run, image_size=32).run.get("data_spec")
    extra = [] if data and Path(data).is_file() else ["--data", str(CIFAR_ZIP)]
    test = load_data(str(CIFAR_ZIP)).test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:1000]
    images, labels = test.images[pick], test.labels[pick]
    want = eager_logits(run, images, image_size=32).argmax(1)
    assert (want == labels).float().mean() > 0.8  # a trained network, not a constant answer
    got = {}
    for fmt in ("pt2", "onnx"):
        out = tmp_path / f"int8.{fmt}"
        # --image-size: a run from before checkpoints carried their input (format 1-2) needs it
        argv = ["export", str(run), "--int8", "--format", fmt, "--image-size", "32",
                "--out", str(out), *extra]  # fmt: skip
        assert cli(argv) == 0, capsys.readouterr().err
        model = load_exported(out)
        got[fmt] = torch.cat([model(images[i : i + 100]) for i in range(0, 1000, 100)])
        if fmt == "pt2":
            fast = compile_for_cpu(torch.export.load(str(out)).module())
            x = images.float() / 255
            got["pt2 compiled"] = torch.cat([fast(x[i : i + 100]) for i in range(0, 1000, 100)])
    for name, logits in got.items():
        agreement = (logits.argmax(1) == want).float().mean().item()
        assert agreement >= 0.99, (name, agreement)

"""Every reader of checkpoints and weight files goes through one validated loader: the format is
detected, nothing is unpickled beyond tensors and plain data, a network is sized before it is
built, special files are refused, and every refusal is one line naming the file and what it is.
Each defect test here failed on the code before the loader."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from image_files import encode, png_bomb, rgb
from PIL import Image

from reslab import create_model
from reslab.cli import main
from reslab.data import load_data
from reslab.models import get_config
from reslab.models.sizing import MAX_PARAMETERS, check_buildable, weight_count
from reslab.train import TrainConfig, fit
from reslab.train.checkpoint import LATEST, load_checkpoint, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step digits run: its folder, config.json and checkpoints."""
    out = tmp_path_factory.mktemp("run") / "run"
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", in_channels=1, num_classes=10)
    cfg = TrainConfig.preset("digits", iters=2, eval_every=2)
    fit(model, load_data("digits"), cfg, out, run_info={"data_spec": "digits", "val_size": None})
    return out


def _ckpt(run: Path) -> dict:
    return torch.load(run / LATEST, weights_only=True)


def _bad_files(run: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """{kind: (file, what the refusal must say)} of checkpoints a reader must refuse."""
    folder.mkdir(exist_ok=True)
    ckpt = _ckpt(run)
    files: dict[str, tuple[Path, str]] = {}

    def save(name: str, obj: object, says: str) -> None:
        torch.save(obj, folder / name)
        files[name] = (folder / name, says)

    save("bare.pt", ckpt["model"], "state dict, not a reslab checkpoint")
    from safetensors.torch import save_file

    save_file(ckpt["model"], folder / "w.safetensors")
    files["w.safetensors"] = (folder / "w.safetensors", "state dict, not a reslab checkpoint")
    wrong = {**ckpt, "model": {**ckpt["model"], "fc.weight": torch.zeros(3, 64)}}
    save("wrong-shape.pt", wrong, "fc.weight: file [3, 64] vs model [10, 64]")
    unknown = {**ckpt, "model": {**ckpt["model"], "extra.weight": torch.zeros(2)}}
    save("unknown-key.pt", unknown, "unexpected extra.weight")
    wide = {**ckpt, "model_config": {**ckpt["model_config"], "widths": [10**6] * 3}}
    save("wide.pt", wide, "asks for a network of at least")
    deep = {**ckpt, "model_config": {**ckpt["model_config"], "layers": [10**6] * 3}}
    save("deep.pt", deep, "asks for 3,000,000 residual layers")
    save("newer.pt", {**ckpt, "format_version": 99}, "format version 99")
    torch.save(ckpt, folder / "whole.pt")
    blob = (folder / "whole.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    files["truncated.pt"] = (folder / "truncated.pt", "corrupt or unreadable")
    save("unsafe.pt", {**ckpt, "hook": _Payload()}, "refusing to load")
    os.mkfifo(folder / "pipe.pt")
    files["pipe.pt"] = (folder / "pipe.pt", "not a regular file")
    (folder / "empty-dir").mkdir()
    files["empty-dir"] = (folder / "empty-dir", "no checkpoint")
    return files


class _Payload:
    """A pickle that would run code when loaded (reduce to a call)."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def bad(run: Path, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _bad_files(run, tmp_path_factory.mktemp("bad"))


def _one_line_naming(capsys, path: Path, says: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and says in err, err


KINDS = [
    "bare.pt",
    "w.safetensors",
    "wrong-shape.pt",
    "unknown-key.pt",
    "wide.pt",
    "deep.pt",
    "newer.pt",
    "truncated.pt",
    "unsafe.pt",
    "pipe.pt",
    "empty-dir",
]


@pytest.mark.parametrize("kind", KINDS)
def test_eval_refuses_each_bad_checkpoint_in_one_line(bad, kind: str, capsys) -> None:
    """`eval` gave KeyError/RuntimeError/TypeError tracebacks, torch's advice to re-run with
    weights_only=False, blocked on a named pipe, or built terabytes of weights."""
    path, says = bad[kind]
    assert main(["eval", str(path), "--data", "digits"]) == 2
    _one_line_naming(capsys, path, says)


@pytest.mark.parametrize("kind", ["bare.pt", "wrong-shape.pt", "wide.pt", "unsafe.pt", "pipe.pt"])
def test_predict_and_export_refuse_them_too(bad, kind: str, tmp_path: Path, capsys) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(encode(Image.fromarray(rgb(8, 8, 0)), "PNG"))
    path, says = bad[kind]
    assert main(["predict", str(path), str(image)]) == 2
    _one_line_naming(capsys, path, says)
    pytest.importorskip("onnxscript")
    assert main(["export", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line_naming(capsys, path, says)
    assert not (tmp_path / "m.onnx").exists()


def test_predict_bounds_each_image_before_decoding(run: Path, tmp_path: Path, capsys) -> None:
    """predict decoded any image whole: a 9000x9000 PNG of a few hundred KB became 243 MB, and a
    named pipe given as an image blocked."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(9000))
    assert main(["predict", str(run), str(bomb)]) == 2
    _one_line_naming(capsys, bomb, "declared size 9000x9000 = 81.0 MP is over the limit")
    os.mkfifo(tmp_path / "pipe.png")
    assert main(["predict", str(run), str(tmp_path / "pipe.png")]) == 2
    _one_line_naming(capsys, tmp_path / "pipe.png", "not a regular file")


@pytest.mark.parametrize("kind", ["wrong-shape.pt", "unknown-key.pt", "deep.pt", "newer.pt"])
def test_train_and_finetune_resume_refuse_a_bad_latest_checkpoint(
    run: Path, bad, kind: str, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    shutil.copy(bad[kind][0], folder / LATEST)
    before = {f.name: f.read_bytes() for f in folder.iterdir() if f.name != ".reslab.lock"}
    assert main(["train", "--resume", str(folder), "--iters", "4"]) == 2
    _one_line_naming(capsys, folder / LATEST, bad[kind][1])
    after = {f.name: f.read_bytes() for f in folder.iterdir() if f.name != ".reslab.lock"}
    assert after == before  # nothing written
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "finetune": {}}))
    assert main(["finetune", "--resume", str(folder), "--iters", "4"]) == 2
    _one_line_naming(capsys, folder / LATEST, bad[kind][1])


@pytest.mark.parametrize("kind", ["wide.pt", "deep.pt", "newer.pt", "unsafe.pt", "pipe.pt"])
def test_finetune_from_refuses_them(bad, kind: str, tmp_path: Path, capsys) -> None:
    path, says = bad[kind]
    out = tmp_path / "ft"
    argv = ["finetune", "--from", str(path), "--data", "digits", "--iters", "1", "--out", str(out)]
    assert main(argv) == 2
    _one_line_naming(capsys, path, says)
    assert not out.exists()


def test_the_library_loaders_are_the_same_validated_reader(bad) -> None:
    for kind in ("bare.pt", "wide.pt", "unsafe.pt", "pipe.pt", "newer.pt"):
        path, says = bad[kind]
        for load in (load_checkpoint, load_model):
            with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
                load(path)


def test_non_finite_weights_are_evaluated_with_a_warning(run: Path, tmp_path: Path) -> None:
    """A checkpoint with NaN weights (not written by this reslab: it refuses to) was evaluated
    as if it were fine."""
    ckpt = _ckpt(run)
    ckpt["model"]["fc.weight"] = torch.full_like(ckpt["model"]["fc.weight"], float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.warns(UserWarning, match=r"nan\.pt holds non-finite weights \(fc\.weight\)"):
        assert main(["eval", str(tmp_path / "nan.pt"), "--data", "digits"]) == 0


# -- sizing a network before it is built ---------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "resnet50", "preact_resnet50"])
def test_weight_count_is_a_close_lower_bound(name: str) -> None:
    config = get_config(name)
    with torch.device("meta"):
        real = sum(p.numel() for p in create_model(name).parameters())
    assert weight_count(config) <= real < 1.13 * weight_count(config)


def test_oversized_configs_are_refused_from_their_numbers_alone() -> None:
    huge = dataclasses.replace(get_config("resnet18"), widths=(10**6,) * 4)
    with pytest.raises(ValueError, match=r"at least [\d,]+ parameters \([\d,.]+ GiB"):
        check_buildable(huge, source="x.pt")
    assert weight_count(huge) > MAX_PARAMETERS
    check_buildable(get_config("resnet152"))  # the largest of the zoo builds

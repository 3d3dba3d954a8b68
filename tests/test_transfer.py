"""Transfer learning: safe loading of foreign weights, first/last-layer adaptation, freezing."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from reslab import create_model
from reslab.transfer import (
    UnsafeWeightsError,
    adapt_input_conv,
    freeze_until,
    load_pretrained,
    param_groups,
    unfreeze_schedule,
)
from reslab.transfer.freeze import freeze_point_at, gradual_schedule
from reslab.transfer.weights import file_sha256

X224 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X32 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a misplaced BN key changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval()


def assert_same_outputs(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    ours.eval(), ref.eval()
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-4 * (1 + b.abs().max().item())


def save_pth(state: dict, path: Path, prefix: str = "") -> Path:
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path


def save_safetensors(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# -- foreign checkpoints load with identical outputs ---------------------------------------------
def test_torchvision_resnet18_file(tmp_path: Path) -> None:
    ref = randomize_bn(torchvision.models.resnet18())
    path = save_pth(ref.state_dict(), tmp_path / "tv18.pth", prefix="module.")
    ours = create_model("resnet18", pretrained=path)
    assert_same_outputs(ours, ref, X224)


def test_timm_resnet_safetensors(tmp_path: Path) -> None:
    ref = randomize_bn(timm.create_model("resnet50"))
    path = save_safetensors(ref.state_dict(), tmp_path / "timm50.safetensors")
    ours = create_model("resnet50", stride_in="3x3")
    report = load_pretrained(ours, path)
    assert report.ok and report.format == "resnet" and not report.notes
    assert_same_outputs(ours, ref, X224)
    # The paper's stride placement loads too (same shapes) but the report says why it differs.
    paper = load_pretrained(create_model("resnet50"), path)
    assert any("stride_in='3x3'" in n for n in paper.notes)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_resnetv2_maps_onto_full_preact(tmp_path: Path, suffix: str) -> None:
    # timm resnetv2_50: 7x7 stem conv without norm + max-pool, PreActBottleneck striding the 3x3,
    # a bare 1x1 projection of the pre-activated input, final norm: reslab's preact_resnet50
    # with stride_in="3x3".
    ref = randomize_bn(timm.create_model("resnetv2_50"), seed=1)
    state = ref.state_dict()
    path = tmp_path / f"v2{suffix}"
    save_pth(state, path) if suffix == ".pth" else save_safetensors(state, path)
    ours = create_model("preact_resnet50", stride_in="3x3")
    report = load_pretrained(ours, path)
    assert report.format == "timm-resnetv2" and report.ok
    assert len(report.loaded) == len(ours.state_dict())
    assert_same_outputs(ours, ref, X224)


def test_reslab_checkpoint_keeps_its_metadata(tmp_path: Path) -> None:
    src = randomize_bn(create_model("cifar_resnet20", num_classes=3))
    path = tmp_path / "run.pt"
    torch.save(
        {
            "model": src.state_dict(),
            "model_config": src.config.to_dict(),
            "model_kind": "resnet",
            "classes": ["cat", "dog", "frog"],
            "step": 7,
            "train_config": {},
        },
        path,
    )
    ours = create_model("cifar_resnet20", num_classes=3)
    report = load_pretrained(ours, path)
    assert report.format == "reslab" and report.meta["classes"] == ["cat", "dog", "frog"]
    assert_same_outputs(ours, src, X32)


# -- safety ------------------------------------------------------------------------------------
class Payload:
    """Unpickling this object creates a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_payload_is_refused(tmp_path: Path) -> None:
    # The payload is real: plain unpickling runs it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    state = create_model("cifar_resnet20").state_dict()
    zipped = tmp_path / "evil.pth"
    torch.save({"model": state, "model_config": {}, "hook": Payload(marker)}, zipped)
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(UnsafeWeightsError, match="arbitrary unpickling can run code"):
            create_model("cifar_resnet20", pretrained=path)
    assert not marker.exists()


def test_sha256_check(tmp_path: Path) -> None:
    path = save_pth(create_model("cifar_resnet20").state_dict(), tmp_path / "w.pth")
    digest = file_sha256(path)
    create_model("cifar_resnet20", pretrained=path, pretrained_sha256=digest.upper())
    with pytest.raises(ValueError, match="sha256 mismatch"):
        create_model("cifar_resnet20", pretrained=path, pretrained_sha256="0" * 64)


def test_report_lists_missing_unexpected_and_mismatched(tmp_path: Path) -> None:
    path = save_pth(create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"missing from the file \(\d+\): final_bn"):
        create_model("preact_resnet18", pretrained=path)
    report = load_pretrained(create_model("preact_resnet18"), path, strict=False)
    assert "final_bn.weight" in report.missing and "bn1.weight" in report.unexpected
    wide = load_pretrained(
        create_model("resnet18", widths=(64, 128, 256, 1024)), path, strict=False
    )
    assert ("layer4.1.conv2.weight", (512, 512, 3, 3), (1024, 1024, 3, 3)) in wide.mismatched
    assert "shape mismatch: layer4.1.conv2.weight" in str(wide)


# -- first and last layer ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    src = randomize_bn(create_model("cifar_resnet20"))
    return src, save_pth(src.state_dict(), tmp_path_factory.mktemp("w") / "c20.pth")


def test_one_channel_equals_grey_replicated(cifar_file: tuple[nn.Module, Path]) -> None:
    src, path = cifar_file
    grey = create_model("cifar_resnet20", in_channels=1, pretrained=path).eval()
    x = X32[:, :1]
    with torch.no_grad():
        assert torch.allclose(grey(x), src(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_k_channels_repeat_and_rescale(cifar_file: tuple[nn.Module, Path]) -> None:
    src, path = cifar_file
    six = create_model("cifar_resnet20", in_channels=6, pretrained=path).eval()
    with torch.no_grad():  # [RGB, RGB] with kernels scaled by 3/6 is the RGB response
        assert torch.allclose(six(torch.cat([X32, X32], 1)), src(X32), atol=1e-5)
    w = torch.randn(8, 3, 3, 3)
    assert torch.equal(adapt_input_conv(w, 3), w)
    assert torch.allclose(adapt_input_conv(w, 4)[:, 3], w[:, 0] * 0.75)


def test_new_head_rest_pretrained(cifar_file: tuple[nn.Module, Path]) -> None:
    src, path = cifar_file
    model = create_model("cifar_resnet20", num_classes=5, pretrained=path)
    assert model.fc.out_features == 5 and model.config.num_classes == 5
    ours, theirs = model.state_dict(), src.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if not key.startswith("fc."):
            assert torch.equal(value, theirs[key]), key


# -- freezing ----------------------------------------------------------------------------------
def test_frozen_bn_statistics_do_not_drift(cifar_file: tuple[nn.Module, Path]) -> None:
    _, path = cifar_file
    model = create_model("cifar_resnet20", num_classes=5, pretrained=path)
    assert freeze_until(model, "layer2") == ["stem", "layer1", "layer2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(
        [{"params": g["params"], "lr": 0.1 * g["lr_scale"]} for g in param_groups(model)],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
    )
    model.train()  # what a trainer does each epoch: must not wake the frozen BNs
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(X32 * 3 + 1), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.")
    for key, value in after.items():
        changed = not torch.equal(value, before[key])
        if key.startswith(frozen):
            assert not changed, f"frozen {key} changed"
        elif key.endswith(("running_mean", "weight")):
            assert changed, f"trainable {key} did not change"
    assert not model.bn1.training and model.layer3[0].bn1.training


def test_unfreeze_schedule(cifar_file: tuple[nn.Module, Path]) -> None:
    _, path = cifar_file
    model = create_model("cifar_resnet20", pretrained=path).train()
    schedule = gradual_schedule(model, "layer2", every=10)
    assert schedule == {0: "layer2", 10: "layer1", 20: "stem", 30: "none"}
    assert [freeze_point_at(s, schedule) for s in (0, 9, 10, 29, 99)] == [
        "layer2",
        "layer2",
        "layer1",
        "stem",
        "none",
    ]
    on_step = unfreeze_schedule(schedule)
    on_step(0, model)
    assert not model.layer2[0].conv1.weight.requires_grad and not model.layer2[0].bn1.training
    on_step(10, model)
    assert model.layer2[0].conv1.weight.requires_grad and model.layer2[0].bn1.training
    assert not model.layer1[0].conv1.weight.requires_grad and model.fc.weight.requires_grad
    with pytest.raises(ValueError, match="valid choices: none, stem, layer1"):
        freeze_until(model, "layer4")


def test_param_groups_cover_every_parameter_once() -> None:
    model = create_model("cifar_resnet20")
    groups = param_groups(model, pretrained_lr_scale=0.05)
    assert [(g["name"], g["lr_scale"]) for g in groups] == [("pretrained", 0.05), ("new", 1.0)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert groups[1]["params"] == [model.fc.weight, model.fc.bias]


# -- command line ------------------------------------------------------------------------------
def test_finetune_and_predict_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from reslab.cli import main
    from reslab.data import load_data
    from reslab.train.checkpoint import load_checkpoint

    src = randomize_bn(create_model("cifar_resnet20", num_classes=5))
    ckpt = tmp_path / "pre.pt"
    torch.save(
        {"model": src.state_dict(), "model_config": src.config.to_dict(), "model_kind": "resnet",
         "classes": list("abcde"), "step": 0, "train_config": {}},
        ckpt,
    )  # fmt: skip
    out = tmp_path / "ft"
    argv = ["finetune", "--from", str(ckpt), "--data", "digits", "--in-channels", "1",
            "--freeze-until", "layer1", "--recipe", "digits", "--iters", "4", "--batch-size", "32",
            "--eval-every", "2", "--val-size", "100", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "conv1.weight: 3 -> 1 input channels (summed)" in capsys.readouterr().out
    config = (out / "config.json").read_text()
    assert '"freeze_until": "layer1"' in config and "new 10-class head" in config
    saved = load_checkpoint(out / "checkpoint_latest.pt")["model"]
    assert torch.equal(saved["conv1.weight"], src.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(saved["layer1.0.bn1.running_mean"], src.layer1[0].bn1.running_mean)
    assert not torch.equal(saved["layer2.0.conv1.weight"], src.layer2[0].conv1.weight)

    assert main(["eval", str(out), "--json"]) == 0  # the run folder works with reslab eval
    assert '"split": "test"' in capsys.readouterr().out

    digit = load_data("digits").test
    images = []
    for i in range(2):
        images.append(tmp_path / f"digit{i}.png")
        Image.fromarray(digit.images[i, 0].numpy()).save(images[-1])
    assert main(["predict", str(out), *map(str, images), "--topk", "3", "--image-size", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("digit0.png") and len(lines) == 8
    probs = [float(line.split("%")[0]) for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and lines[1].split()[-1] in "0123456789"


def test_foreign_file_needs_a_model_name(tmp_path: Path) -> None:
    from reslab.transfer import pretrained_model

    ref = randomize_bn(torchvision.models.resnet18())
    path = save_pth(ref.state_dict(), tmp_path / "tv18.pth")
    with pytest.raises(ValueError, match="name the registered model"):
        pretrained_model(path, num_classes=4, in_channels=1)
    net, report = pretrained_model(path, num_classes=4, in_channels=1, model="resnet18")
    assert net.conv1.in_channels == 1 and net.fc.out_features == 4 and report.ok
    assert len(report.adapted) == 2


# -- review fixes: weight files ----------------------------------------------------------------
def save_run_checkpoint(
    model: nn.Module, path: Path, classes: list[str], normalization: dict | None = None
) -> Path:
    """A checkpoint as ``reslab.train.fit`` writes it (the entries predict and finetune read)."""
    from reslab.train.checkpoint import model_record

    record = model_record(model)
    torch.save({**record, "normalization": normalization, "classes": classes, "step": 0,
                "train_config": {}}, path)  # fmt: skip
    return path


def test_headless_backbone_gets_a_fresh_head(tmp_path: Path) -> None:
    from reslab.transfer import pretrained_model

    ref = randomize_bn(timm.create_model("resnet18", num_classes=0))
    path = save_pth(ref.state_dict(), tmp_path / "headless.pth")
    assert not any(k.startswith("fc.") for k in ref.state_dict())
    net, report = pretrained_model(path, num_classes=4, in_channels=3, model="resnet18")
    assert report.ok and not report.missing
    assert any("fc" in a and "freshly initialised" in a for a in report.adapted), report.adapted
    assert net.fc.out_features == 4 and len(report.loaded) == len(ref.state_dict())
    with torch.no_grad():  # the backbone's features are the file's
        features = net.eval().forward_head(net.forward_features(X224), pre_logits=True)
        assert torch.allclose(features, ref(X224), atol=1e-5)


CORRUPT = ["text.pth", "empty.pth", "trunc.pth", "garbage.pkl", "trunc.safetensors",
           "pickle.safetensors"]  # fmt: skip


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_weight_files_are_named_value_errors(tmp_path: Path, name: str) -> None:
    from reslab.transfer import read_weights

    state = create_model("cifar_resnet20").state_dict()
    good_pth = save_pth(state, tmp_path / "good.pth").read_bytes()
    good_st = save_safetensors(state, tmp_path / "good.st").read_bytes()
    content = {
        "text.pth": b"hello, not weights\n",
        "empty.pth": b"",
        "trunc.pth": good_pth[: len(good_pth) // 2],
        "garbage.pkl": b"\x80\x02garbage, not a pickle of anything",
        "trunc.safetensors": good_st[:5000],
        "pickle.safetensors": good_pth,
    }[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt or unreadable weight file") as info:
        read_weights(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, UnsafeWeightsError)  # unreadable is not "unsafe"


def test_compiled_ddp_prefixes_are_all_stripped(tmp_path: Path) -> None:
    from reslab.transfer import read_weights

    state = create_model("cifar_resnet20").state_dict()
    path = save_pth(state, tmp_path / "w.pth", prefix="_orig_mod.module.")  # compile(DDP(model))
    assert set(read_weights(path).state_dict) == set(state)


def test_cli_reports_os_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reslab.cli import main

    ckpt = save_pth(create_model("cifar_resnet20").state_dict(), tmp_path / "w.pth")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    argv = ["finetune", "--from", str(ckpt), "--model", "cifar_resnet20", "--data", "digits",
            "--iters", "1", "--out", str(afile / "sub")]  # fmt: skip
    assert main(argv) == 2
    assert "reslab finetune: error:" in capsys.readouterr().err


# -- review fixes: finetune options ------------------------------------------------------------
def test_finetune_option_checks() -> None:
    from reslab.transfer import FinetuneOptions

    with pytest.raises(ValueError, match="unfreeze_every"):
        FinetuneOptions(unfreeze_every=0)
    with pytest.raises(ValueError, match="pretrained_lr_scale"):
        FinetuneOptions(pretrained_lr_scale=-1.0)
    FinetuneOptions(unfreeze_every=None, pretrained_lr_scale=0.0)  # frozen by lr: allowed


def test_bad_freeze_part_leaves_no_run_folder(
    cifar_file: tuple[nn.Module, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reslab.cli import main

    _, path = cifar_file
    out = tmp_path / "ft"
    argv = ["finetune", "--from", str(path), "--model", "cifar_resnet20", "--data", "digits",
            "--iters", "1", "--freeze-until", "layer9", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "unknown part 'layer9'" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv[:-4], "--unfreeze-every", "0", "--out", str(out)]) == 2
    assert "argument --unfreeze-every" in capsys.readouterr().err and not out.exists()


# -- review fixes: resume a fine-tuning run ----------------------------------------------------
def test_finetune_resume_equals_a_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    import reslab.train
    from reslab.cli import build_parser, main
    from reslab.commands.finetune import run_finetune
    from reslab.train.checkpoint import LATEST, load_checkpoint

    src = randomize_bn(create_model("cifar_resnet20", num_classes=5))
    ckpt = save_run_checkpoint(src, tmp_path / "pre.pt", list("abcde"))
    # a frozen part that is unfrozen on a schedule across the interruption, and pretrained
    # layers at 0.3x the rate: the resumed run must rebuild both
    argv = ["finetune", "--from", str(ckpt), "--data", "digits", "--classes", "1,2,3,4,5,6",
            "--train-fraction", "0.5", "--val-size", "50", "--freeze-until", "layer2",
            "--unfreeze-every", "4", "--pretrained-lr-scale", "0.3", "--recipe", "digits",
            "--iters", "12", "--batch-size", "16", "--eval-every", "4"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0

    real_fit = reslab.train.fit

    def interrupted_fit(*args, on_step, **kw):
        def step(s: int, model: nn.Module) -> None:
            on_step(s, model)
            if s == 6:
                signal.raise_signal(signal.SIGTERM)  # the trainer's handler: checkpoint, stop

        return real_fit(*args, on_step=step, **kw)

    run = tmp_path / "resumed"
    monkeypatch.setattr(reslab.train, "fit", interrupted_fit)
    assert main([*argv, "--out", str(run)]) == 128 + signal.SIGTERM
    assert f"reslab finetune --resume {run}" in capsys.readouterr().out
    assert load_checkpoint(run / LATEST)["step"] == 7
    monkeypatch.setattr(reslab.train, "fit", real_fit)
    with pytest.raises(FileExistsError, match="reslab finetune --resume"):  # not a fresh run
        run_finetune(build_parser().parse_args([*argv, "--out", str(run)]))
    assert main(["finetune", "--resume", str(run), "--freeze-until", "stem"]) == 2
    assert "--freeze-until" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(run)]) == 0

    a = load_checkpoint(tmp_path / "straight" / LATEST)
    b = load_checkpoint(run / LATEST)
    assert b["step"] == 12 and torch.equal(a["losses"], b["losses"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["classes"] == list("123456")
    config = (run / "config.json").read_text()
    assert '"pretrained_lr_scale": 0.3' in config and '"train_fraction": 0.5' in config


def test_train_resume_of_a_finetune_run_points_to_finetune_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from reslab.cli import main
    from reslab.commands.options import check_train_resume

    check_train_resume(tmp_path, {"train_config": {}})  # a `reslab train` run: fine
    config = {"train_config": {}, "finetune": {"freeze_until": "none"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(tmp_path)]) == 2  # was torch's "parameter groups"
    assert f"reslab finetune --resume {tmp_path}" in capsys.readouterr().err


# -- review fixes: dense checkpoints, predict --------------------------------------------------
@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image

    from reslab.data import load_data

    folder = tmp_path_factory.mktemp("digits")
    test = load_data("digits").test
    paths = [folder / f"d{i}.png" for i in range(2)]
    for i, p in enumerate(paths):
        Image.fromarray(test.images[i, 0].numpy()).save(p)
    return paths


def test_dense_checkpoint_predicts_and_finetunes(
    tmp_path: Path, digit_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from reslab.cli import main
    from reslab.data import Normalize, load_data
    from reslab.transfer.predict import predict_files

    torch.manual_seed(0)
    dense = create_model("dense_resnet10")  # 8x8 grey digits, flattened
    norm = Normalize.fit(load_data("digits").train.images, "channel").to_dict()
    ckpt = save_run_checkpoint(dense, tmp_path / "dense.pt", list("0123456789"), norm)
    [(name, top)] = predict_files(ckpt, digit_images[:1], topk=3)
    assert name.endswith("d0.png") and len(top) == 3
    assert freeze_until(dense, "none") == [] and all(p.requires_grad for p in dense.parameters())
    with pytest.raises(ValueError, match="no stages"):
        freeze_until(dense, "stem")

    out = tmp_path / "ft"
    argv = ["finetune", "--from", str(ckpt), "--data", "digits", "--classes", "0,1,2",
            "--iters", "2", "--eval-every", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "new 3-class head" in (out / "config.json").read_text()
    assert main(["predict", str(out), str(digit_images[0]), "--topk", "2"]) == 0
    assert main([*argv[:-2], "--freeze-until", "stem", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "--freeze-until none" in err and not (tmp_path / "x").exists()


def test_predict_uses_the_per_pixel_mean_shape(tmp_path: Path) -> None:
    from PIL import Image

    from reslab.data import Normalize
    from reslab.transfer.predict import predict_files

    net = create_model("cifar_resnet20", num_classes=2)
    norm = Normalize("pixel", torch.rand(3, 12, 8), torch.ones(3, 12, 8)).to_dict()
    ckpt = save_run_checkpoint(net, tmp_path / "rect.pt", ["a", "b"], norm)
    image = tmp_path / "wide.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image)
    [(_, top)] = predict_files(ckpt, [image])  # trained on 12 high x 8 wide images
    assert [c for c, _ in top] in (["a", "b"], ["b", "a"])
    with pytest.raises(ValueError, match="12x8"):
        predict_files(ckpt, [image], image_size=32)


def test_predict_names_bad_images_and_topk(
    tmp_path: Path, digit_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from PIL import Image

    from reslab.cli import main
    from reslab.transfer.predict import predict_files

    net = create_model("cifar_resnet20", in_channels=1, num_classes=3)
    ckpt = save_run_checkpoint(net, tmp_path / "c.pt", list("abc"))
    notimg = tmp_path / "notimg.png"
    notimg.write_text("not an image\n")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(big)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    folder = tmp_path / "adir"
    folder.mkdir()
    for bad in (notimg, trunc, folder):
        with pytest.raises(ValueError, match=str(bad)):
            predict_files(ckpt, [digit_images[0], bad], image_size=8)
        assert main(["predict", str(ckpt), str(bad), "--image-size", "8"]) == 2
        assert str(bad) in capsys.readouterr().err
    for k in (-1, 0):
        with pytest.raises(ValueError, match=f"topk must be >= 1, got {k}"):
            predict_files(ckpt, digit_images, topk=k)
        assert main(["predict", str(ckpt), str(digit_images[0]), "--topk", str(k)]) == 2


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from reslab.transfer.predict import read_image

    a = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    x = read_image(path, 1, 8)
    expected = torch.from_numpy(np.round(a / 257).astype(np.uint8))
    assert torch.equal(x[0], expected)
    assert torch.equal(read_image(path, 3, 8), expected.expand(3, 8, 8))


# -- layering: the model layer reads weight files itself ---------------------------------------
def test_create_model_pretrained_imports_nothing_above_models(tmp_path: Path) -> None:
    """``create_model(name, pretrained=PATH)`` must not pull in reslab.transfer/train/data (the
    layering models <- data <- train <- transfer), and reslab.transfer keeps its public names."""
    import subprocess
    import sys

    import reslab.models.pretrained
    import reslab.models.weights
    import reslab.transfer

    path = save_pth(create_model("cifar_resnet20").state_dict(), tmp_path / "w.pth")
    code = (
        "import sys; from reslab.models import create_model; "
        f"create_model('cifar_resnet20', pretrained={str(path)!r}); "
        "print(sorted(m for m in sys.modules if m.startswith('reslab.') and "
        "m.split('.')[1] not in ('models',)))"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    for name in ("read_weights", "Weights", "to_reslab_names", "UnsafeWeightsError"):
        assert getattr(reslab.transfer, name) is getattr(reslab.models.weights, name)
    for name in ("load_pretrained", "LoadReport", "adapt_input_conv"):
        assert getattr(reslab.transfer, name) is getattr(reslab.models.pretrained, name)

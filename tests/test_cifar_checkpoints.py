"""Option A's two channel placements, and the PyTorch CIFAR ResNet checkpoint family.

The reference network below is written in this test from the published architecture of the
widely used PyTorch CIFAR ResNets (He et al. 2015 §4.2: a 16-channel 3x3 stem, three stages of
BasicBlocks of widths 16/32/64, option-A shortcuts computed by a lambda, a ``linear``
classifier), so that reslab's loader is checked against an independent implementation, not
against itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab import create_model
from reslab.models import PadShortcut
from reslab.summary import summarize

X = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# -- the reference implementation --------------------------------------------------------------
class Lambda(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class RefBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, split: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != planes:
            # subsample, then zero channels: split (planes//4 before and after) or all after
            pads = (planes // 4, planes // 4) if split else (0, planes - cin)
            self.shortcut = Lambda(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *pads)))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class RefCifarResNet(nn.Module):
    def __init__(self, n: int, split: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for s, planes in enumerate((16, 32, 64)):
            blocks = []
            for u in range(n):
                blocks.append(RefBlock(cin, planes, 2 if s > 0 and u == 0 else 1, split))
                cin = planes
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.layer3(self.layer2(self.layer1(y)))
        y = F.avg_pool2d(y, y.shape[3]).flatten(1)
        return self.linear(y)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so a misplaced channel changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def save_their_way(model: nn.Module, path: Path) -> Path:
    """As that family's files are: a DataParallel state dict ("module." keys) without the
    ``num_batches_tracked`` buffers (saved before PyTorch 0.4.1), in a training wrapper."""
    state = {
        f"module.{k}": v for k, v in model.state_dict().items() if "num_batches_tracked" not in k
    }
    torch.save({"epoch": 200, "state_dict": state, "best_prec1": 91.73}, path)
    return path


def outputs(model: nn.Module, x: Tensor = X) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


# -- option A placement -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet56"])
def test_placement_changes_nothing_but_the_function(name: str) -> None:
    after, split = create_model(name), create_model(name, shortcut_pad="split")
    assert after.config.shortcut_pad == "after" and split.config.shortcut_pad == "split"
    a, b = summarize(after, (3, 32, 32)), summarize(split, (3, 32, 32))
    assert (a.params, a.macs) == (b.params, b.macs)
    assert [(s.params, s.macs, s.output_size) for s in a.stages] == [
        (s.params, s.macs, s.output_size) for s in b.stages
    ]
    shapes = {k: v.shape for k, v in after.state_dict().items()}
    assert shapes == {k: v.shape for k, v in split.state_dict().items()}
    split.load_state_dict(randomized(after).state_dict())
    assert (outputs(after) - outputs(split)).abs().max() > 1e-2  # same weights, other function


def test_pad_shortcut_placements() -> None:
    x = torch.randn(2, 16, 8, 8)
    sub = x[:, :, ::2, ::2]
    after = PadShortcut(16, 32, 2)(x)
    split = PadShortcut(16, 32, 2, placement="split")(x)
    assert torch.equal(after, torch.cat([sub, torch.zeros(2, 16, 4, 4)], 1))
    assert torch.equal(split, F.pad(sub, (0, 0, 0, 0, 32 // 4, 32 // 4)))
    odd = PadShortcut(3, 8, 1, placement="split")(torch.ones(1, 3, 2, 2))  # 5 zeros: 2 + 3
    assert odd[0, :, 0, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="unknown shortcut_pad 'middle'"):
        create_model("cifar_resnet20", shortcut_pad="middle")


def test_summary_shows_the_placement(capsys: pytest.CaptureFixture[str]) -> None:
    from reslab.cli import main
    from reslab.commands.summary import model_table

    assert main(["summary", "cifar_resnet20", "--shortcut-pad", "split"]) == 0
    assert "shortcut: A (split)" in capsys.readouterr().out
    assert main(["summary", "cifar_resnet20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shortcut"] == "A (after)"
    assert "| `cifar_resnet20` | 20 | 3x32x32 | A (after) |" in model_table("cifar_resnet20")


# -- the CIFAR ResNet checkpoint family ---------------------------------------------------------
@pytest.mark.parametrize("n", [3, 5])  # ResNet-20 and ResNet-32
def test_cifar_family_file_loads_with_identical_outputs(tmp_path: Path, n: int) -> None:
    from reslab.models.weights import read_weights

    ref = randomized(RefCifarResNet(n))
    path = save_their_way(ref, tmp_path / f"resnet{6 * n + 2}.th")
    weights = read_weights(path)
    assert weights.format == "cifar-resnet" and weights.meta["best_prec1"] == 91.73
    ours = create_model(f"cifar_resnet{6 * n + 2}", pretrained=path)
    assert ours.config.shortcut_pad == "split"
    torch.testing.assert_close(outputs(ours), outputs(ref), rtol=1e-5, atol=1e-5)
    # the other placement computes another function from the same file, and says so
    with pytest.warns(UserWarning, match="shortcut_pad='split'"):
        wrong = create_model(f"cifar_resnet{6 * n + 2}", pretrained=path, shortcut_pad="after")
    assert (outputs(wrong) - outputs(ref)).abs().max() > 1e-2


def test_after_placement_file_loads_when_asked(tmp_path: Path) -> None:
    """The same family's names with zeros appended after (fb.resnet.torch's placement)."""
    ref = randomized(RefCifarResNet(3, split=False), seed=1)
    path = save_their_way(ref, tmp_path / "after.th")
    with pytest.warns(UserWarning, match="splits its zero channels"):
        ours = create_model("cifar_resnet20", pretrained=path, shortcut_pad="after")
    torch.testing.assert_close(outputs(ours), outputs(ref), rtol=1e-5, atol=1e-5)
    split = create_model("cifar_resnet20", pretrained=path)  # the family's default placement
    assert (outputs(split) - outputs(ref)).abs().max() > 1e-2


def test_load_report_says_what_it_mapped(tmp_path: Path) -> None:
    from reslab.models.pretrained import load_pretrained

    path = save_their_way(randomized(RefCifarResNet(3)), tmp_path / "r20.th")
    net = create_model("cifar_resnet20", shortcut_pad="split")
    report = load_pretrained(net, path)
    assert report.ok and report.format == "cifar-resnet"
    text = str(report)
    for words in (
        "state dict unwrapped from {'state_dict': ..., best_prec1, epoch}",
        "module.* -> *",
        "linear.* -> fc.*",
        "option-A shortcuts: shortcut_pad='split'",
        "num_batches_tracked: not in the file; the model's 19 BatchNorm counter(s) kept",
    ):
        assert words in text, text


@pytest.mark.parametrize("kind", ["torchvision", "reslab"])
def test_missing_bn_counters_never_refuse_a_file(tmp_path: Path, kind: str) -> None:
    import torchvision

    from reslab.models.pretrained import load_pretrained

    src = (
        torchvision.models.resnet18()
        if kind == "torchvision"
        else create_model("cifar_resnet20", num_classes=4)
    )
    state = {k: v for k, v in randomized(src).state_dict().items() if "num_batches" not in k}
    if kind == "reslab":
        from reslab.train.checkpoint import model_record

        path = tmp_path / "r.pt"
        torch.save({**model_record(src), "model": state, "classes": list("abcd")}, path)
        net = create_model("cifar_resnet20", num_classes=4)
    else:
        path = tmp_path / "tv.pth"
        torch.save(state, path)
        net = create_model("resnet18")
    report = load_pretrained(net, path)  # strict: refused before
    assert report.ok and "num_batches_tracked" in str(report)
    torch.testing.assert_close(outputs(net, X[:2]), outputs(src, X[:2]))


def test_finetune_and_predict_from_a_cifar_family_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reslab finetune --from their.th` infers cifar_resnet20 with the split placement; with the
    learning rate at 0 the run's model is their network, and `reslab predict` on its run folder
    gives their network's probabilities (under the run's input normalisation)."""
    import numpy as np
    from PIL import Image

    from reslab.cli import main
    from reslab.data import Normalize
    from reslab.train.checkpoint import load_checkpoint

    ref = randomized(RefCifarResNet(3))
    path = save_their_way(ref, tmp_path / "resnet20-12fca82f.th")
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, count in (("train", 3), ("test", 1)):
        for c in range(10):
            folder = data / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "run"
    # --lr must be > 0 (the parser refuses 0): 1e-9 leaves the head as it was within tolerance
    argv = ["finetune", "--from", str(path), "--data", str(data), "--freeze-until", "layer3",
            "--lr", "1e-9", "--iters", "1", "--batch-size", "8", "--val-size", "2",
            "--eval-every", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    report = config["finetune"]["load_report"]
    assert "(cifar-resnet)" in report and "linear.* -> fc.*" in report
    assert "shortcut_pad='split'" in report and config["model_config"]["shortcut_pad"] == "split"

    images = sorted((data / "test").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(out), *map(str, images), "--json", "--topk", "10"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ckpt = load_checkpoint(out / "checkpoint_latest.pt")
    norm = Normalize.from_dict(ckpt["normalization"])
    x = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in images])
    expected = outputs(ref, norm(x)).softmax(1)
    classes = ckpt["classes"]
    for row, probs in zip(rows, expected, strict=True):
        got = torch.zeros(10)
        for entry in row["top"]:
            got[classes.index(entry["class"])] = entry["probability"]
        torch.testing.assert_close(got, probs, rtol=1e-4, atol=1e-5)

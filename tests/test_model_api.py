"""timm's model interface on every convolutional model: features_only / feature_info,
reset_classifier(0), num_classes, the default input config, pretrained=True refused, and the
graph tools (torch.fx and torchvision's feature extraction, torch.export, TorchScript)."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from reslab.models import (
    FeatureListNet,
    ResNet,
    create_model,
    get_config,
    list_models,
)
from reslab.models.shortcuts import COMBINES

CONV = [n for n in list_models() if not n.startswith("dense")]
HUGE = ("cifar_preact_resnet1001", "cifar_resnet1202")  # the same blocks as 164 / 110, deeper
CONV_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in HUGE else n for n in CONV]
CIFAR_ZIP = Path(__file__).parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.zip"


pytestmark = pytest.mark.usefixtures("one_thread")


def _input(model: nn.Module, batch: int = 2) -> Tensor:
    """A batch at a small size every level of ``model`` divides: 64 px for ImageNet stems."""
    c, side, _ = model.pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, c, min(side, 64), min(side, 64), generator=g)


def _stage_outputs(model: ResNet, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """forward_features(x) and the outputs of the modules feature_info names, seen by hooks."""
    seen: dict[str, Tensor] = {}
    names = model.feature_info.module_name()
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen.setdefault(n, o)  # the first call: a module runs once
        )
        for n in names
    ]
    try:
        out = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return out, [seen[n] for n in names]


@pytest.mark.parametrize("name", CONV_PARAMS)
def test_feature_levels_of_every_conv_model(name: str) -> None:
    """In training mode: at initialisation BN's running statistics are the identity, and in eval
    mode a 1001-layer pre-activation net's identity path overflows (each unit adds variance)."""
    torch.manual_seed(0)
    _check_feature_levels(create_model(name).train())


#: He et al. 2016 Table 1's shortcut variants (every ``combine`` and option C) on a small net
VARIANTS = [
    *[{"combine": key} for key in sorted(COMBINES) if key != "add"],
    {"shortcut": "C"},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(o.values()))
def test_feature_levels_of_every_shortcut_variant(overrides: dict) -> None:
    """The gates read the unit's input beside the branch: fx and the feature extractor trace
    them as the eager forward runs them. In eval mode, where the dropout shortcut is fixed."""
    torch.manual_seed(0)
    _check_feature_levels(create_model("cifar_resnet20", layers=(1, 1, 1), **overrides).eval())


def _check_feature_levels(model: nn.Module) -> None:
    """features_only, torchvision's create_feature_extractor (torch.fx) and the stage outputs of
    forward_features agree exactly; shapes match feature_info's channels and reductions; the fx
    graph computes the eager model; reset_classifier(0) leaves the pooled features."""
    assert isinstance(model, ResNet)
    x = _input(model)
    info = model.feature_info
    with torch.no_grad():
        final, stages = _stage_outputs(model, x)
        feats = FeatureListNet(model)(x)
        extracted = create_feature_extractor(model, return_nodes=info.module_name())(x)
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), model(x))
    assert len(feats) == len(stages) == len(info) == len(model.config.layers) + 1
    for i, (f, s, n) in enumerate(zip(feats, stages, info.module_name(), strict=True)):
        assert torch.equal(f, s) and torch.equal(extracted[n], s), f"level {i} ({n})"
        side = x.shape[-1] // info.reduction(i)
        assert f.shape == (2, info.channels(i), side, side), f"level {i} ({n})"
    assert torch.equal(feats[-1], final)  # the last level is forward_features' output
    assert info.channels(-1) == model.num_features

    model.reset_classifier(0)
    with torch.no_grad():
        pooled = model(x)
    assert pooled.shape == (2, model.num_features) and model.num_classes == 0
    torch.testing.assert_close(pooled, final.mean((2, 3)), rtol=0, atol=1e-5)


def test_features_only_through_create_model() -> None:
    model = create_model("resnet50", features_only=True, out_indices=(1, 2, 3))
    assert isinstance(model, FeatureListNet)
    assert model.feature_info.channels() == [256, 512, 1024]
    assert model.feature_info.reduction() == [4, 8, 16]
    assert model.feature_info.module_name() == ["layer1", "layer2", "layer3"]
    assert "layer4.0.conv1.weight" not in model.state_dict()  # stages past the last level dropped
    assert not any(k.startswith("fc.") for k in model.state_dict())
    full = create_model("resnet50")
    missing, unexpected = model.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith(("layer4.", "fc.")) for k in unexpected)
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]
    assert "num_classes" not in model.pretrained_cfg
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


@pytest.mark.parametrize(
    ("out_indices", "levels"),
    [(None, [0, 1, 2, 3]), ((-1,), [3]), (2, [2, 3]), ((3, 0), [0, 3]), ([1, -3], [1])],
)
def test_out_indices_as_timm_reads_them(out_indices, levels) -> None:
    model = create_model("cifar_resnet20", features_only=True, out_indices=out_indices)
    assert model.feature_info.out_indices == tuple(levels)
    assert len(model(torch.randn(1, 3, 32, 32))) == len(levels)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"features_only": True, "out_indices": (4,)}, "4 is not a level .* 4 \\(0: the stem"),
        ({"features_only": True, "out_indices": 5}, "last n of 4 levels"),
        ({"features_only": True, "out_indices": ()}, "empty"),
        ({"out_indices": (1,)}, "needs features_only=True"),
    ],
)
def test_bad_feature_requests_say_what_is_wrong(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        create_model("cifar_resnet20", **kwargs)


def test_dense_nets_have_no_feature_levels() -> None:
    with pytest.raises(ValueError, match="dense net"):
        create_model("dense_resnet10", features_only=True)


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet20", "dense_resnet10"])
def test_reset_classifier_zero_then_back(name: str) -> None:
    """Was Linear(512 -> 0): an empty output, not the pooled features."""
    model = create_model(name)
    width = model.num_features
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model.num_classes == 0 and model.config.num_classes == 0
    x = torch.randn(2, 1, 8, 8) if name.startswith("dense") else _input(model)
    assert model.eval()(x).shape == (2, width)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    with pytest.raises(ValueError, match=">= 0"):
        model.reset_classifier(-1)


def test_num_classes_zero_at_creation() -> None:
    model = create_model("resnet18", num_classes=0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    assert create_model("resnet18").num_classes == 1000
    assert create_model("cifar_resnet20").num_classes == 10


def test_pretrained_true_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"never.*path of a weight file"):
        create_model("resnet50", pretrained=True)
    assert isinstance(create_model("cifar_resnet20", pretrained=False), ResNet)


# -- the default input config ---------------------------------------------------------------------


def test_default_cfg_imagenet_and_cifar() -> None:
    r50 = create_model("resnet50")
    assert r50.default_cfg is r50.pretrained_cfg
    assert r50.pretrained_cfg == {
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
        "num_classes": 1000,
        "pool_size": (7, 7),
        "first_conv": "conv1",
        "classifier": "fc",
    }
    c20 = create_model("cifar_resnet20").pretrained_cfg
    assert c20["input_size"] == (3, 32, 32) and c20["crop_pct"] == 1.0
    assert c20["pool_size"] == (8, 8) and c20["num_classes"] == 10
    gray = create_model("cifar_resnet20", in_channels=1).pretrained_cfg
    assert gray["input_size"] == (1, 32, 32) and len(gray["mean"]) == len(gray["std"]) == 1
    cifar_stem = create_model("resnet50", stem="cifar").pretrained_cfg
    assert cifar_stem["input_size"] == (3, 32, 32) and cifar_stem["pool_size"] == (4, 4)
    model = create_model("cifar_resnet20")
    model.reset_classifier(3)
    assert model.pretrained_cfg["num_classes"] == 3


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason="needs a CIFAR-10 JPEG zip (cifar10-jpeg.zip)")
def test_cifar_default_normalisation_is_cifar10s() -> None:
    """The cifar stem's mean/std are CIFAR-10's: measured on 2,000 training images."""
    from torchvision.io import decode_jpeg

    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if "/train/" in n and n.endswith(".jpg"))
        pick = torch.randperm(len(names), generator=torch.Generator().manual_seed(0))[:2000]
        images = torch.stack(
            [
                decode_jpeg(torch.frombuffer(bytearray(z.read(names[i])), dtype=torch.uint8))
                for i in pick.tolist()
            ]
        )
    pixels = images.double().div(255).transpose(0, 1).flatten(1)
    cfg = create_model("cifar_resnet20").pretrained_cfg
    torch.testing.assert_close(
        pixels.mean(1), torch.tensor(cfg["mean"]).double(), atol=0.01, rtol=0
    )
    torch.testing.assert_close(pixels.std(1), torch.tensor(cfg["std"]).double(), atol=0.01, rtol=0)


# -- torch.export and TorchScript -----------------------------------------------------------------

EXPORTED = [
    ("cifar_resnet20", {}),
    ("cifar_plain20", {}),
    ("preact_resnet18", {}),
    ("resnet50", {"layers": (1, 1, 1, 1)}),
    ("cifar_preact_resnet164", {"layers": (1, 1, 1)}),
    ("cifar_resnet20", {"ordering": "bn_after_add", "layers": (1, 1, 1)}),
    ("cifar_resnet20", {"ordering": "relu_preact", "block": "bottleneck", "layers": (1, 1, 1)}),
    # He et al. 2016 Table 1: a gate, the two constant scalings, option C on every unit, dropout
    ("cifar_resnet20", {"combine": "exclusive_gate", "layers": (1, 1, 1)}),
    ("cifar_resnet20", {"combine": "shortcut_gate", "layers": (1, 1, 1)}),
    ("cifar_resnet20", {"combine": "scale", "layers": (1, 1, 1)}),
    ("cifar_resnet20", {"combine": "scale_shortcut", "layers": (1, 1, 1)}),
    ("cifar_resnet20", {"shortcut": "C", "layers": (1, 1, 1)}),
    ("cifar_preact_resnet164", {"combine": "dropout", "layers": (1, 1, 1)}),
    ("dense_resnet10", {}),
]


def _ids(case: tuple[str, dict]) -> str:
    return case[0] + "".join(f"-{v}" for k, v in case[1].items() if k != "layers")


@pytest.mark.parametrize("case", EXPORTED, ids=_ids)
def test_torch_export_with_a_dynamic_batch(case: tuple[str, dict]) -> None:
    name, overrides = case
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    shape = (1, 8, 8) if name.startswith("dense") else tuple(_input(model).shape[1:])
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        model, (torch.randn(2, *shape),), dynamic_shapes={"x": {0: batch}}
    )
    exported = program.module()
    for n in (1, 5):
        x = torch.randn(n, *shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    # the channel check became the program's shape guard (its message is torch's own)
    with pytest.raises(Exception, match=rf"\b{shape[0]}\b"):
        exported(torch.randn(2, shape[0] + 1, *shape[1:]))


@pytest.mark.parametrize("case", EXPORTED, ids=_ids)
def test_jit_script_equals_eager(case: tuple[str, dict]) -> None:
    name, overrides = case
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    x = torch.randn(3, 1, 8, 8) if name.startswith("dense") else _input(model, 3)
    units = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in 2.12+
        scripted = torch.jit.script(model)
        features = (
            None if name.startswith("dense") else torch.jit.script(FeatureListNet(model).eval())
        )
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-5)
        if features is not None:
            for a, b in zip(features(x), FeatureListNet(model)(x), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert [type(m) for m in model.modules()] == units  # scripting left the model alone
    assert scripted.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(Exception, match="input"):
        scripted(torch.randn(2, 7, 8, 8) if name.startswith("dense") else x[:, :1])


def test_input_check_survives_fx() -> None:
    """The eager error for a wrong channel count, also from a traced graph (it used to make
    create_feature_extractor fail: control flow on the input's shape)."""
    traced = torch.fx.symbolic_trace(create_model("resnet18", in_channels=1))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*\(2, 3, 32, 32\)"):
        traced(torch.randn(2, 3, 32, 32))
    features = create_feature_extractor(create_model("resnet18"), {"layer2": "c3"})
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        features(torch.randn(2, 4, 32, 32))
    dense = create_model("dense_resnet10")
    traced_dense = torch.fx.symbolic_trace(dense)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(traced_dense(x), dense(x))
    with pytest.raises(ValueError, match="expected 64 input features"):
        traced_dense(torch.randn(2, 1, 4, 4))


def test_registered_configs_untouched_by_the_api() -> None:
    model = create_model("cifar_resnet20", features_only=True)
    assert model.config == get_config("cifar_resnet20")

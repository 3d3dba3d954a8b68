"""The model zoo against its references: torchvision, the papers' tables, the seed's formula."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from reslab import create_model, list_models
from reslab.models import (
    ORDERINGS,
    DenseConfig,
    DenseResNet,
    OrderedBasicBlock,
    PadShortcut,
    ProjectionShortcut,
    ResidualBlock,
    seed_example,
)
from reslab.summary import summarize

IMAGENET = (18, 34, 50, 101, 152)


def n_params(model: nn.Module, with_bn: bool = True) -> int:
    return sum(
        p.numel()
        for m in model.modules()
        if with_bn or not isinstance(m, nn.BatchNorm2d)
        for p in m.parameters(recurse=False)
    )


@pytest.mark.parametrize("depth", IMAGENET)
def test_torchvision_parity(depth: int) -> None:
    torch.manual_seed(depth)
    ref = getattr(torchvision.models, f"resnet{depth}")()
    ours = create_model(f"resnet{depth}", stride_in="3x3")
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
    # Same parameter count, whichever conv carries the stride.
    assert n_params(create_model(f"resnet{depth}")) == n_params(ref)


def test_create_model_from_torchvision_weights_computes_torchvision(tmp_path) -> None:
    """torchvision's bottlenecks stride the 3x3 conv: create_model(pretrained=) must build the
    model that way, or the same weights compute another function (no error, no warning)."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    path = tmp_path / "tv50.pth"
    torch.save(ref.state_dict(), path)
    ours = create_model("resnet50", pretrained=str(path)).eval()
    assert ours.config.stride_in == "3x3"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
    with pytest.warns(UserWarning, match="stride"):  # asked for the paper's 1x1: said, not hidden
        create_model("resnet50", pretrained=str(path), stride_in="1x1")


@pytest.mark.parametrize("name", ["cifar_resnet20", "dense_resnet10"])
def test_reset_classifier_keeps_dtype_and_device(name: str) -> None:
    model = create_model(name).double()
    model.reset_classifier(7)
    assert model.fc.weight.dtype == torch.float64 and model.config.num_classes == 7
    shape = (1, 8, 8) if name.startswith("dense") else (3, 32, 32)  # the digits / CIFAR
    x = torch.randn(2, *shape, dtype=torch.float64)
    assert model.eval()(x).shape == (2, 7)


def test_zero_init_residual_refuses_plain_nets() -> None:
    with pytest.raises(ValueError, match="needs a shortcut"):
        create_model("cifar_plain20", zero_init_residual=True)
    create_model("cifar_resnet20", zero_init_residual=True)  # with shortcuts it is the point


# He et al. 2015 Table 6 and He et al. 2016 Tables 3/4, in millions.
CIFAR_PARAMS = {
    "cifar_resnet20": 0.27,
    "cifar_resnet32": 0.46,
    "cifar_resnet44": 0.66,
    "cifar_resnet56": 0.85,
    "cifar_resnet110": 1.7,
    "cifar_resnet1202": 19.4,
    "cifar_plain20": 0.27,
    "cifar_plain56": 0.85,
    "cifar_preact_resnet110": 1.7,
}


@pytest.mark.parametrize(("name", "millions"), sorted(CIFAR_PARAMS.items()))
def test_cifar_param_counts(name: str, millions: float) -> None:
    digits = 1 if millions >= 1 else 2
    assert round(n_params(create_model(name)) / 1e6, digits) == millions


@pytest.mark.parametrize(
    ("name", "with_bn", "without_bn", "paper"),
    [("cifar_preact_resnet164", 1.70, 1.68, 1.7), ("cifar_preact_resnet1001", 10.33, 10.18, 10.2)],
)
def test_preact_bottleneck_param_counts(
    name: str, with_bn: float, without_bn: float, paper: float
) -> None:
    model = create_model(name)
    assert round(n_params(model) / 1e6, 2) == with_bn
    assert round(n_params(model, with_bn=False) / 1e6, 2) == without_bn
    assert round(n_params(model, with_bn=False) / 1e6, 1) == paper


# Multiply-adds at 224x224 (conv + fc), ours to 0.01 G, and Table 1's rounded figures.
MACS = {18: (1.81, 1.8), 34: (3.66, 3.6), 50: (3.86, 3.8), 101: (7.57, 7.6), 152: (11.28, 11.3)}


@pytest.mark.parametrize("depth", IMAGENET)
def test_imagenet_macs(depth: int) -> None:
    ours, paper = MACS[depth]
    macs = summarize(create_model(f"resnet{depth}"), (3, 224, 224)).macs / 1e9
    assert round(macs, 2) == ours
    assert abs(macs - paper) <= 0.1


def test_torchvision_stride_costs_more() -> None:
    macs = summarize(create_model("resnet50", stride_in="3x3"), (3, 224, 224)).macs / 1e9
    assert round(macs, 2) == 4.09


def test_resnet34_output_sizes() -> None:
    s = summarize(create_model("resnet34"), (3, 224, 224))
    sizes = [st.output_size[-1] for st in s.stages[:5]]
    assert sizes == [112, 56, 28, 14, 7]
    assert [st.name for st in s.stages] == [
        "conv1",
        "conv2_x",
        "conv3_x",
        "conv4_x",
        "conv5_x",
        "fc",
    ]
    assert s.params == sum(st.params for st in s.stages)


def test_stage_params_add_up_in_preact_nets() -> None:
    """The final BN-ReLU belongs to the last stage's row only (it was counted in every row)."""
    s = summarize(create_model("preact_resnet18"), (3, 224, 224))
    assert s.params == sum(st.params for st in s.stages)


def _input_for(name: str) -> torch.Tensor:
    if name.startswith("dense"):
        return torch.randn(3, 1, 8, 8)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = _input_for(name)
    out = model(x)
    assert out.shape == (x.shape[0], 7)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize(
    "name", ["resnet18", "cifar_resnet20", "preact_resnet50", "cifar_preact_resnet164"]
)
def test_imagenet_models_take_cifar_stem(name: str) -> None:
    model = create_model(name, stem="cifar", num_classes=10).eval()
    s = summarize(model, (3, 32, 32))
    assert s.stages[0].output_size[-1] == 32  # a 3x3/1 stem and no pooling keep 32x32
    with torch.no_grad():
        one = model(torch.randn(4, 3, 32, 32))
    assert one.shape == (4, 10)


def test_batch_of_one_equals_batch_in_eval() -> None:
    model = create_model("cifar_resnet20").eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)


def test_option_a_has_no_parameters() -> None:
    model = create_model("cifar_resnet20")
    pads = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(pads) == 2  # 16->32 and 32->64
    assert all(sum(p.numel() for p in m.parameters()) == 0 for m in pads)
    assert not any(isinstance(m, ProjectionShortcut) for m in model.modules())
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert y[:, 16:].abs().sum() == 0


def test_shortcut_options_b_and_c() -> None:
    def projections(shortcut: str) -> int:
        model = create_model("resnet18", shortcut=shortcut)
        return sum(isinstance(m, ProjectionShortcut) for m in model.modules())

    assert projections("B") == 3  # only where the shape changes
    assert projections("C") == 8  # every unit
    plain = create_model("plain18")
    assert all(u.downsample is None for u in plain.units())


@pytest.mark.parametrize("ordering", sorted(ORDERINGS))
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_residual(ordering: str, block: str) -> None:
    torch.manual_seed(0)
    model = create_model(
        "cifar_resnet20", block=block, ordering=ordering, zero_init_residual=True, shortcut="B"
    )
    model.train()
    checked = 0
    for unit in model.units():
        assert isinstance(unit, ResidualBlock)
        if unit.shape_changes or unit.shortcut_from_preact:
            continue
        x = torch.rand(4, unit.out_channels, 8, 8)  # >= 0, as after a ReLU
        y = unit(x)
        if ORDERINGS[ordering].identity_at_init:
            torch.testing.assert_close(y, x)
        else:  # BN after the addition: ReLU(BN(x)) is not x
            assert not torch.allclose(y, x, atol=1e-3)
        checked += 1
    assert checked > 0


def test_orderings_place_bn_and_relu() -> None:
    # The op lists of the generic unit; the explicit blocks the registered models use have none
    # (tests/test_blocks.py shows both compute the same).
    orig = OrderedBasicBlock(16, 16, ordering="original", shortcut=nn.Identity())
    assert orig.ops == ["conv1", "bn1", "act", "conv2", "bn2"] and orig.after_add == ["act"]
    pre = OrderedBasicBlock(16, 16, ordering="full_preact", shortcut=nn.Identity())
    assert pre.preact_ops == ["bn1", "act"]
    assert pre.ops == ["conv1", "bn2", "act", "conv2"] and pre.after_add == []
    bn_after = create_model("cifar_resnet20", ordering="bn_after_add").layer1[0]
    assert bn_after.after_add == ["bn2", "act"]


def test_preact_model_structure() -> None:
    model = create_model("cifar_preact_resnet164")
    assert model.bn1 is None and model.final_bn is not None and model.final_act
    first = model.layer1[0]
    # He et al. 2016, appendix: the first unit's activation is shared by both paths.
    assert first.shortcut_from_preact
    assert isinstance(first.downsample, ProjectionShortcut) and len(first.downsample) == 1


def test_stride_placement() -> None:
    paper = create_model("resnet50").layer2[0]
    v15 = create_model("resnet50", stride_in="3x3").layer2[0]
    assert paper.conv1.stride == (2, 2) and paper.conv2.stride == (1, 1)
    assert v15.conv1.stride == (1, 1) and v15.conv2.stride == (2, 2)


def test_forward_features_and_reset_classifier() -> None:
    model = create_model("resnet50")
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 2048, 2, 2)
    model.reset_classifier(5)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert model.config.num_classes == 5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ordering": "sideways"}, "full_preact"),
        ({"shortcut": "D"}, "'A'"),
        ({"stem": "tiny"}, "imagenet"),
        ({"stride_in": "2x2"}, "3x3"),
        ({"depth": 3}, "valid options"),
    ],
)
def test_bad_options_list_valid_choices(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        create_model("resnet18", **kwargs)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnet51")


def test_wrong_input_channels_names_shapes() -> None:
    model = create_model("resnet18", in_channels=1)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*\(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))


def test_no_inplace_ops() -> None:
    model = create_model("resnet50")
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_list_models_pattern() -> None:
    assert list_models("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert "cifar_preact_resnet1001" in list_models("cifar_preact*")


# ---- dense residual networks (seed 000) ------------------------------------------------------


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_seed_example_gradient_matches_product_formula(activation: str) -> None:
    """dL/dW0 = dL/dy3 (1 + da3/dy2)(1 + da2/dy1) dy1/dW0 with L = y3 (seed 000)."""
    net = seed_example(activation)
    w = [float(v) for v in (0.7, -1.3, 0.4)]
    with torch.no_grad():
        for layer, wi in zip(net.layers, w, strict=True):
            layer.linear.weight.fill_(wi)
    y0 = torch.tensor([[0.9]])
    y3 = net(y0)
    y3.sum().backward()
    autograd = net.layers[0].linear.weight.grad.item()

    sig = torch.sigmoid if activation == "sigmoid" else torch.tanh

    def dsig(z: float) -> float:
        s = sig(torch.tensor(z)).item()
        return s * (1 - s) if activation == "sigmoid" else 1 - s * s

    a = 0.9
    y1 = a + sig(torch.tensor(w[0] * a)).item()
    y2 = y1 + sig(torch.tensor(w[1] * y1)).item()
    dy1_dw0 = dsig(w[0] * a) * a
    da2_dy1 = dsig(w[1] * y1) * w[1]
    da3_dy2 = dsig(w[2] * y2) * w[2]
    formula = 1.0 * (1 + da3_dy2) * (1 + da2_dy1) * dy1_dw0
    assert autograd == pytest.approx(formula, rel=1e-6)

    # The plain version: the product loses its identity terms.
    plain = seed_example(activation, residual=False)
    with torch.no_grad():
        for layer, wi in zip(plain.layers, w, strict=True):
            layer.linear.weight.fill_(wi)
    plain(y0).sum().backward()
    p1 = sig(torch.tensor(w[0] * a)).item()
    p2 = sig(torch.tensor(w[1] * p1)).item()
    plain_formula = dsig(w[2] * p2) * w[2] * dsig(w[1] * p1) * w[1] * dsig(w[0] * a) * a
    assert plain.layers[0].linear.weight.grad.item() == pytest.approx(plain_formula, rel=1e-6)


def test_dense_projection_and_tau_modes() -> None:
    cfg = DenseConfig(widths=(64, 32, 32), tau_mode="schedule", tau_schedule=(0.5, 0.25))
    net = DenseResNet(cfg)
    assert isinstance(net.layers[0].proj, nn.Linear) and isinstance(net.layers[1].proj, nn.Identity)
    assert [layer.tau.item() for layer in net.layers] == [0.5, 0.25]
    assert not any("tau" in n for n, _ in net.named_parameters())

    rezero = DenseResNet(DenseConfig.uniform(8, 8, 5, tau=0.0, tau_mode="learnable", num_classes=0))
    x = torch.randn(4, 8)
    torch.testing.assert_close(rezero(x), x)  # ReZero: the identity at initialisation
    rezero(x).sum().backward()
    assert all(layer.tau.grad is not None for layer in rezero.layers)


def test_dense_weight_outside_and_plain() -> None:
    torch.manual_seed(0)
    net = DenseResNet(DenseConfig.uniform(4, 4, 1, weight_outside=True, tau=0.5, num_classes=0))
    layer = net.layers[0]
    y = torch.randn(3, 4)
    expected = y + 0.5 * (torch.tanh(y) @ layer.linear.weight.T + layer.linear.bias)
    torch.testing.assert_close(net(y), expected)
    plain = DenseResNet(DenseConfig.uniform(4, 4, 1, residual=False, num_classes=0))
    pl = plain.layers[0].linear
    torch.testing.assert_close(plain(y), torch.tanh(y @ pl.weight.T + pl.bias))


def test_readme_model_table_is_current() -> None:
    """The README's table is what `reslab list --details` prints now."""
    from pathlib import Path

    from reslab.commands.summary import model_table

    text = (Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("<!-- model-table:start -->") + len("<!-- model-table:start -->")
    end = text.index("<!-- model-table:end -->")
    assert text[start:end].strip() == model_table()

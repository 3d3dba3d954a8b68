"""The residual units: explicit blocks against the op-list unit, the analysis interface, the
norm option and the one CIFAR builder."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from reslab.models import (
    BLOCKS,
    NORMS,
    ORDERINGS,
    BasicBlock,
    Bottleneck,
    OrderedBasicBlock,
    OrderedBlock,
    OrderedBottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualBlock,
    ResNet,
    ResNetConfig,
    cifar_config,
    create_model,
    get_config,
    make_block,
    make_shortcut,
)

pytestmark = pytest.mark.usefixtures("one_thread")


EXPLICIT = {
    ("basic", "original"): (BasicBlock, OrderedBasicBlock),
    ("bottleneck", "original"): (Bottleneck, OrderedBottleneck),
    ("basic", "full_preact"): (PreActBasicBlock, OrderedBasicBlock),
    ("bottleneck", "full_preact"): (PreActBottleneck, OrderedBottleneck),
}
# (in_channels, width, stride, shortcut option, first_unit)
SHAPES = [
    (16, 16, 1, "A", False),  # identity shortcut
    (16, 16, 1, "A", True),  # the first unit: pre-activation nets share BN-ReLU with h
    (16, 32, 2, "A", False),  # zero padding
    (16, 32, 2, "B", False),  # projection
    (32, 32, 1, "C", False),  # projection without a shape change
    (16, 16, 1, "none", False),  # plain unit
    (16, 32, 2, "none", False),  # plain unit changing the shape
]


def _pair(block: str, ordering: str, shape: tuple) -> tuple[ResidualBlock, OrderedBlock]:
    """The explicit block and the op-list unit of one configuration, with the same weights."""
    c_in, width, stride, option, first = shape
    explicit_cls, ordered_cls = EXPLICIT[block, ordering]
    expansion = explicit_cls.expansion
    preact = bool(ORDERINGS[ordering].preact)

    def shortcut() -> nn.Module | None:
        norm = None if preact else nn.BatchNorm2d
        return make_shortcut(option, c_in, width * expansion, stride, norm_layer=norm)

    kw = {"first_unit": first} if preact else {}
    explicit = explicit_cls(c_in, width, stride, shortcut=shortcut(), **kw)
    ordered = ordered_cls(
        c_in, width, stride, ordering=ordering, shortcut=shortcut(), first_unit=first
    )
    # random BN statistics and affine parameters, so every BN matters
    with torch.no_grad():
        for m in explicit.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    ordered.load_state_dict(explicit.state_dict(), strict=True)  # same keys, same shapes
    assert list(ordered.state_dict()) == list(explicit.state_dict())
    return explicit, ordered


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("key", sorted(EXPLICIT), ids="-".join)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_op_list_unit_computes_what_the_explicit_block_computes(key, shape, train) -> None:
    """He et al. 2016 Fig. 4(a) and (e) two ways: the op-list unit configured as "original" /
    "full_preact" and the explicit blocks give the same outputs and gradients, bit for bit."""
    torch.manual_seed(0)
    explicit, ordered = _pair(*key, shape)
    explicit.train(train), ordered.train(train)
    x = torch.randn(3, shape[0], 8, 8)
    outs, grads = [], []
    for unit in (explicit, ordered):
        xi = x.clone().requires_grad_()
        y = unit(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in unit.parameters()])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert explicit.shortcut_from_preact == ordered.shortcut_from_preact
    assert [n for n, _ in explicit.branch_norms()] == [n for n, _ in ordered.branch_norms()]
    names = dict(explicit.named_modules())
    assert (
        explicit.last_branch_layer()
        is names[next(n for n, m in ordered.named_modules() if m is ordered.last_branch_layer())]
    )


def test_registered_models_use_the_explicit_blocks_and_ablations_the_op_lists() -> None:
    assert isinstance(create_model("cifar_resnet20").layer1[0], BasicBlock)
    assert isinstance(create_model("resnet50").layer1[0], Bottleneck)
    assert isinstance(create_model("cifar_preact_resnet110").layer1[0], PreActBasicBlock)
    assert isinstance(create_model("cifar_preact_resnet164").layer1[0], PreActBottleneck)
    for ordering in ("bn_after_add", "relu_before_add", "relu_preact"):
        unit = create_model("cifar_resnet20", ordering=ordering).layer2[0]
        assert isinstance(unit, OrderedBasicBlock) and unit.ordering is ORDERINGS[ordering]
    assert set(BLOCKS) == set(EXPLICIT)


def _units_of_every_kind() -> list[tuple[str, ResidualBlock]]:
    units = []
    for block in ("basic", "bottleneck"):
        for ordering in ORDERINGS:
            for option in ("A", "B", "C"):
                cfg = ResNetConfig(
                    block=block,
                    layers=(1, 1),
                    widths=(8, 16),
                    stem="cifar",
                    stem_width=8,
                    ordering=ordering,
                    shortcut=option,
                    num_classes=3,
                )
                for j, unit in enumerate(ResNet(cfg).units()):
                    units.append((f"{block}-{ordering}-{option}-{j}", unit))
    return units


@pytest.mark.parametrize(("name", "unit"), _units_of_every_kind(), ids=lambda v: str(v)[:40])
def test_deleting_the_branch_equals_a_zeroed_branch(name: str, unit: ResidualBlock) -> None:
    """forward_without_branch (what a lesion leaves, Veit et al. 2016) is the unit's own output
    once zero_init_last has made F = 0, in every ordering and with every shortcut."""
    torch.manual_seed(0)
    unit.eval()
    x = torch.randn(2, unit.in_channels, 8, 8)
    assert unit.can_delete_branch()
    without = unit.forward_without_branch(x)
    unit.zero_init_last()
    torch.testing.assert_close(unit(x), without, rtol=0, atol=1e-6)
    assert unit.forward_without_branch(x).shape == unit(x).shape


def test_plain_units_delete_to_the_identity_only_where_the_shape_stays() -> None:
    model = create_model("cifar_plain20")
    same, change = model.layer1[1], model.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    assert same.can_delete_branch() and torch.equal(same.forward_without_branch(x), x)
    assert not change.can_delete_branch()
    with pytest.raises(ValueError, match="cannot be deleted"):
        change.forward_without_branch(x)


def test_branch_norms_are_the_responses_of_fig_7() -> None:
    """He et al. 2015 Fig. 7: each weight layer's output after BN. Post-activation units have a
    BN after every conv of F; full pre-activation ones after all but the last (their bn1
    normalises the unit's input)."""
    assert [n for n, _ in create_model("cifar_resnet20").layer1[0].branch_norms()] == [
        "bn1",
        "bn2",
    ]
    assert [n for n, _ in create_model("resnet50").layer1[0].branch_norms()] == [
        "bn1",
        "bn2",
        "bn3",
    ]
    pre = create_model("cifar_preact_resnet164").layer1[0]
    assert [n for n, _ in pre.branch_norms()] == ["bn2", "bn3"]
    assert pre.last_branch_layer() is pre.conv3


def test_jit_script_compiles_the_explicit_blocks_as_written() -> None:
    """torch.jit.script used to fail in blocks.py (modules looked up by computed names)."""
    torch.manual_seed(0)
    for unit in (
        create_model("cifar_resnet20").layer2[0].eval(),
        create_model("resnet50", layers=(1, 1, 1, 1)).layer1[0].eval(),
        create_model("cifar_preact_resnet110").layer1[0].eval(),
        create_model("cifar_plain20").layer1[0].eval(),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in 2.12+
            scripted = torch.jit.script(unit)
        assert "forward" in scripted.code  # compiled from the block's own source, not a trace
        x = torch.randn(2, unit.in_channels, 8, 8)
        torch.testing.assert_close(scripted(x), unit(x), rtol=0, atol=1e-6)


# -- the norm option ------------------------------------------------------------------------------


def _strip_batchnorm(model: nn.Module) -> nn.Module:
    """What the gradient-flow experiment did before the norm option: BN replaced by identity."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            _strip_batchnorm(child)
    return model


@pytest.mark.parametrize(
    "name", ["cifar_plain20", "cifar_resnet20", "cifar_preact_resnet110", "resnet50"]
)
def test_norm_none_is_the_stripped_network(name: str) -> None:
    """norm="none" builds the network that stripping every BN out of a built one gave: same
    weights from the same seed, same outputs (so the same gradient-flow numbers)."""
    small = {"layers": (1, 1, 1, 1) if name == "resnet50" else (2, 2, 2)}
    torch.manual_seed(0)
    ours = create_model(name, norm="none", **small)
    torch.manual_seed(0)
    stripped = _strip_batchnorm(create_model(name, **small))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert ours.state_dict().keys() == stripped.state_dict().keys()
    for k, v in stripped.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x), stripped(x))


def test_norm_none_with_zero_init_zeroes_the_last_conv() -> None:
    model = create_model("cifar_resnet20", norm="none", zero_init_residual=True)
    unit = model.layer1[0]
    assert unit.last_branch_layer() is unit.conv2 and not unit.conv2.weight.any()


def test_bad_norm_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'batch', 'none'"):
        create_model("resnet18", norm="layer")
    assert set(NORMS) == {"batch", "none"}


# -- the CIFAR builder ----------------------------------------------------------------------------


def test_one_cifar_builder_behind_the_zoo_and_the_experiments() -> None:
    from reslab.analysis.gradflow import conv_model
    from reslab.analysis.training import cifar_net

    for depth in (20, 32, 44, 56, 110, 1202):
        assert get_config(f"cifar_resnet{depth}") == cifar_config(depth)
    assert get_config("cifar_preact_resnet164") == cifar_config(
        164, block="bottleneck", ordering="full_preact"
    )
    assert cifar_net(56, residual=False).config == get_config("cifar_plain56")
    assert conv_model("preact", 110).config == get_config("cifar_preact_resnet110")
    assert conv_model("plain", 20, norm=False).config == get_config("cifar_plain20", norm="none")


@pytest.mark.parametrize(
    ("depth", "block", "needle"),
    [(21, "basic", "6n\\+2"), (0, "basic", "6n\\+2"), (100, "bottleneck", "9n\\+2")],
)
def test_cifar_depth_is_checked_in_one_place(depth: int, block: str, needle: str) -> None:
    from reslab.analysis.gradflow import conv_model
    from reslab.analysis.training import cifar_net

    with pytest.raises(ValueError, match=f"{needle}.*got depth {depth}"):
        cifar_config(depth, block=block)
    if block == "basic":
        for build in (cifar_net, lambda d: conv_model("resnet", d)):
            with pytest.raises(ValueError, match=f"{needle}.*got depth {depth}"):
                build(depth)


def test_make_block_builds_the_unit_a_config_names() -> None:
    cfg = get_config("resnet50", stride_in="3x3")
    unit = make_block(cfg, 64, 64, 1, first_unit=True)
    assert isinstance(unit, Bottleneck) and unit.out_channels == 256
    assert unit.conv2.stride == (1, 1) and unit.downsample is not None
    down = make_block(cfg, 256, 128, 2)
    assert down.conv1.stride == (1, 1) and down.conv2.stride == (2, 2)  # "v1.5"

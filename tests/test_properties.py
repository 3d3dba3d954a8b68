"""Property tests of the building blocks over many shapes (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reslab import ResNetConfig, build_model, get_config, list_models
from reslab.models import ORDERINGS, SHORTCUTS, PadShortcut
from reslab.models.zoo import MODELS


@settings(max_examples=30, deadline=None)
@given(
    c_in=st.integers(1, 8),
    extra=st.integers(0, 8),
    stride=st.sampled_from([1, 2]),
    side=st.integers(1, 9),
)
def test_pad_shortcut_is_identity_on_kept_channels(c_in: int, extra: int, stride: int, side: int):
    x = torch.randn(2, c_in, side, side)
    y = PadShortcut(c_in, c_in + extra, stride)(x)
    out_side = (side + stride - 1) // stride
    assert y.shape == (2, c_in + extra, out_side, out_side)
    torch.testing.assert_close(y[:, :c_in], x[:, :, ::stride, ::stride])
    assert not y[:, c_in:].any()


@settings(max_examples=15, deadline=None)
@given(
    block=st.sampled_from(["basic", "bottleneck"]),
    ordering=st.sampled_from(sorted(ORDERINGS)),
    shortcut=st.sampled_from(sorted(SHORTCUTS)),
    layers=st.lists(st.integers(1, 2), min_size=1, max_size=3),
    side=st.sampled_from([8, 12, 16]),
    in_channels=st.integers(1, 4),
)
def test_any_config_builds_and_keeps_shapes(block, ordering, shortcut, layers, side, in_channels):
    cfg = ResNetConfig(
        block=block,
        layers=tuple(layers),
        widths=tuple(4 * 2**i for i in range(len(layers))),
        stem="cifar",
        stem_width=4,
        ordering=ordering,
        shortcut=shortcut,
        num_classes=3,
        in_channels=in_channels,
    )
    model = build_model(cfg).eval()
    x = torch.randn(2, in_channels, side, side)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    expansion = 4 if block == "bottleneck" else 1
    assert feats.shape[:2] == (2, 4 * 2 ** (len(layers) - 1) * expansion)
    assert out.shape == (2, 3)
    assert cfg.depth == 2 + (2 if block == "basic" else 3) * sum(layers)


def test_configs_round_trip_through_json() -> None:
    import json

    for name in list_models():
        cfg = get_config(name)
        assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert MODELS[name] == cfg  # the registry itself is never mutated

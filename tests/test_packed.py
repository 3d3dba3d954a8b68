"""Seed-packed training: K members in one wide network are exactly K separate runs.

The strict comparisons run in float64, where rounding cannot hide a coupling between members: a
wrong weight-decay group or a shared statistic would show far above 1e-9. The float32 comparison
against the trainer itself (``fit``) checks the data order and the recipe; there the tolerance is
set by how much float32 rounding grows in a few steps of SGD at lr 0.1 (the same run computed
NCHW and channels_last differs by up to 6e-4 in the loss after 5 steps, measured).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.data import DataSplits, Normalize
from reslab.data.feed import endless
from reslab.data.training import MemoryData
from reslab.models import DenseConfig, ResNetConfig, build_model, get_config
from reslab.models.packed import (
    PACKERS,
    GroupedLinear,
    PackedNet,
    build_packed,
    pack,
    pack_inputs,
    unpack,
    unpack_state_dicts,
)
from reslab.train import TrainConfig, fit, learning_rate
from reslab.train.captured import TrainStep, lr_table
from reslab.train.checkpoint import load_model, model_record, save_checkpoint
from reslab.train.packed import (
    WARMUP_WINDOW,
    MemberBatches,
    MemberState,
    PackedSGD,
    member_finite,
    member_losses,
    member_optimizer_states,
)
from reslab.train.schedule import wants_warmup

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions on a shared 2-core machine: a second thread only waits (20x slower
    under load, measured), as the digits recipe notes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# post-activation with option A (zero-padding) shortcuts; full pre-activation with option B
# projections (the projection takes the pre-activated input); a pre-activation bottleneck
# striding its 3x3 ("v1.5")
NETS = {
    "resnet20_A": ("cifar_resnet20", {}),
    "preact_B": ("cifar_preact_resnet110", {"layers": (1, 1, 1), "shortcut": "B"}),
    "preact_bottleneck_3x3": ("cifar_preact_resnet164", {"layers": (1, 1, 1), "stride_in": "3x3"}),
}
# and for the forward/backward check: the ImageNet stem (max-pool) with strided 1x1 bottlenecks
ALL_NETS = {
    **NETS,
    "imagenet_bottleneck": ("resnet50", {"layers": (1, 1, 1, 1), "widths": (4, 8, 8, 8),
                                         "stem_width": 8}),
    # He et al. 2016 Table 1: the constant scaling and the two gates (1x1 conv + sigmoid)
    "scale": ("cifar_resnet20", {"layers": (1, 1, 1), "combine": "scale"}),
    "exclusive_gate": ("cifar_resnet20", {"layers": (1, 1, 1), "combine": "exclusive_gate"}),
    "shortcut_gate_B": ("cifar_resnet20", {"layers": (1, 1, 1), "combine": "shortcut_gate",
                                           "shortcut": "B"}),
}  # fmt: skip


@pytest.fixture(scope="module")
def splits(class_shifted: DataSplits) -> DataSplits:
    return class_shifted


def _config(net: str) -> ResNetConfig:
    name, overrides = ALL_NETS[net]
    cfg = get_config(name, num_classes=10, **overrides)
    assert isinstance(cfg, ResNetConfig)
    return cfg


def _train_cfg(**kw: object) -> TrainConfig:
    """The paper's SGD (momentum 0.9, weight decay 1e-4 on everything) in a short run."""
    base = {"iters": 5, "batch_size": 16, "pad": 1, "eval_every": 5, "eval_test": False,
            "warmup": "none"}  # fmt: skip
    return TrainConfig.preset("paper", **{**base, **kw})


def _groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trainer's parameter groups (reslab.train.loop._optimizer): decay split by rank."""
    params = list(model.parameters())
    if cfg.decay_all:
        return [{"params": params}]
    return [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _members(cfg: ResNetConfig, dtype: torch.dtype = torch.float32) -> list[nn.Module]:
    """Each member as ``reslab train --seed S`` initialises it."""
    models = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        models.append(build_model(cfg).to(dtype))
    return models


def _separate_runs(
    models: list[nn.Module],
    splits: DataSplits,
    cfg: TrainConfig,
    *,
    steps: int,
    dtype: torch.dtype,
    poison: tuple[int, int] | None = None,
) -> list[dict]:
    """K ordinary runs, each as the trainer runs it (reslab.train.loop.fit, step for step): the
    training batches of its seed, torch.optim.SGD, the warm-up rule. ``poison=(member, step)``
    makes that member's batch NaN at that step; the run then stops before the optimiser step,
    as a run of its own does."""
    norm = Normalize.fit(splits.train.images, cfg.normalize)
    b = cfg.batch_size
    out = []
    for m, (model, seed) in enumerate(zip(models, SEEDS, strict=True)):
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)  # fmt: skip
        batches = endless(MemberBatches.of(MemoryData(splits), [seed], cfg))
        warming = wants_warmup(cfg, model.config.depth)
        recent: list[float] = []
        losses: list[float] = []
        left_warmup = None
        for step in range(steps):
            x, y = next(batches)
            x, y = norm(x).to(dtype), y[:, 0]
            if poison == (m, step):
                x = torch.full_like(x, math.nan)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = learning_rate(step, steps, cfg, warming_up=warming)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not math.isfinite(loss.item()):
                break  # NonFiniteLossError: before the optimiser step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if warming:  # reslab.train.loop: the mean error of the last WARMUP_WINDOW batches
                recent = [*recent[-WARMUP_WINDOW + 1 :], float((logits.argmax(1) != y).sum()) / b]
                if len(recent) == WARMUP_WINDOW and sum(recent) / WARMUP_WINDOW < cfg.warmup_error:
                    warming, left_warmup = False, step
        out.append({"model": model, "optimizer": opt, "losses": losses, "left_warmup": left_warmup})
    return out


def _packed_run(
    packed: PackedNet,
    splits: DataSplits,
    cfg: TrainConfig,
    *,
    steps: int,
    dtype: torch.dtype,
    poison: tuple[int, int] | None = None,
) -> dict:
    """The packed network trained by the trainer's step (TrainStep, members=K) on MemberBatches;
    ``poison=(member, step)`` makes that member's batch NaN at that step."""
    if cfg.channels_last:
        packed.to(memory_format=torch.channels_last)
    k = packed.members
    opt = torch.optim.SGD(_groups(packed, cfg), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)  # fmt: skip
    norm = Normalize.fit(splits.train.images, cfg.normalize)
    packed_norm = Normalize(norm.mode, norm.mean.repeat(k, 1, 1), norm.std.repeat(k, 1, 1))
    batches = endless(MemberBatches.of(MemoryData(splits), SEEDS, cfg))
    state = MemberState.create(k, warmup=wants_warmup(cfg, packed.config.depth))
    at = [0]

    def inputs(images: Tensor) -> Tensor:
        x = packed_norm(images).to(dtype)
        if poison is not None and poison[1] == at[0]:
            c = packed.config.in_channels
            x[:, poison[0] * c : (poison[0] + 1) * c] = math.nan
        return x

    step = TrainStep(
        packed, opt, members=k, rates=lr_table(lambda s: learning_rate(s, steps, cfg), steps),
        state=state, norm=inputs, capacity=steps, warmup_lr=cfg.warmup_lr,
        warmup_error=cfg.warmup_error, label_smoothing=cfg.label_smoothing,
        channels_last=cfg.channels_last,
    )  # fmt: skip
    left: list[int | None] = [None] * k
    for s in range(steps):
        at[0] = s
        was = state.warming.clone()
        step(*next(batches))
        for m in range(k):
            if was[m] and not state.warming[m]:
                left[m] = s
    report = step.read()
    stats = torch.tensor([report.losses, report.wrong], dtype=torch.float64).transpose(0, 1)
    return {"optimizer": opt, "stats": stats, "state": state, "left_warmup": left}


def _assert_state_close(packed: PackedNet, models: list[nn.Module], **tol: float) -> None:
    for m, (state, model) in enumerate(zip(unpack_state_dicts(packed), models, strict=True)):
        ref = model.state_dict()
        assert state.keys() == ref.keys()
        for key, t in ref.items():
            torch.testing.assert_close(
                state[key], t, **tol, msg=lambda s, m=m, k=key: f"{m} {k}: {s}"
            )


# -- the model ---------------------------------------------------------------------------------
def test_build_packed_initialises_members_as_reslab_train() -> None:
    cfg = _config("resnet20_A")
    packed = build_packed(cfg, SEEDS)
    for state, model in zip(unpack_state_dicts(packed), _members(cfg), strict=True):
        for key, t in model.state_dict().items():
            assert torch.equal(state[key], t), key
    # the caller's random state is left alone
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_packed(cfg, SEEDS)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("net", list(ALL_NETS))
def test_packed_forward_and_gradients_equal_the_members(net: str) -> None:
    cfg = _config(net)
    models = _members(cfg)
    packed = pack(models, seeds=SEEDS)
    g = torch.Generator().manual_seed(5)
    side = 64 if cfg.stem == "imagenet" else 16  # stage 4 at 2x2: BN over 24 values, not 6
    xs = [torch.randn(6, 3, side, side, generator=g) for _ in SEEDS]
    ys = torch.randint(0, 10, (6, len(SEEDS)), generator=g)
    logits = packed(pack_inputs(xs))
    assert logits.shape == (6, 3, 10)
    losses = member_losses(logits, ys)
    losses.sum().backward()
    for m, (model, x) in enumerate(zip(models, xs, strict=True)):
        ref = model(x)
        loss = F.cross_entropy(ref, ys[:, m])
        loss.backward()
        torch.testing.assert_close(logits[:, m], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(losses[m], loss, rtol=1e-5, atol=1e-6)
        grads = dict(model.named_parameters())
        for name, p in packed.body.named_parameters():
            assert p.grad is not None
            ref_grad = grads[name].grad
            assert ref_grad is not None
            # float32 sums over thousands of positions: tolerance relative to the tensor's scale
            scale = float(ref_grad.abs().max())
            torch.testing.assert_close(p.grad.chunk(3, 0)[m], ref_grad, rtol=1e-4,
                                       atol=1e-5 * scale)  # fmt: skip
    # BN statistics of the train-mode forward are per member
    _assert_state_close(packed, models, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("net", "overrides"),
    [
        ("resnet20_A", {}),  # the paper's recipe
        ("preact_B", {"nesterov": True, "decay_all": False, "label_smoothing": 0.1}),
        ("preact_bottleneck_3x3", {"channels_last": True, "weight_decay": 5e-3}),
        ("exclusive_gate", {}),  # He et al. 2016 Table 1: each member's gate and b_g its own
    ],
)
def test_packed_training_equals_separate_runs(splits, net: str, overrides: dict) -> None:
    """Five SGD steps with momentum, weight decay and train-mode BN, each member with its own
    data order and augmentation: parameters, BN statistics, momentum and losses agree in float64
    to rounding."""
    cfg, tcfg = _config(net), _train_cfg(**overrides)
    runs = _separate_runs(_members(cfg, torch.float64), splits, tcfg, steps=5, dtype=torch.float64)
    packed = pack(_members(cfg, torch.float64), seeds=SEEDS)
    result = _packed_run(packed, splits, tcfg, steps=5, dtype=torch.float64)
    losses = torch.tensor([r["losses"] for r in runs], dtype=torch.float64).T
    torch.testing.assert_close(result["stats"][:, 0], losses, rtol=1e-9, atol=1e-10)
    _assert_state_close(packed, [r["model"] for r in runs], rtol=1e-8, atol=1e-10)
    states = member_optimizer_states(result["optimizer"].state_dict(), 3)
    for state, run in zip(states, runs, strict=True):
        ref = run["optimizer"].state_dict()["state"]
        for idx, s in ref.items():
            torch.testing.assert_close(state["state"][idx]["momentum_buffer"],
                                       s["momentum_buffer"], rtol=1e-8, atol=1e-10)  # fmt: skip


def test_packed_training_matches_the_trainer(splits) -> None:
    """Against ``fit`` itself (float32): the members draw the trainer's batches, and the packed
    step trains as its step does. The first step's losses agree to rounding; later ones to the
    rounding that training amplifies (see the module docstring)."""
    cfg, tcfg = _config("resnet20_A"), _train_cfg(iters=3, eval_every=3)
    fits = []
    for seed, model in zip(SEEDS, _members(cfg), strict=True):
        fits.append(fit(model, splits, dataclasses.replace(tcfg, seed=seed), verbose=False))
    packed = build_packed(cfg, SEEDS)
    result = _packed_run(packed, splits, tcfg, steps=3, dtype=torch.float32)
    losses = torch.tensor([f.losses for f in fits], dtype=torch.float64).T
    torch.testing.assert_close(result["stats"][0, 0], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["stats"][:, 0], losses, rtol=1e-3, atol=1e-4)
    _assert_state_close(packed, [f.model for f in fits], rtol=1e-3, atol=1e-3)


def test_warmup_ends_at_each_members_own_step(splits) -> None:
    """He et al. 2015 §4.2: lr 0.01 until the member's training error is below the threshold,
    then 0.1, per member; the packed run leaves warm-up at the steps the separate runs do."""
    cfg = _config("resnet20_A")
    tcfg = _train_cfg(iters=16, warmup="error", warmup_error=0.88)
    runs = _separate_runs(_members(cfg, torch.float64), splits, tcfg, steps=16, dtype=torch.float64)
    left = [r["left_warmup"] for r in runs]
    assert None not in left and len(set(left)) > 1, (
        f"members should leave at different steps: {left}"
    )
    packed = pack(_members(cfg, torch.float64), seeds=SEEDS)
    result = _packed_run(packed, splits, tcfg, steps=16, dtype=torch.float64)
    assert result["left_warmup"] == left
    _assert_state_close(packed, [r["model"] for r in runs], rtol=1e-8, atol=1e-10)


def test_member_state_warmup_rule() -> None:
    """The window rule alone: 10 batches of 32, threshold 0.8 -> fewer than 256 wrong."""
    cfg = _train_cfg(warmup="error", warmup_error=0.8)
    state = MemberState.create(2, warmup=True)
    for step in range(WARMUP_WINDOW - 1):  # under the threshold, but the window is not full
        state.observe_errors(
            torch.tensor([0, 32]), step, batch_size=32, warmup_error=cfg.warmup_error
        )
        assert state.warming.tolist() == [True, True]
    state.observe_errors(
        torch.tensor([0, 32]), WARMUP_WINDOW - 1, batch_size=32, warmup_error=cfg.warmup_error
    )
    assert state.warming.tolist() == [False, True]
    # exactly 80 % wrong is not "below 80 %"; one image fewer is
    state = MemberState.create(1, warmup=True)
    for step, wrong in enumerate([26] * 9 + [22]):  # 256 wrong of 320
        state.observe_errors(
            torch.tensor([wrong]), step, batch_size=32, warmup_error=cfg.warmup_error
        )
    assert state.warming.tolist() == [True]
    state.observe_errors(
        torch.tensor([21]), 10, batch_size=32, warmup_error=cfg.warmup_error
    )  # window: 9x26 + 22 + 21
    assert state.warming.tolist() == [False]
    both = MemberState.create(2, warmup=True)
    both.warming[1] = False
    rate = both.learning_rate(torch.tensor([0.1], dtype=torch.float64), cfg.warmup_lr)
    assert rate.dtype == torch.float64 and rate.tolist() == [cfg.warmup_lr, 0.1]


def test_nonfinite_member_is_masked_and_the_others_continue(splits) -> None:
    """A NaN batch for member 1 at step 2: that member fails there and keeps the weights a
    separate run stops with (before the optimiser step); members 0 and 2 train on exactly as
    their own runs, and nothing non-finite reaches any parameter."""
    cfg, tcfg = _config("resnet20_A"), _train_cfg()
    runs = _separate_runs(_members(cfg, torch.float64), splits, tcfg, steps=5,
                          dtype=torch.float64, poison=(1, 2))  # fmt: skip
    assert len(runs[1]["losses"]) == 2 and len(runs[0]["losses"]) == 5
    packed = pack(_members(cfg, torch.float64), seeds=SEEDS)
    result = _packed_run(packed, splits, tcfg, steps=5, dtype=torch.float64, poison=(1, 2))
    state = result["state"]
    assert state.alive.tolist() == [True, False, True]
    assert state.failed_step.tolist() == [-1, 2, -1]
    assert math.isnan(result["stats"][2, 0, 1])
    members = unpack_state_dicts(packed)
    for m, run in enumerate(runs):
        ref = run["model"].state_dict()
        for key, p in run["model"].named_parameters():
            assert torch.isfinite(members[m][key]).all(), (m, key)
            torch.testing.assert_close(members[m][key], p.detach(), rtol=1e-8, atol=1e-10)
        if m != 1:  # the failed member's BN statistics saw the NaN batch, as its run's did
            for key in ref:
                torch.testing.assert_close(members[m][key], ref[key], rtol=1e-8, atol=1e-10)
    assert member_finite(packed).tolist() == [True, False, True]  # its running stats


def test_packed_sgd_is_torch_sgd_per_member() -> None:
    """Random gradients, two groups (one with an lr_scale, one without decay), Nesterov and
    dampening variants: each member's slice moves bit for bit as torch.optim.SGD moves its own
    tensors; a member lr scale of 0.1 is a member trained at a tenth of the rate."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (10, 7)]
    k = 3
    for nesterov, dampening in ((False, 0.0), (True, 0.0), (False, 0.3)):
        members = [[torch.randn(s, generator=g) for s in shapes] for _ in range(k)]
        packed = [torch.cat([m[i] for m in members]).requires_grad_() for i in range(len(shapes))]
        kw = dict(momentum=0.9, nesterov=nesterov, dampening=dampening, weight_decay=1e-2)
        opt = PackedSGD([{"params": packed[:2]}, {"params": packed[2:], "weight_decay": 0.0}],
                        members=k, lr=0.1, **kw)  # fmt: skip
        refs = []
        for m in range(k):
            ps = [t.clone().requires_grad_() for t in members[m]]
            refs.append((ps, torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:],
                         "weight_decay": 0.0}], lr=0.1, **kw)))  # fmt: skip
        scale = torch.tensor([1.0, 0.1, 1.0], dtype=torch.float64)
        for step in range(4):
            grads = [torch.randn((k * s[0], *s[1:]), generator=g) for s in shapes]
            for p, gr in zip(packed, grads, strict=True):
                p.grad = gr.clone()
            opt.param_groups[0]["lr"] = 0.1 * 0.5  # an lr_scale, as the trainer applies it
            opt.param_groups[1]["lr"] = 0.1
            opt.step(member_lr_scale=scale)
            for m, (ps, ref) in enumerate(refs):
                for p, gr in zip(ps, grads, strict=True):
                    p.grad = gr.chunk(k)[m].clone()
                ref.param_groups[0]["lr"] = 0.1 * 0.5 * float(scale[m])
                ref.param_groups[1]["lr"] = 0.1 * float(scale[m])
                ref.step()
                for p, q in zip(ps, packed, strict=True):
                    assert torch.equal(q.detach().chunk(k)[m], p.detach()), (nesterov, step, m)


def test_unpacked_members_load_as_ordinary_models(tmp_path, splits) -> None:
    cfg = _config("preact_B")
    packed = build_packed(cfg, SEEDS)
    _packed_run(packed, splits, _train_cfg(iters=2), steps=2, dtype=torch.float32)
    packed.input_norm = Normalize.fit(splits.train.images, "pixel")
    x = torch.randn(4, 3, 16, 16)
    packed.eval()
    with torch.no_grad():
        shared = packed.forward_shared(x)
    for m, state in enumerate(unpack_state_dicts(packed)):
        model = build_model(cfg)
        model.load_state_dict(state, strict=True)  # the keys and shapes of an ordinary model
        model.input_norm = packed.input_norm
        save_checkpoint(model_record(model), tmp_path / f"m{m}.pt")
        loaded = load_model(tmp_path / f"m{m}.pt")  # as `reslab eval` loads a run's checkpoint
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), shared[:, m], rtol=1e-5, atol=1e-5)
    models = unpack(packed)
    assert [type(m) for m in models] == [type(build_model(cfg))] * 3
    assert not models[0].training and models[2].input_norm is packed.input_norm
    with torch.no_grad():
        torch.testing.assert_close(models[2](x), shared[:, 2], rtol=1e-5, atol=1e-5)


def test_unpacked_optimizer_state_resumes_as_an_ordinary_run(splits) -> None:
    cfg, tcfg = _config("resnet20_A"), _train_cfg(iters=2)
    packed = pack(_members(cfg, torch.float64), seeds=SEEDS)
    opt = _packed_run(packed, splits, tcfg, steps=2, dtype=torch.float64)["optimizer"]
    models = unpack(packed)
    ref_opts = []
    for model, state in zip(models, member_optimizer_states(opt.state_dict(), 3), strict=True):
        ref = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=0.9, weight_decay=1e-4)
        ref.load_state_dict(state)
        ref_opts.append(ref)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) for _ in SEEDS]
    ys = torch.randint(0, 10, (8, 3), generator=g)
    opt.zero_grad(set_to_none=True)
    member_losses(packed(pack_inputs(xs)), ys).sum().backward()
    opt.step()
    for m, (model, ref) in enumerate(zip(models, ref_opts, strict=True)):
        F.cross_entropy(model(xs[m]), ys[:, m]).backward()
        ref.step()
    _assert_state_close(packed, models, rtol=1e-9, atol=1e-11)


def test_member_batches_resume_exactly(splits) -> None:
    """The packed batches are each seed's own training batches (what a run with that seed
    draws), and their position resumes exactly, across an epoch boundary."""
    cfg = _train_cfg()
    data = MemoryData(splits)
    a = endless(MemberBatches.of(data, SEEDS, cfg))
    own = [endless(MemberBatches.of(data, [s], cfg)) for s in SEEDS]
    source = MemberBatches.of(data, SEEDS, cfg)
    stream = endless(source)
    for _ in range(10):  # past the first epoch (128 images / 16 = 8 steps)
        x, y = next(stream)
        singles = [next(o) for o in own]
        assert torch.equal(x, torch.cat([xs for xs, _ in singles], 1))
        assert torch.equal(y, torch.cat([ys for _, ys in singles], 1))
    b = MemberBatches.of(data, SEEDS, cfg)
    b.load_state_dict(source.state_dict())
    resumed = endless(b)
    for _ in range(10):
        (xa, ya), (xb, yb) = next(stream), next(resumed)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = next(a)
    assert x.shape == (16, 9, 8, 8) and x.dtype == torch.uint8 and y.shape == (16, 3)
    assert not torch.equal(y[:, 0], y[:, 1])  # each member its own order


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * self.conv(x)


class _Shuffle(nn.Module):
    """A container whose forward mixes channels between its leaves: packs leaf by leaf, but
    would couple the members."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).roll(1, dims=1)


def test_pack_refuses_what_it_cannot_pack_exactly() -> None:
    cfg = _config("resnet20_A")
    dense = build_model(DenseConfig())
    with pytest.raises(ValueError, match="DenseResNet: only convolutional ResNets"):
        pack([dense, dense])
    with pytest.raises(ValueError, match="member 1's config differs"):
        pack([build_model(cfg), build_model(dataclasses.replace(cfg, num_classes=5))])
    with pytest.raises(ValueError, match="seeds must differ"):
        build_packed(cfg, [1, 1])
    models = _members(cfg)
    for model in models:
        model.layer1[0].act = nn.Dropout()  # type: ignore[index]
    with pytest.raises(ValueError, match=r"layer1\.0\.act \(Dropout\): its masks"):
        pack(models)
    models = _members(cfg)
    for model in models:
        model.layer2[0].downsample = nn.Upsample(scale_factor=1)  # type: ignore[index]
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample \(Upsample\): no packer"):
        pack(models)
    models = _members(cfg)
    for model in models:
        model.layer3[0].downsample = _Scaled()  # type: ignore[index]
    with pytest.raises(ValueError, match=r"layer3\.0\.downsample \(_Scaled\).*\['gain'\]"):
        pack(models)
    models = _members(cfg)
    for model in models:
        model.layer1[1].downsample = _Shuffle(16)  # type: ignore[index]
    with pytest.raises(ValueError, match=r"does not compute its members' outputs.*mixes"):
        pack(models)
    with pytest.raises(ValueError, match=r"\.combine\.drop \(Dropout\): its masks"):
        build_packed(dataclasses.replace(cfg, combine="dropout"), [0, 1])  # Table 1's dropout
    with pytest.raises(ValueError, match="does not split into 3 members"):
        PackedSGD([torch.zeros(4, requires_grad=True)], members=3, lr=0.1)


def test_packers_keep_every_tensor_member_major() -> None:
    """The invariant unpack relies on, for each packable leaf: K member tensors along dim 0."""
    assert nn.Linear in PACKERS and type(PACKERS[nn.Linear]([nn.Linear(3, 2)] * 2)) is GroupedLinear
    for layer in (nn.Conv2d(4, 6, 3, groups=2, bias=True), nn.BatchNorm2d(5),
                  nn.GroupNorm(2, 4), nn.Linear(3, 2)):  # fmt: skip
        members = []
        for seed in SEEDS:
            torch.manual_seed(seed)
            members.append(type(layer)(**_init_args(layer)))
        packed = PACKERS[type(layer)](members)
        for key, t in packed.state_dict().items():
            parts = [m.state_dict()[key] for m in members]
            expected = parts[0] if t.ndim == 0 else torch.cat(parts)
            assert torch.equal(t, expected), (type(layer).__name__, key)


def _init_args(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Conv2d):
        return {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2}
    if isinstance(layer, nn.BatchNorm2d):
        return {"num_features": 5}
    if isinstance(layer, nn.GroupNorm):
        return {"num_groups": 2, "num_channels": 4}
    return {"in_features": 3, "out_features": 2}


# -- the GPU plan (benchmarks/gpu_plan.py) with a runner that only pretends to train ----------
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_plan():
    spec = importlib.util.spec_from_file_location("gpu_plan", ROOT / "benchmarks" / "gpu_plan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_plan"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _FakeRunner:
    """Each seed needs ``need[job]`` seconds of the fake clock; a call trains seeds in order
    until its deadline, keeping partial progress like a checkpoint; ``fail`` lists (job, seed)
    pairs whose loss goes non-finite."""

    name = "fake"

    def __init__(self, clock: _Clock, need: dict[str, float], fail=()) -> None:
        self.clock, self.need, self.fail = clock, need, set(fail)
        self.progress: dict[tuple[str, int], float] = {}
        self.calls: list[dict] = []

    def run(self, job, state_dir, members, *, deadline):
        out = {k: dict(v) for k, v in members.items()}
        resumed = [s for s in job.seeds if self.progress.get((job.key, s), 0) > 0
                   and out.get(str(s), {}).get("status") == "running"]  # fmt: skip
        self.calls.append({"job": job.key, "deadline": deadline, "resumed": resumed})
        end = self.clock.now + deadline
        for seed in job.seeds:
            if out.get(str(seed), {}).get("status") in ("finished", "failed"):
                continue
            key = (job.key, seed)
            todo = self.need[job.key] - self.progress.get(key, 0.0)
            step = min(todo, end - self.clock.now)
            self.clock.now += step
            self.progress[key] = self.progress.get(key, 0.0) + step
            if step < todo:
                out[str(seed)] = {"status": "running"}
                break
            if key in self.fail:
                out[str(seed)] = {"status": "failed", "returncode": 1}
            else:
                err = 10.0 + seed  # test error %, 10, 11, 12, ...
                out[str(seed)] = {"status": "finished", "test_error": err,
                                  "images_per_second": 1000.0 * (seed + 1)}  # fmt: skip
        return gpu_plan_outcome(out)

    def resume_files(self, job, state_dir):
        return sorted((state_dir / job.slug).glob("*"))


def gpu_plan_outcome(members):
    return sys.modules["gpu_plan"].Outcome(members)


def test_gpu_plan_covers_the_papers_tables(gpu_plan) -> None:
    jobs = gpu_plan.make_plan()
    assert len({j.key for j in jobs}) == len(jobs) == 5 + 4 + 4
    assert all(j.seeds == (0, 1, 2, 3, 4) for j in jobs)
    by_table = {t: [(j.key, label) for j in jobs for tt, label, _ in j.rows if tt == t]
                for t in gpu_plan.TABLES}  # fmt: skip
    t6, t2, t3 = gpu_plan.TABLES
    assert [label for _, label in by_table[t6]] == [f"ResNet-{d}" for d in (20, 32, 44, 56, 110)]
    # Table 2's "original" row is Table 6's ResNet-110: trained once, reported twice
    assert by_table[t2][0] == ("table6/resnet110", "original") and len(by_table[t2]) == 5
    assert len(by_table[t3]) == 4
    for job in jobs:  # every job is a valid model of the zoo
        cfg = get_config(job.model, **dict(job.options))
        assert isinstance(cfg, ResNetConfig)
        if job.key.startswith("table3"):
            assert cfg.depth in (164, 1001) and cfg.block == "bottleneck"
        if job.key.startswith("table2") or job.key == "table6/resnet110":
            assert cfg.depth == 110


def test_gpu_plan_resumes_across_commands_within_the_budget(gpu_plan, tmp_path) -> None:
    jobs = gpu_plan.make_plan()[:3]
    clock = _Clock()
    runner = _FakeRunner(clock, {"table6/resnet20": 60, "table6/resnet32": 80,
                                 "table6/resnet44": 100})  # fmt: skip
    budget, margin = 540.0, gpu_plan.STOP_MARGIN
    starts = []
    for _ in range(10):
        starts.append(clock.now)
        state = gpu_plan.advance(jobs, tmp_path, runner, budget=budget, clock=clock, argv=["x"])
        assert clock.now - starts[-1] <= budget - margin  # every command ends in its budget
        if all(state["jobs"][j.key]["status"] == "finished" for j in jobs):
            break
    # 5 x 60 s + 5 x 80 s + 5 x 100 s = 1,200 s of training: three commands
    assert len(starts) == 3
    assert [c["job"] for c in runner.calls] == [
        "table6/resnet20", "table6/resnet32",  # command 1: ResNet-32 stops in seed 2
        "table6/resnet32", "table6/resnet44",  # command 2: continues it first
        "table6/resnet44",
    ]  # fmt: skip
    assert runner.calls[2]["resumed"] == [2]  # seed 2 continued, not started again
    assert all(c["deadline"] <= budget - margin for c in runner.calls)
    saved = gpu_plan.load_state(tmp_path)  # what the next machine reads
    assert saved == state
    rec = saved["jobs"]["table6/resnet32"]
    assert len(rec["segments"]) == 2
    assert sum(s["wall_seconds"] for s in rec["segments"]) == pytest.approx(400)
    rows = gpu_plan.summarize(jobs, saved)
    r32 = next(r for r in rows if r["job"] == "table6/resnet32")
    assert r32["test_errors"] == [10, 11, 12, 13, 14]
    assert r32["mean"] == pytest.approx(12) and r32["std"] == pytest.approx(2.5**0.5)
    assert r32["wall_seconds"] == pytest.approx(400)
    # a finished plan does nothing more
    calls = len(runner.calls)
    gpu_plan.advance(jobs, tmp_path, runner, budget=budget, clock=clock)
    assert len(runner.calls) == calls


def test_gpu_plan_reports_failed_seeds_apart(gpu_plan, tmp_path) -> None:
    jobs = gpu_plan.make_plan()[:1]
    clock = _Clock()
    runner = _FakeRunner(clock, {"table6/resnet20": 10}, fail=[("table6/resnet20", 3)])
    state = gpu_plan.advance(jobs, tmp_path, runner, budget=540, clock=clock, argv=["--data", "d"])
    assert state["jobs"]["table6/resnet20"]["status"] == "finished"
    (row,) = [r for r in gpu_plan.summarize(jobs, state) if r["job"] == "table6/resnet20"]
    assert row["test_errors"] == [10, 11, 12, 14] and row["seeds_failed"] == [3]
    assert row["median"] == pytest.approx(11.5)
    block = gpu_plan.render_tables(gpu_plan.summarize(jobs, state))
    assert "| ResNet-20 | 4/5 (1 failed) | 11.75 ± 1.71 | 11.50 | 8.75 |" in block
    assert "python3 benchmarks/gpu_plan.py --data d" in block
    # --retry-failed runs seed 3 again, and only it
    state = gpu_plan.retry_failed(state)
    gpu_plan.save_state(tmp_path, state)
    runner.fail.clear()
    state = gpu_plan.advance(jobs, tmp_path, runner, budget=540, clock=clock)
    assert runner.calls[-1]["job"] == "table6/resnet20"
    assert state["jobs"]["table6/resnet20"]["members"]["3"]["status"] == "finished"


def test_gpu_plan_writes_only_its_block_of_the_docs(gpu_plan, tmp_path) -> None:
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nsome text\n")
    gpu_plan.write_docs(docs, f"{gpu_plan.BEGIN}\nfirst\n{gpu_plan.END}")
    gpu_plan.write_docs(docs, f"{gpu_plan.BEGIN}\nsecond\n{gpu_plan.END}")
    text = docs.read_text()
    assert text.startswith("# Results\n\nsome text\n") and text.count(gpu_plan.BEGIN) == 1
    assert "second" in text and "first" not in text
    docs.write_text(text + "\n## after\n")
    gpu_plan.write_docs(docs, f"{gpu_plan.BEGIN}\nthird\n{gpu_plan.END}")
    assert docs.read_text().endswith("third\n" + gpu_plan.END + "\n\n## after\n")


def test_gpu_plan_exports_what_the_next_machine_needs(gpu_plan, tmp_path) -> None:
    jobs = gpu_plan.make_plan()[:2]
    state_dir = tmp_path / "state"
    clock = _Clock()
    runner = _FakeRunner(clock, {"table6/resnet20": 10, "table6/resnet32": 1000})
    gpu_plan.advance(jobs, state_dir, runner, budget=540, clock=clock)
    for job in jobs:  # what each job's runs left on disk
        (state_dir / job.slug).mkdir(parents=True)
        (state_dir / job.slug / "checkpoint.pt").write_text(job.key)
    copied = gpu_plan.export(jobs, state_dir, runner, tmp_path / "out")
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in copied)
    assert names == ["state.json", "table6-resnet32/checkpoint.pt"]  # the finished job stays


@pytest.mark.slow
def test_gpu_plan_sequential_runner_trains_real_runs(gpu_plan, tmp_path) -> None:
    """Two seeds of ResNet-20 for 3 steps on the digits, each a `reslab train`-like process."""
    jobs = gpu_plan.make_plan((0, 1))[:1]
    runner = gpu_plan.SequentialRunner("digits", device="cpu", threads=1, iters=3)
    state = gpu_plan.advance(jobs, tmp_path, runner, budget=600)
    rec = state["jobs"]["table6/resnet20"]
    assert rec["status"] == "finished", rec
    for seed in ("0", "1"):
        m = rec["members"][seed]
        assert m["status"] == "finished" and m["steps"] == 3 and 0 <= m["test_error"] <= 100
        assert (tmp_path / f"table6-resnet20-seed{seed}" / "checkpoint_latest.pt").exists()


@pytest.mark.slow
def test_gpu_plan_packed_runner_trains_real_runs(gpu_plan, tmp_path) -> None:
    """The plan's default runner end to end on the CPU, through its command line: two seeds of
    ResNet-20 packed, 3 steps on the digits (state, JSON, table); the same packed run folder then
    continues to step 5, as the next command continues a run stopped at its budget."""
    state_dir = tmp_path / "state"
    argv = ["--data", "digits", "--device", "cpu", "--threads", "1", "--iters", "3",
            "--seeds", "0", "1", "--jobs", "table6/resnet20", "--state", str(state_dir),
            "--json", str(tmp_path / "r.json"), "--docs", str(tmp_path / "d.md")]  # fmt: skip
    assert gpu_plan.main(argv) == 0
    rec = gpu_plan.load_state(state_dir)["jobs"]["table6/resnet20"]
    assert rec["status"] == "finished" and rec["segments"][0]["runner"] == "packed"
    for seed in ("0", "1"):
        m = rec["members"][seed]
        assert m["status"] == "finished" and m["steps"] == 3 and 0 <= m["test_error"] <= 100
    run = state_dir / "table6-resnet20-seeds-0-1"
    assert (run / "summary.json").exists() and (run / "seed-1" / "checkpoint_best.pt").exists()
    assert "| ResNet-20 | 2/2 |" in (tmp_path / "d.md").read_text()
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows[0]["seeds_finished"] == [0, 1]
    spec = {"data": "digits", "model": "cifar_resnet20", "options": {}, "seeds": [0, 1],
            "out": str(run), "device": "cpu", "threads": 1, "iters": 5,
            "train_options": {}}  # fmt: skip
    assert gpu_plan.train_job(spec) == 0
    assert torch.load(run / "seed-0" / "checkpoint_latest.pt", weights_only=True)["step"] == 5
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error
        gpu_plan.main(["--jobs", "table6/nothing", "--report"])

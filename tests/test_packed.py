"""Seed-packed training: K members in one wide network are exactly K separate runs.

The strict comparisons run in float64, where rounding cannot hide a coupling between members: a
wrong weight-decay group or a shared statistic would show far above 1e-9. The float32 comparison
against the trainer itself (``fit``) checks the data order and the recipe; there the tolerance is
set by how much float32 rounding grows in a few steps of SGD at lr 0.1 (the same run computed
NCHW and channels_last differs by up to 6e-4 in the loss after 5 steps, measured).
"""

from __future__ import annotations

import dataclasses
import math

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


# tiny convolutions on a shared 2-core machine: a second thread only waits
pytestmark = pytest.mark.usefixtures("one_thread")


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

"""The whole training step as one unit (reslab.train.captured), run eagerly on the CPU.

A CUDA graph replays exactly what the step function did on the device while it was captured,
so the properties that make capture possible are checked here, where no GPU is: the step reads
nothing back to the host, keeps its state in the same tensors, and keeps the non-finite promise
on the device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from reslab.data import Normalize
from reslab.models import get_config
from reslab.models.zoo import build_model
from reslab.train import NonFiniteLossError, TrainConfig, fit, learning_rate
from reslab.train.captured import TrainStep, lr_table
from reslab.train.checkpoint import LATEST
from reslab.train.members import MemberState
from reslab.train.step import build_optimizer

STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _NoHostReads(TorchDispatchMode):
    """Fails on any operator that copies a device value into a Python number (``.item()``,
    ``bool(t)``, ``.tolist()``: all go through ``aten._local_scalar_dense``), which on a GPU is a
    host synchronisation and inside a CUDA graph capture an error."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("the training step read a value back to the host")
        return func(*args, **(kwargs or {}))


def _batches(n: int = STEPS, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (size, 3, 8, 8), generator=g, dtype=torch.uint8),
         torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]  # fmt: skip


def _setup(cfg: TrainConfig, *, warmup: bool = False, capacity: int = STEPS, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(get_config("cifar_resnet20", num_classes=10))
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    norm = Normalize.fit(torch.cat([x for x, _ in _batches()]), cfg.normalize)
    step = TrainStep(
        model, optimizer, members=1,
        rates=lr_table(lambda s: learning_rate(s, STEPS, cfg), STEPS),
        state=MemberState.create(1, warmup=warmup), norm=norm, capacity=capacity,
        warmup_lr=cfg.warmup_lr, warmup_error=cfg.warmup_error,
        label_smoothing=cfg.label_smoothing, precision=cfg.precision,
        channels_last=cfg.channels_last,
    )  # fmt: skip
    return model, optimizer, norm, step


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig.preset("paper", **{"iters": STEPS, "device": "cpu", **kw})


@pytest.mark.parametrize(
    "options",
    [{}, {"precision": "bf16", "channels_last": True}, {"warmup": "error", "nesterov": True}],
)
def test_the_step_reads_nothing_back_and_keeps_its_tensors(options: dict) -> None:
    """Every step under a mode that fails on any device-to-host read; the step's state tensors
    are the same objects at the same addresses afterwards (a graph replays those addresses)."""
    cfg = _cfg(**options)
    step = _setup(cfg, warmup=cfg.warmup == "error")[3]
    before = [(t, t.data_ptr()) for t in step.device_tensors()]
    for images, labels in _batches():
        with _NoHostReads():
            step(images, labels)
    after = step.device_tensors()
    assert all(a is t and a.data_ptr() == ptr for a, (t, ptr) in zip(after, before, strict=True))
    report = step.read()
    assert report.first == 0 and len(report.losses) == STEPS and report.alive == [True]
    assert all(math.isfinite(loss[0]) for loss in report.losses)
    assert report.images == [16] * STEPS
    if cfg.precision == "bf16":  # autocast ran: the loss of a bf16 forward differs from fp32's
        ref = _setup(_cfg(channels_last=True))[3]
        images, labels = _batches()[0]
        ref(images, labels)
        first = ref.read().losses[0][0]
        assert first != report.losses[0][0] and abs(first - report.losses[0][0]) < 0.05 * first


def test_the_guard_catches_a_host_read() -> None:
    """The mode above fails on what the step used to do every step (reading the loss)."""
    loss = torch.tensor([0.5, math.nan]).mean()
    with pytest.raises(AssertionError, match="read a value back"), _NoHostReads():
        math.isfinite(loss.item())
    with pytest.raises(AssertionError, match="read a value back"), _NoHostReads():
        bool(torch.isfinite(loss))


def test_the_step_trains_as_torch_sgd_and_cross_entropy() -> None:
    """The step (masked foreach SGD, the loss as a per-member mean) against the plain loop:
    ``F.cross_entropy`` and ``torch.optim.SGD``, the paper's momentum and weight decay."""
    cfg = _cfg(label_smoothing=0.1, nesterov=True, decay_all=False)
    model, _, norm, step = _setup(cfg)
    torch.manual_seed(0)
    ref = build_model(get_config("cifar_resnet20", num_classes=10))
    opt = build_optimizer(ref, cfg)
    ref_losses = []
    for s, (images, labels) in enumerate(_batches()):
        step(images, labels)
        for group in opt.param_groups:
            group["lr"] = learning_rate(s, STEPS, cfg)
        loss = F.cross_entropy(ref(norm(images)), labels, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    losses = [row[0] for row in step.read().losses]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=name)


def test_a_nan_loss_never_reaches_the_weights() -> None:
    """A NaN loss at step 2 (a hook on the classifier's output): that step's update and every
    later one are masked on the device, so the parameters and momentum buffers stay those after
    step 1 through three more steps; the host learns the failed step when it reads."""
    cfg = _cfg()
    model, optimizer, _, step = _setup(cfg)
    batches = _batches()
    for images, labels in batches[:2]:
        step(images, labels)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    def poison(module: nn.Module, args: object, out: Tensor) -> Tensor:
        return out * math.nan

    hook = model.fc.register_forward_hook(poison)
    with _NoHostReads():
        step(*batches[2])
    hook.remove()
    for images, labels in batches[3:]:  # finite losses again: the member stays failed
        step(images, labels)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert all(
        torch.isfinite(optimizer.state[p]["momentum_buffer"]).all() for p in model.parameters()
    )
    report = step.read()
    assert report.alive == [False] and report.failed_step == [2] and report.failed() == [0]
    assert math.isnan(report.failed_loss(0)) and math.isfinite(report.losses[1][0])
    assert not torch.equal(
        momentum[0], optimizer.state[next(model.parameters())]["momentum_buffer"]
    )


def test_warmup_follows_the_paper_rule_per_step() -> None:
    """warmup_lr while the mean error of the last 10 batches is >= warmup_error: with a
    threshold nothing reaches, every step trains at warmup_lr (the step's update equals SGD at
    0.01); the device reports the member still warming."""
    cfg = _cfg(warmup="error", warmup_error=0.0, momentum=0.0, weight_decay=0.0)
    model, _, norm, step = _setup(cfg, warmup=True)
    images, labels = _batches()[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    ref = build_model(get_config("cifar_resnet20", num_classes=10))
    F.cross_entropy(ref(norm(images)), labels).backward()
    step(images, labels)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p, before[name] - cfg.warmup_lr * q.grad, msg=name)
    assert step.read().warming == [True]


def test_the_log_refuses_to_overwrite_unread_steps() -> None:
    _, _, _, step = _setup(_cfg(), capacity=2)
    batches = _batches()
    step(*batches[0])
    step(*batches[1])
    with pytest.raises(RuntimeError, match="2 steps since the last read"):
        step(*batches[2])
    assert len(step.read().losses) == 2
    step(*batches[2])  # read: room again
    assert step.read().first == 2


def test_graphs_refuse_what_a_graph_cannot_replay() -> None:
    """On a CPU the flag runs the same step eagerly; the checks that guard a capture still
    apply wherever they can be decided."""
    cfg = _cfg()
    _, _, _, step = _setup(cfg)
    model, optimizer = step.model, step.optimizer
    kw = dict(members=1, rates=step.rates, state=step.state, norm=step.norm, capacity=4,
              warmup_lr=0.01, warmup_error=0.8)  # fmt: skip
    assert not TrainStep(model, optimizer, graphs=True, **kw).graphs  # CPU: eager
    with pytest.raises(ValueError, match="does not split into 3 members"):
        TrainStep(model, optimizer, **{**kw, "members": 3})


def test_fit_keeps_the_non_finite_promise_without_a_read_per_step(digits, tmp_path) -> None:
    """``fit`` with ``cuda_graphs`` (on a CPU the same step, eagerly), evaluating every 5 steps:
    a NaN loss at step 7 (a hook on the classifier) is found at the read of step 10, so steps 8
    and 9 ran, yet the weights after them are those from before step 7; the error names step 7
    and the last good checkpoint, which is still step 5's file, byte for byte."""
    seen: dict = {"steps": []}

    def on_step(step: int, model: nn.Module) -> None:
        seen["steps"].append(step)
        if step == 7:
            seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["checkpoint"] = (tmp_path / LATEST).read_bytes()
            seen["hook"] = model.fc.register_forward_hook(lambda m, a, out: out * math.nan)
        if step == 8:
            seen["hook"].remove()

    torch.manual_seed(0)
    model = build_model(get_config("cifar_resnet20", in_channels=1, num_classes=10))
    cfg = TrainConfig.preset("digits", iters=20, eval_every=5, device="cpu", cuda_graphs=True)
    with pytest.raises(NonFiniteLossError, match=r"loss \(nan\) at step 7 .*after step 6") as info:
        fit(model, digits, cfg, tmp_path, on_step=on_step)
    assert seen["steps"][-3:] == [7, 8, 9]  # no read between step 7 and the evaluation at 10
    for name, p in model.named_parameters():
        assert torch.equal(p, seen["params"][name]), name
    assert str(tmp_path / LATEST) in str(info.value)
    assert (tmp_path / LATEST).read_bytes() == seen["checkpoint"]
    assert torch.load(tmp_path / LATEST, weights_only=True)["step"] == 5


def test_fit_trains_in_bf16_and_channels_last_through_the_same_step(digits) -> None:
    """The recipe options in the captured step's path: bf16 autocast and channels_last train
    (finite losses that fall) and the network comes back in channels_last."""
    torch.manual_seed(0)
    model = build_model(get_config("cifar_resnet20", in_channels=1, num_classes=10))
    cfg = TrainConfig.preset("digits", iters=12, eval_every=12, device="cpu", cuda_graphs=True,
                             precision="bf16", channels_last=True)  # fmt: skip
    result = fit(model, digits, cfg, verbose=False)
    assert all(math.isfinite(v) for v in result.losses) and len(result.losses) == 12
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)

"""``fit`` and ``evaluate``: the training loop with exact resume, fault handling and DDP."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.data import DataSplits, Normalize, Split, random_crop_flip
from reslab.train.checkpoint import (
    BEST,
    LATEST,
    holds_run,
    load_checkpoint,
    model_record,
    save_checkpoint,
)
from reslab.train.config import TrainConfig
from reslab.train.distributed import convert_sync_batchnorm, setup_distributed
from reslab.train.outputs import Progress, append_metrics, environment, plot_curves, write_json
from reslab.train.schedule import learning_rate, train_resolution, wants_warmup

__all__ = [
    "FitResult",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "evaluate",
    "fit",
    "resolve_device",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WARMUP_WINDOW = 10  # batches averaged when deciding that training error fell below warmup_error


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the run stopped before that optimiser step."""


class TrainingInterrupted(Exception):
    """SIGTERM or Ctrl-C: the latest checkpoint was written and the run stopped."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        where = f"; resume from {checkpoint.parent}" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}{where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]  # one record per evaluation point
    summary: dict[str, Any]
    losses: list[float] = field(default_factory=list)  # training loss of every optimiser step


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    normalize: Normalize | None = None,
    flip: bool = False,
) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class) of ``model`` on uint8
    images, normalised by ``normalize`` or else the ``input_norm`` that :func:`fit` attached.

    ``flip=True`` is test-time augmentation with the training set's own symmetry: the prediction
    is the mean of the softmaxes of each image and its horizontal mirror (two forward passes);
    the report then also gives ``single_view_accuracy``, from the first of the two passes.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    norm = (
        normalize or getattr(model, "input_norm", None) or Normalize.identity(split.images.shape[1])
    )
    was_training = model.training
    model.eval()
    preds, singles = [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i in range(0, len(split), batch_size):
        raw = split.images[i : i + batch_size].to(device, non_blocking=True)
        with _autocast(device, precision):
            probs = model(norm(raw).contiguous(memory_format=fmt)).float().softmax(1)
            if flip:
                singles.append(probs.argmax(1).cpu())
                # mirror the image, then normalise, as training's flip does: a per-pixel mean
                # is not mirror-symmetric, so mirroring the normalised batch would not match
                mirror = norm(raw.flip(3)).contiguous(memory_format=fmt)
                probs = probs + model(mirror).float().softmax(1)
        preds.append(probs.argmax(1).cpu())
    model.train(was_training)
    y = split.labels
    k = int(model.config.num_classes)
    pred = _cat(preds)
    confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1)
    acc = _accuracy(pred, y)
    report = {
        "accuracy": acc,
        "error": 1.0 - acc,
        "n": len(y),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
    if flip:
        report["single_view_accuracy"] = _accuracy(_cat(singles), y)
    return report


def _cat(preds: list[Tensor]) -> Tensor:
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).double().mean()) if len(y) else float("nan")


@contextlib.contextmanager
def _catch_signals() -> Iterator[list[int]]:
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (main thread only)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _optimizer(
    model: nn.Module, cfg: TrainConfig, param_groups: list[dict] | None
) -> torch.optim.SGD:
    if param_groups is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.decay_all:
            param_groups = [{"params": params}]
        else:  # weight decay on conv/linear weights only (nanoGPT: split by tensor rank)
            param_groups = [
                {"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
    return torch.optim.SGD(
        param_groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


class _Run:
    """The mutable state of one run; ``state_dict`` is exactly what resume needs."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, warming: bool) -> None:
        self.step = 0
        self.perm: Tensor | None = None  # this epoch's order of training images
        self.warming = warming
        self.recent_errors: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.losses: list[float] = []
        # training loss and error summed since the last evaluation, and over how many steps: a
        # resume inside such a window must log the same window mean as a straight run
        self.window = [0.0, 0.0, 0]
        self.best_val = math.inf
        self.train_seconds = 0.0  # time in training steps (evaluation excluded)
        self.images = 0  # training images processed, all ranks
        self.generator = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation


def fit(
    model: nn.Module,
    splits: DataSplits,
    cfg: TrainConfig,
    out_dir: Path | None = None,
    *,
    param_groups: list[dict] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    resume: bool = False,
    run_info: dict[str, Any] | None = None,
    verbose: bool | None = None,
) -> FitResult:
    """Train ``model`` on ``splits.train`` with ``cfg``; evaluate on val (and test, for the curves).

    With ``out_dir`` the run folder gets config.json, metrics.jsonl, checkpoints (latest and best
    on validation), summary.json and curves.png; ``resume=True`` continues from
    ``out_dir/checkpoint_latest.pt`` bit-exactly. ``on_step(step, model)`` runs at the start of
    every step, before the forward pass. Under torchrun every rank calls ``fit``; rank 0 writes.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    verbose = out_dir is not None if verbose is None else verbose
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would take that one GPU (NCCL refuses two ranks on one device)
        raise ValueError(
            f"--device {cfg.device} under torchrun: pass --device cuda, and each rank takes the "
            "GPU of its LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    dinfo = setup_distributed(use_cuda)
    if cfg.batch_size % dinfo.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by {dinfo.world_size} ranks"
        )
    device = resolve_device(cfg.device, dinfo.local_rank)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    writes = out_dir is not None and dinfo.is_main

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dinfo.world_size > 1:
        convert_sync_batchnorm(model, cuda=device.type == "cuda")
    norm = Normalize.fit(splits.train.images, cfg.normalize)
    model.input_norm = norm
    optimizer = _optimizer(model, cfg, param_groups)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    n_train = len(splits.train)
    spe, total = cfg.steps_per_epoch(n_train), cfg.total_steps(n_train)
    eval_every = cfg.eval_every or spe
    run = _Run(model, cfg, wants_warmup(cfg, getattr(model.config, "depth", None)))
    torch.manual_seed(cfg.seed)  # global RNG: anything stochastic inside the model

    if resume:
        if out_dir is None:
            raise ValueError("resume=True needs out_dir")
        ckpt = load_checkpoint(out_dir / LATEST)
        was = ckpt.get("train_config", {}).get("batch_size", cfg.batch_size)
        if was != cfg.batch_size:  # the saved permutation and position count in its batches
            raise ValueError(
                f"cannot resume {out_dir} with batch size {cfg.batch_size}: it was trained with "
                f"{was}, and its position in the epoch is counted in those batches"
            )
        if int(ckpt["step"]) > total:  # it would "finish" at once and report the wrong length
            raise ValueError(
                f"cannot resume {out_dir} at step {ckpt['step']} into a run of {total} steps: "
                "ask for at least as many (--iters/--epochs)"
            )
        _restore(ckpt, model, optimizer, scaler, run)
    elif out_dir is not None and holds_run(out_dir):
        # a fresh run would mix its checkpoints with the old run's (eval would pick the old
        # best) and a later --resume could continue the wrong weights: refuse, lose nothing
        raise FileExistsError(
            f"run folder {out_dir} already holds a run ({LATEST} or {BEST}); continue it with "
            f"`--resume {out_dir}` (of `reslab train` or `reslab finetune`, whichever started "
            f"it), or train into another --out folder"
        )
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            out_dir / "config.json",
            {
                "train_config": cfg.to_dict(),
                "model_config": model.config.to_dict(),
                "model_kind": model_record(model)["model_kind"],
                "data": {"name": splits.name, "classes": splits.classes, "train": n_train,
                         "val": len(splits.val), "test": len(splits.test)},
                "world_size": dinfo.world_size,
                **environment(device),
                **(run_info or {}),
            },
        )  # fmt: skip
        # the checkpoint's history is the record: a process that died after logging an
        # evaluation but before checkpointing it must not leave that line twice
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        for record in run.history:
            append_metrics(out_dir / "metrics.jsonl", record)

    train_model: nn.Module = model
    if dinfo.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model, mode=cfg.compile_mode)
    graphs = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")

    images = splits.train.images.to(device)
    labels = splits.train.labels.to(device)
    local = cfg.batch_size // dinfo.world_size
    shard = slice(dinfo.rank * local, (dinfo.rank + 1) * local)
    progress = Progress(total, run.step, enabled=None if verbose and dinfo.is_main else False)
    model.train()

    def checkpoint(path: Path) -> None:
        save_checkpoint(_state(model, optimizer, scaler, run, cfg, splits), path)

    with _catch_signals() as caught:
        while run.step < total:
            t0 = time.perf_counter()
            pos = run.step % spe
            if pos == 0 or run.perm is None:
                run.perm = torch.randperm(n_train, generator=run.generator)
            idx = run.perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].to(device)
            x = images[idx]
            if cfg.augment:  # the whole global batch, so every rank draws the same numbers
                x = random_crop_flip(x, padding=cfg.pad, flip=cfg.flip, generator=run.generator)
            x, y = norm(x[shard]), labels[idx][shard]
            side = train_resolution(run.step, total, cfg)
            if side is not None and side != x.shape[-1]:  # antialiased, like a real smaller image
                x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if on_step is not None:
                on_step(run.step, model)
            lr = learning_rate(run.step, total, cfg, warming_up=run.warming)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

            if graphs:  # one training step per replay of the CUDA graphs (forward + backward)
                torch.compiler.cudagraph_mark_step_begin()
            with _autocast(device, cfg.precision):
                logits = train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            wrong = (logits.detach().argmax(1) != y).sum()
            stats = torch.stack(
                [
                    loss.detach(),
                    wrong.float(),
                    torch.tensor(float(bool(caught)), device=loss.device),
                ]
            )
            if dinfo.world_size > 1:  # global mean loss/error; stop together on a signal
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats[0] /= dinfo.world_size
            loss_value, n_wrong, stop = stats.tolist()
            if not math.isfinite(loss_value):
                where = _last_good(out_dir) if writes else ""
                progress.newline()
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss_value}) at step {run.step} (lr {lr:g}); "
                    f"stopped before the optimiser step{where}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            err = n_wrong / cfg.batch_size
            run.step += 1
            run.losses.append(loss_value)
            run.images += cfg.batch_size
            run.train_seconds += time.perf_counter() - t0
            win_loss, win_err, win_n = run.window
            run.window = [win_loss + loss_value, win_err + err, win_n + 1]
            if run.warming:
                run.recent_errors = [*run.recent_errors[-WARMUP_WINDOW + 1 :], err]
                if len(run.recent_errors) == WARMUP_WINDOW and (
                    sum(run.recent_errors) / WARMUP_WINDOW < cfg.warmup_error
                ):
                    run.warming = False  # "then go back to 0.1"
            progress.update(run.step, loss_value, err, lr)

            if run.step % eval_every == 0 or run.step == total:
                # a finite loss can still have non-finite gradients; the next loss would catch
                # the broken weights, but this step's checkpoint must not keep them as "good"
                bad = [k for k, t in model.state_dict().items()
                       if t.is_floating_point() and not bool(torch.isfinite(t).all())]  # fmt: skip
                if bad:
                    progress.newline()
                    raise NonFiniteLossError(
                        f"non-finite weights after step {run.step} ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): the loss was finite but not its "
                        f"gradients; stopped before checkpointing them"
                        f"{_last_good(out_dir) if writes else ''}"
                    )
                record = {
                    "step": run.step,
                    "epoch": run.step / spe,
                    "lr": lr,
                    "loss": run.window[0] / run.window[2],
                    "train_error": run.window[1] / run.window[2],
                    "seconds": run.train_seconds,
                    "images_per_second": run.images / max(run.train_seconds, 1e-9),
                }
                run.window = [0.0, 0.0, 0]
                if dinfo.is_main:
                    _evaluate_point(model, splits, cfg, device, record)
                    run.history.append(record)
                    progress.newline()
                    if verbose:
                        print(_format_record(record, total), flush=True)
                val = record.get("val_error")
                improved = val is not None and val < run.best_val
                if improved:  # before LATEST is written: a resume from it must know this best
                    run.best_val = val
                if writes:
                    append_metrics(out_dir / "metrics.jsonl", record)
                    if improved:  # BEST first: a crash between the two then only repeats work
                        checkpoint(out_dir / BEST)
                    checkpoint(out_dir / LATEST)
            if stop and run.step < total:  # a signal during the last step: just finish
                progress.newline()
                if writes:
                    checkpoint(out_dir / LATEST)
                signum = caught[0] if caught else signal.SIGTERM
                raise TrainingInterrupted(signum, run.step, out_dir / LATEST if writes else None)

    progress.newline()
    summary = _summarize(model, splits, cfg, device, run, total, spe) if dinfo.is_main else {}
    if writes:
        write_json(out_dir / "summary.json", summary)
        if run.history:
            plot_curves(run.history, out_dir / "curves.png", title=f"{splits.name}, {cfg.recipe}")
    return FitResult(model, run.history, summary, run.losses)


def _last_good(out_dir: Path) -> str:
    latest = out_dir / LATEST
    return f"; last good checkpoint: {latest}" if latest.exists() else "; no checkpoint yet"


def _evaluate_point(
    model: nn.Module, splits: DataSplits, cfg: TrainConfig, device: torch.device, record: dict
) -> None:
    kw = dict(
        batch_size=cfg.eval_batch_size,
        device=device,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
    )  # single view: the curves follow the papers' protocol; eval_flip applies to the summary
    record["val_error"] = evaluate(model, splits.val, **kw)["error"] if len(splits.val) else None
    record["test_error"] = evaluate(model, splits.test, **kw)["error"] if cfg.eval_test else None


def _format_record(r: dict[str, Any], total: int) -> str:
    val = "" if r.get("val_error") is None else f"  val err {100 * r['val_error']:.2f}%"
    test = "" if r.get("test_error") is None else f"  test err {100 * r['test_error']:.2f}%"
    return (
        f"step {r['step']}/{total}  epoch {r['epoch']:.1f}  lr {r['lr']:.3g}  loss {r['loss']:.4f}"
        f"  train err {100 * r['train_error']:.2f}%{val}{test}  {r['images_per_second']:.0f} img/s"
    )


def _summarize(
    model: nn.Module,
    splits: DataSplits,
    cfg: TrainConfig,
    device: torch.device,
    run: _Run,
    total: int,
    spe: int,
) -> dict[str, Any]:
    kw = dict(
        device=device, precision=cfg.precision, channels_last=cfg.channels_last, flip=cfg.eval_flip
    )
    test = evaluate(model, splits.test, batch_size=cfg.eval_batch_size, **kw)
    val = evaluate(model, splits.val, **kw) if len(splits.val) else None
    return {
        "test_accuracy": test["accuracy"],  # the final model, as the papers report
        # with eval_flip, the single view too: it is what the papers' tables give
        "test_accuracy_single_view": test.get("single_view_accuracy", test["accuracy"]),
        "eval_flip": cfg.eval_flip,
        "val_accuracy": val["accuracy"] if val else None,
        "best_val_accuracy": 1.0 - run.best_val if math.isfinite(run.best_val) else None,
        "test_per_class_accuracy": test["per_class_accuracy"],
        "train_seconds": run.train_seconds,
        "images_per_second": run.images / max(run.train_seconds, 1e-9),
        "steps": total,
        "epochs": total / spe,
        "final_train_loss": run.losses[-1] if run.losses else None,
        "data": splits.name,
        "recipe": cfg.recipe,
    }


def _state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    run: _Run,
    cfg: TrainConfig,
    splits: DataSplits,
) -> dict[str, Any]:
    return {
        **model_record(model),
        "classes": list(splits.classes),
        "step": run.step,
        "train_config": cfg.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "perm": run.perm,
        "warming": run.warming,
        "recent_errors": list(run.recent_errors),
        "history": run.history,
        "losses": torch.tensor(run.losses, dtype=torch.float64),
        "window": list(run.window),
        "best_val": run.best_val,
        "train_seconds": run.train_seconds,
        "images": run.images,
        "rng": {
            "data": run.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }


def _restore(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    run: _Run,
) -> None:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    run.step = int(ckpt["step"])
    run.perm = ckpt["perm"]
    run.warming = bool(ckpt["warming"])
    run.recent_errors = list(ckpt["recent_errors"])
    run.history = list(ckpt["history"])
    run.losses = ckpt["losses"].tolist()
    # checkpoints from before the window was saved: its mean then covers the resumed steps only
    run.window = list(ckpt.get("window", [0.0, 0.0, 0]))
    run.best_val = float(ckpt["best_val"])
    run.train_seconds = float(ckpt["train_seconds"])
    run.images = int(ckpt["images"])
    rng = ckpt.get("rng")
    if rng is None:
        import warnings

        warnings.warn("checkpoint has no RNG state: augmentation will not repeat", stacklevel=3)
        return
    run.generator.set_state(rng["data"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        # the devices both machines have: a checkpoint from one with more visible GPUs must
        # resume on one with fewer (set_rng_state_all would index past the last device)
        for index, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)

"""``fit``: the training loop, with exact resume, fault handling and DDP.

The loop itself is short; its parts live beside it: what it trains (:mod:`reslab.train.runs`: one
network, or :mod:`reslab.train.packed_run`: K seeds packed into one), set-up
(:mod:`reslab.train.setup`), the data (:class:`reslab.data.training.TrainingData` and its
training batches), the training step (:mod:`reslab.train.captured`), the run state
(:mod:`reslab.train.state`), evaluation (:mod:`reslab.train.evaluation`) and the run folder
(:mod:`reslab.train.outputs`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from reslab._progress import progress_bar, wants_progress, write_line
from reslab.data import DataSplits, Normalize
from reslab.data.training import TrainingData, as_training_data
from reslab.models.packed import PackedNet
from reslab.train.config import TrainConfig
from reslab.train.packed_run import PackedRun
from reslab.train.runs import FitResult, Run, SingleRun
from reslab.train.schedule import train_size
from reslab.train.setup import place

__all__ = ["FitResult", "TrainingInterrupted", "fit"]

#: Seconds between reads of the device for the progress bar's numbers (when it is shown)
DISPLAY_SECONDS = 2.0


class TrainingInterrupted(Exception):
    """SIGTERM or Ctrl-C: the latest checkpoint was written and the run stopped."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        where = f"; resume from {checkpoint.parent}" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}{where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def fit(
    model: nn.Module,
    data: DataSplits | TrainingData,
    cfg: TrainConfig,
    out_dir: Path | None = None,
    *,
    param_groups: list[dict] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    resume: bool = False,
    allow_nonempty: bool = False,
    run_info: dict[str, Any] | None = None,
    verbose: bool | None = None,
    progress: bool | None = None,
    normalization: Normalize | None = None,
) -> FitResult:
    """Train ``model`` on ``data``'s training split with ``cfg``; evaluate on val (and test).

    ``data``: :class:`~reslab.data.DataSplits` in memory, or any
    :class:`~reslab.data.training.TrainingData` (:func:`reslab.data.training.open_data`: image
    folders, zips, lists and shards, in memory or streamed). The model is normalised by
    ``normalization`` (a pretrained network's statistics) or else by the training images'
    (``cfg.normalize``); it carries the result with the data's input config
    (``model.input_config``), which every checkpoint stores.

    With ``out_dir`` the run folder gets config.json, metrics.jsonl, checkpoints (latest and best
    on validation), TensorBoard events, summary.json and curves.png; ``resume=True`` continues
    from ``out_dir/checkpoint_latest.pt`` bit-exactly, after checking the model, optimiser groups,
    data and config against it. The folder is this process's while it runs (another ``fit`` there
    raises :class:`reslab._io.FolderLockedError`); a fresh run refuses a folder with files it
    would replace, and one with other files unless ``allow_nonempty``
    (:func:`~reslab.train.setup.refuse_occupied`). ``on_step(step, model)`` runs at the start
    of every step, before the forward pass. ``verbose`` prints a line per evaluation; ``progress``
    draws bars for the steps and evaluations (default: with ``verbose``, on a terminal). Under
    torchrun every rank calls ``fit``; rank 0 evaluates and writes.

    A :class:`~reslab.models.packed.PackedNet` (:func:`~reslab.models.packed.build_packed`) is
    trained as its K members would be by K runs with their own seeds (``cfg.seed`` is not
    used), into ``out_dir/seed-S/`` run folders and a summary in ``out_dir``
    (:mod:`reslab.train.packed_run`); the result lists them in ``members``.
    """
    data = as_training_data(data)
    out_dir = Path(out_dir) if out_dir is not None else None
    verbose = out_dir is not None if verbose is None else verbose
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    where = place(cfg)
    main = where.dist.is_main
    show = main and wants_progress(False if progress is None and not verbose else progress)
    kind = PackedRun if isinstance(model, PackedNet) else SingleRun
    run = kind(model, data, cfg, where, out_dir, resume=resume, param_groups=param_groups,
               run_info=run_info, normalization=normalization,
               allow_nonempty=allow_nonempty)  # fmt: skip
    if verbose and main and cfg.resolutions:
        sizes = [train_size(round(f * run.total), run.total, cfg, data.image_size)
                 or data.image_size for f, _ in cfg.resolutions]  # fmt: skip
        write_line("progressive resizing, relative to the data's "
                   f"{data.image_size[0]}x{data.image_size[1]}: "
                   + ", ".join(f"{h}x{w}" for h, w in sizes))  # fmt: skip
    with contextlib.closing(run):
        return _train(run, on_step=on_step, verbose=verbose and main, show=show)


def _train(
    run: Run,
    *,
    on_step: Callable[[int, nn.Module], None] | None,
    verbose: bool,
    show: bool,
) -> FitResult:
    """The loop: a step per batch, the device read only at evaluation, checkpoint and log points
    (no host synchronisation in between: reslab.train.captured), a checkpoint and
    :class:`TrainingInterrupted` on SIGTERM/SIGINT. Under DDP the ranks agree on stopping after
    every step (one small read per step). The summary is written still under the signal
    handlers: a SIGTERM or Ctrl-C then lets it finish (the final checkpoint is saved already)."""
    cfg, total, stepper = run.cfg, run.total, run.stepper
    eval_every = cfg.eval_every or run.steps_per_epoch
    bar = progress_bar(total=total, initial=run.step, desc="train", unit="step", enabled=show)
    with _catch_signals() as caught, bar:
        t0 = shown = time.perf_counter()
        while run.step < total:
            images, labels = run.batch()
            if on_step is not None:
                on_step(run.step, run.model)
            size = train_size(run.step, total, cfg, run.data.image_size)
            stepper(images, labels, size=size, stop=bool(caught))
            run.step += 1
            bar.update()
            stop = stepper.agree_stop() if stepper.world_size > 1 else bool(caught)
            evaluate = run.step % eval_every == 0 or run.step == total
            if evaluate or stop or (show and time.perf_counter() - shown > DISPLAY_SECONDS):
                report = stepper.read()  # synchronises: the seconds below are the steps' own
                bar.set_postfix(run.absorb(report, time.perf_counter() - t0), refresh=False)
                if evaluate:
                    line = run.evaluation_point(show=show)
                    if verbose:
                        write_line(line)
                t0 = shown = time.perf_counter()
            if stop and run.step < total:  # a signal during the last step: just finish
                latest = run.save()
                raise TrainingInterrupted(caught[0] if caught else signal.SIGTERM, run.step,
                                          latest)  # fmt: skip
        bar.close()
        return run.finish(show=show)


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

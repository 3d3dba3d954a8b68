"""Seed-packed training in :func:`reslab.train.fit`: K seeds of one network as one packed network.

``fit(build_packed(config, seeds), data, cfg, out_dir)`` trains the K members of a
:class:`~reslab.models.packed.PackedNet` exactly as K runs with ``--seed S`` would (up to float
rounding; :mod:`reslab.train.packed`): member ``S`` draws the batches of the training data a run
seeded ``S`` draws, and every step is the trainer's own :class:`~reslab.train.captured.TrainStep`
with ``members=K``. What the run writes:

- ``out_dir/seed-S/``: an ordinary run folder per member (config.json with ``seed`` S,
  metrics.jsonl, checkpoint_latest.pt and checkpoint_best.pt built from the member's slice of the
  weights, its optimiser state and its data position, summary.json, curves.png), so ``reslab
  eval``, ``predict``, ``finetune --from`` and ``train --resume out_dir/seed-S`` treat each as
  any run;
- ``out_dir/``: config.json (the recipe, the members' model, ``seeds``), checkpoint_latest.pt
  (the packed state: ``reslab train --resume out_dir`` continues all members exactly) and, at the
  end, summary.json: the members' test error as mean ± std and ``members``, the member folders
  (what ``reslab eval out_dir --ensemble`` expands).

A member whose loss goes non-finite stops where a run of its own would: its update of that step
and later ones never reach its weights, it gets no checkpoint after its last good one and no
summary, and the others go on; the parent summary lists it under ``failed_members``. Only if all
members fail does the run stop with :class:`~reslab.train.step.NonFiniteLossError`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.data import Normalize
from reslab.data.feed import TrainingBatches, endless
from reslab.data.training import TrainingData
from reslab.models.packed import PackedNet, unpack, unpack_state_dicts
from reslab.record import write_json
from reslab.train.captured import StepReport
from reslab.train.checkpoint import LATEST, model_record, save_checkpoint, set_input
from reslab.train.config import TrainConfig
from reslab.train.evaluation import member_errors_point, summarize
from reslab.train.members import MemberState
from reslab.train.outputs import RunFolder
from reslab.train.packed import MemberBatches, member_finite, member_optimizer_states
from reslab.train.runs import (
    FitResult,
    Run,
    input_config,
    make_step,
    postfix,
    run_config,
    run_title,
    training_batches,
)
from reslab.train.schedule import wants_warmup
from reslab.train.setup import (
    Placement,
    data_identity,
    own_run_folder,
    prepare_model,
    refuse_occupied,
    resume_checkpoint,
    wrap_model,
)
from reslab.train.state import RunState, rng_state, set_rng_state
from reslab.train.step import NonFiniteLossError, build_optimizer

__all__ = ["PackedRun", "member_dir"]


def member_dir(seed: int) -> str:
    """The run folder of the member with ``seed``, relative to the packed run's folder."""
    return f"seed-{seed}"


class PackedRun(Run):
    """The K members of a :class:`PackedNet` trained together (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        data: TrainingData,
        cfg: TrainConfig,
        where: Placement,
        out_dir: Path | None,
        *,
        resume: bool,
        param_groups: list[dict] | None = None,
        run_info: dict[str, Any] | None = None,
        normalization: Normalize | None = None,
        allow_nonempty: bool = False,
    ) -> None:
        assert isinstance(model, PackedNet)
        _refuse(model, cfg, where, param_groups)
        self.model, self.data, self.cfg, self.where = model, data, cfg, where
        self.packed = model
        self.seeds: list[int] = list(model.seeds or [])
        k = len(self.seeds)
        self.cfgs = [dataclasses.replace(cfg, seed=s) for s in self.seeds]
        batches = [training_batches(data, cfg, where, seed=s) for s in self.seeds]
        self.steps_per_epoch = len(batches[0])
        self.stream = endless(MemberBatches(batches))  # from the positions the states were at
        self.total = cfg.run_steps(self.steps_per_epoch)
        self.folders: list[RunFolder | None] = [None] * k
        self.identity = data_identity(data)
        self.lock = None  # the parent folder's; its member folders are written only through it
        if out_dir is not None:
            self.lock = own_run_folder(out_dir, where, resume=resume,
                                       allow_nonempty=allow_nonempty)  # fmt: skip
        try:
            self._set_up(model, cfg, where, out_dir, batches, resume=resume,
                         normalization=normalization, run_info=run_info,
                         allow_nonempty=allow_nonempty)  # fmt: skip
        except BaseException:
            self.close()
            raise

    def _set_up(
        self,
        model: PackedNet,
        cfg: TrainConfig,
        where: Placement,
        out_dir: Path | None,
        batches: list[TrainingBatches],
        *,
        resume: bool,
        normalization: Normalize | None,
        run_info: dict[str, Any] | None,
        allow_nonempty: bool,
    ) -> None:
        """Everything before the first step, checked before anything is written."""
        data, k = self.data, len(self.seeds)
        saved = None
        if resume and out_dir is not None:
            saved = resume_checkpoint(out_dir, cfg, self.total, data=self.identity)
        input_cfg = input_config(data, cfg, normalization, saved)
        norm = prepare_model(model, cfg, where, input_cfg)
        self.optimizer = build_optimizer(model, cfg)
        warm = wants_warmup(cfg, model.config.depth)
        self.members = MemberState.create(k, warmup=warm, device=where.device)
        self.states = []  # each member as an ordinary run: what its checkpoints are made of
        for member, mcfg, b in zip(unpack(model), self.cfgs, batches, strict=True):
            set_input(member, input_cfg)
            scaler = torch.amp.GradScaler(where.device.type, enabled=False)
            self.states.append(RunState(member, build_optimizer(member, mcfg), scaler, b,
                                        warming=warm))  # fmt: skip
        self.failed: dict[int, str] = {}  # member -> why it stopped
        self.step = 0
        torch.manual_seed(cfg.seed)
        if saved is not None:
            self._load(saved)
        elif out_dir is not None:
            for path in (out_dir / member_dir(s) for s in self.seeds):
                refuse_occupied(path, allow_nonempty=allow_nonempty)
        self.out_dir, self.run_info = out_dir, run_info
        if out_dir is not None:
            self._start_folders(out_dir)
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        # one normalisation over the packed channels: elementwise, so the members' own numbers
        packed_norm = Normalize(norm.mode, norm.mean.repeat(k, 1, 1), norm.std.repeat(k, 1, 1))
        self.stepper = make_step(
            wrap_model(model, cfg, where), self.optimizer, cfg, where, members=self.members,
            norm=packed_norm, total=self.total, capacity=min(self.eval_every, self.total),
            step=self.step,
        )  # fmt: skip
        self.lrs = [math.nan] * k
        model.train()

    # -- set-up ---------------------------------------------------------------------------------
    def _start_folders(self, out_dir: Path) -> None:
        info = {**(self.run_info or {}), "seeds": self.seeds,
                "members": [member_dir(s) for s in self.seeds]}  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", run_config(self.model, self.data, self.cfg,
                                                       self.where, info,
                                                       identity=self.identity))  # fmt: skip
        for m, (state, mcfg) in enumerate(zip(self.states, self.cfgs, strict=True)):
            folder = RunFolder(out_dir / member_dir(mcfg.seed), mcfg, self.data.classes,
                               data=self.identity)  # fmt: skip
            parent = {**(self.run_info or {}), "packed_run": {"parent": "..", "seeds": self.seeds}}
            config = run_config(state.model, self.data, mcfg, self.where, parent,
                                identity=self.identity)  # fmt: skip
            folder.start(config, state)
            self.folders[m] = folder

    def _load(self, saved: dict[str, Any]) -> None:
        packed = saved.get("packed")
        if not isinstance(packed, dict) or packed.get("seeds") != self.seeds:
            raise ValueError(
                f"the checkpoint is not a packed run of seeds {self.seeds} (it holds "
                f"{packed.get('seeds') if isinstance(packed, dict) else 'one run'}): resume a "
                "packed run with its own seeds, or a member folder on its own"
            )
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.members.load_state_dict(packed["members"])
        for state, progress in zip(self.states, packed["member_progress"], strict=True):
            state.load_progress_state(progress)
        self.failed = {int(m): why for m, why in packed["failed"].items()}
        self.step = int(saved["step"])
        set_rng_state(saved["rng"])

    # -- the loop's calls -----------------------------------------------------------------------
    def batch(self) -> tuple[Tensor, Tensor]:
        return next(self.stream)

    def absorb(self, report: StepReport, seconds: float) -> dict[str, str]:
        for m, state in enumerate(self.states):
            if m in self.failed:
                continue
            mine = report
            if not report.alive[m]:  # it stops where a run of its own would have stopped
                bad = report.failed_step[m]
                lr = report.lrs[bad - report.first][m]
                self.failed[m] = (f"non-finite training loss ({report.failed_loss(m)}) at step "
                                  f"{bad} (lr {lr:g})")  # fmt: skip
                mine = _until(report, bad)
            state.absorb(mine, seconds, member=m)
            state.step = mine.first + len(mine.losses)
            if mine.losses:
                self.lrs[m] = mine.lrs[-1][m]
        self._stop_if_all_failed()
        alive = [m for m in range(len(self.seeds)) if m not in self.failed]
        if not report.losses:
            return {}
        loss = statistics.mean(report.losses[-1][m] for m in alive)
        error = statistics.mean(report.errors(m)[-1] for m in alive)
        return postfix(loss, error, self.lrs[alive[0]])

    def _stop_if_all_failed(self) -> None:
        if len(self.failed) == len(self.seeds):
            raise NonFiniteLossError(
                "every member failed: "
                + "; ".join(f"seed {self.seeds[m]}: {why}" for m, why in self.failed.items())
            )

    def evaluation_point(self, *, show: bool) -> str:
        """Each member's evaluation point, as its own run has it: the weights check, the
        window's means, val and test error (all members in one pass of the packed network),
        metrics.jsonl, the member's checkpoints; then the packed checkpoint."""
        finite = member_finite(self.packed).tolist()
        for m, ok in enumerate(finite):
            if not ok and m not in self.failed:  # the loss was finite, its gradients not
                self.failed[m] = (f"non-finite weights after step {self.step}: the loss was "
                                  "finite but not its gradients")  # fmt: skip
                self.members.alive[m] = False
                self.members.failed_step[m] = self.step - 1
        self._stop_if_all_failed()
        val, test = member_errors_point(self.packed, self.data, self.cfg, self.where.device,
                                        progress=show)  # fmt: skip
        records = []
        self._sync_members()
        for m, state in enumerate(self.states):
            if m in self.failed:
                continue
            record = state.close_window(lr=self.lrs[m], steps_per_epoch=self.steps_per_epoch)
            record["val_error"] = val[m] if val is not None else None
            record["test_error"] = test[m] if test is not None else None
            state.history.append(record)
            records.append(record)
            improved = state.improves(record["val_error"])  # before the latest checkpoint
            folder = self.folders[m]
            if folder is not None:
                folder.log(record)
                folder.save(state, best=improved)
        self._save_packed()
        return _format_members(records, self.total, len(self.seeds))

    def save(self) -> Path | None:
        self._sync_members()
        for m, folder in enumerate(self.folders):
            if folder is not None and m not in self.failed:
                folder.save(self.states[m])
        return self._save_packed()

    def finish(self, *, show: bool) -> FitResult:
        results = []
        self._sync_members()
        for m, (state, mcfg) in enumerate(zip(self.states, self.cfgs, strict=True)):
            if m in self.failed:
                results.append(FitResult(state.model, state.history, {"failed": self.failed[m]},
                                         state.losses))  # fmt: skip
                continue
            summary = summarize(state.model, self.data, mcfg, self.where.device, state,
                                total=self.total, steps_per_epoch=self.steps_per_epoch,
                                progress=show)  # fmt: skip
            folder = self.folders[m]
            if folder is not None:
                title = run_title(state.model, self.data, mcfg, self.run_info)
                folder.finish(summary, state.history, title=f"{title}, seed {mcfg.seed}")
            results.append(FitResult(state.model, state.history, summary, state.losses))
        summary = self._summary(results)
        if self.out_dir is not None:
            write_json(self.out_dir / "summary.json", summary)
        return FitResult(self.model, [], summary, [], members=results)

    def close(self) -> None:
        for folder in self.folders:
            if folder is not None:
                folder.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- checkpoints and summaries --------------------------------------------------------------
    def _sync_members(self) -> None:
        """Each running member's ordinary run state from the packed one: its slice of the
        weights and of the momentum buffers, its warm-up state. (A failed member keeps the state
        of its last checkpoint.)"""
        weights = unpack_state_dicts(self.packed)
        optimizers = member_optimizer_states(self.optimizer.state_dict(), len(self.seeds))
        for m, state in enumerate(self.states):
            if m not in self.failed:
                state.model.load_state_dict(weights[m])
                state.optimizer.load_state_dict(optimizers[m])
                state.warming, state.recent_errors = self.members.warmup_record(m, state.step)

    def _save_packed(self) -> Path | None:
        if self.out_dir is None:
            return None
        for m, state in enumerate(self.states):
            state.warming, state.recent_errors = self.members.warmup_record(m, state.step)
        ckpt = {
            **model_record(self.model),
            "classes": self.data.classes,
            "train_config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "packed": {
                "seeds": self.seeds,
                "members": self.members.state_dict(),
                "member_progress": [s.progress_state() for s in self.states],
                "failed": {str(m): why for m, why in self.failed.items()},
            },
            "rng": rng_state(),
        }
        save_checkpoint(ckpt, self.out_dir / LATEST)
        return self.out_dir / LATEST

    def _summary(self, results: list[FitResult]) -> dict[str, Any]:
        """The parent's summary.json: the members' test error as mean ± std (the papers' way of
        reporting several runs), the member folders, the failed members, the speed."""
        done = [(s, r.summary) for s, r in zip(self.seeds, results, strict=True)
                if "failed" not in r.summary]  # fmt: skip
        summary: dict[str, Any] = {
            "seeds": self.seeds,
            "members": [member_dir(s) for s, _ in done],
            "failed_members": {member_dir(self.seeds[m]): why for m, why in self.failed.items()},
        }
        for key, name in (("test_accuracy", ""), ("test_accuracy_single_view", "_single_view")):
            errors = [1.0 - r[key] for _, r in done]
            summary[f"test_errors{name}"] = errors
            summary[f"test_error{name}_mean"] = statistics.mean(errors) if errors else None
            summary[f"test_error{name}_std"] = statistics.stdev(errors) if len(errors) > 1 else None
        seconds = max((s.train_seconds for s in self.states), default=0.0)
        summary.update(
            train_seconds=seconds,
            images_per_second=sum(s.images for s in self.states) / max(seconds, 1e-9),
            steps=self.total,
            epochs=self.total / self.steps_per_epoch,
            data=self.data.name,
            recipe=self.cfg.recipe,
        )
        return summary


def _refuse(
    model: PackedNet, cfg: TrainConfig, where: Placement, param_groups: list[dict] | None
) -> None:
    """What seed-packed training does not do, said before anything is written."""
    if not model.seeds:
        raise ValueError("a packed network without seeds: build it with build_packed(cfg, seeds)")
    if where.dist.world_size > 1 or cfg.sync_bn:
        raise ValueError(
            "seed-packed training (--seeds) runs in one process: it does not run under torchrun "
            "(DDP) or with --sync-bn; train the seeds one process each instead"
        )
    if param_groups is not None:
        raise ValueError("seed-packed training takes the trainer's own optimiser groups only")


def _until(report: StepReport, end: int) -> StepReport:
    """``report`` cut to the steps before ``end``."""
    n = max(0, end - report.first)
    return dataclasses.replace(report, losses=report.losses[:n], wrong=report.wrong[:n],
                               lrs=report.lrs[:n], images=report.images[:n])  # fmt: skip


def _format_members(records: list[dict[str, Any]], total: int, k: int) -> str:
    """One line per evaluation of a packed run: each number as the members' mean ± std."""
    if not records:
        return ""

    def stat(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
        values = [scale * r[key] for r in records if r.get(key) is not None]
        if not values:
            return "—"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{fmt}} ± {std:{fmt}}"

    r = records[0]
    rate = sum(x["images_per_second"] for x in records)
    return (
        f"step {r['step']}/{total}  epoch {r['epoch']:.1f}  {len(records)}/{k} members  "
        f"loss {stat('loss', fmt='.4f')}  train err {stat('train_error', 100)}%  "
        f"val err {stat('val_error', 100)}%  test err {stat('test_error', 100)}%  "
        f"{rate:.0f} img/s"
    )

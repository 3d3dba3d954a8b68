"""The papers' CIFAR-10 tables with five seeds each, on a GPU, one short command at a time.

    python3 benchmarks/gpu_plan.py --data data/cifar10-jpeg.zip [--state runs/gpu_plan] \
        [--budget 540] [--runner packed|sequential] [--jobs KEY ...] [--export DIR]

The plan, in order (He et al. 2015 §4.2 ``paper`` recipe, CIFAR-10 JPEG, seeds 0-4):

1. He et al. 2015, Table 6: ResNet-20, 32, 44, 56, 110.
2. He et al. 2016, Table 2: the five unit orderings on ResNet-110 (``original`` is Table 6's row).
3. He et al. 2016, Table 3: ResNet-164 and ResNet-1001, original against full pre-activation.

Each command works for at most ``--budget`` seconds (default 540, at most 570, so a command with
start-up and the report stays under 10 minutes): it skips finished jobs, continues the unfinished
one first, then starts the next ones, and stops the run in flight at the budget (the trainer
checkpoints on SIGTERM; the next command resumes it exactly). ``--state DIR`` holds ``state.json``
(what is done, per job and seed, with each command's wall time) and the run folders; it is all a new
machine needs to continue, and ``--export DIR`` copies exactly that (the state and the run folders
still in flight) for a machine whose disk does not survive. After every command the results are
written as JSON (``--json``, default benchmarks/results/gpu_plan.json) and as tables in ``--docs``
(default docs/results.md, between the gpu_plan markers; the rest of the file is left as it is).
``--report`` only rewrites those two from the state.

Runners (both with the job's model options, e.g. an ordering, which the CLI has no flag for):
``packed`` (the default) trains a job's five seeds as one seed-packed network, as ``reslab train
MODEL --seeds 0 1 2 3 4`` does; ``sequential`` trains them one after another, each as ``reslab
train --seed S`` would. On CUDA every step is one CUDA graph replay (``--cuda-graphs``, the
default; ``--no-cuda-graphs --compile-mode reduce-overhead`` is the earlier way, forward and
backward graphed by torch.compile). ``--jobs KEY ...`` restricts the plan to those jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2, 3, 4)
BEGIN, END = "<!-- gpu_plan:begin -->", "<!-- gpu_plan:end -->"
STOP_MARGIN = 30.0  # seconds between SIGTERM and the budget: the trainer finishes its step,
#                     checkpoints and exits; a run still alive STOP_MARGIN later is killed
MAX_BUDGET = 570.0  # a command's budget at most: with start-up and the report, under 10 minutes

# CIFAR-10 test error (%) the papers report, on the original pixels and all 50k training images.
# He et al. 2015, Table 6 (ResNet-110: best of 5 runs, then mean ± std).
PAPER_TABLE6 = {20: "8.75", 32: "7.51", 44: "7.17", 56: "6.97", 110: "6.43 (6.61 ± 0.16)"}
# He et al. 2016, Table 2 (ResNet-110), as in reslab.analysis.orderings.PAPER_TABLE2.
PAPER_TABLE2 = {
    "original": "6.61",
    "bn_after_add": "8.17",
    "relu_before_add": "7.84",
    "relu_preact": "6.71",
    "full_preact": "6.37",
}
# He et al. 2016, Table 3 (CIFAR-10 column): original units against full pre-activation.
PAPER_TABLE3 = {
    ("164", "original"): "5.93",
    ("164", "full_preact"): "5.46",
    ("1001", "original"): "7.61",
    ("1001", "full_preact"): "4.92",
}


@dataclass(frozen=True)
class Job:
    """One network trained with several seeds: a row of one or more of the papers' tables."""

    key: str  # "table6/resnet20": unique, also names the run folders
    model: str  # registered model name
    options: tuple[tuple[str, Any], ...] = ()  # model options, e.g. (("ordering", "original"),)
    seeds: tuple[int, ...] = SEEDS
    rows: tuple[tuple[str, str, str], ...] = ()  # (table, row label, paper's error) per table
    # recipe fields beyond the runner's, e.g. (("grad_checkpointing", True),): memory, not maths
    train_options: tuple[tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        return self.key.replace("/", "-")


TABLES = (
    "He et al. 2015, Table 6: depth",
    "He et al. 2016, Table 2: unit orderings, ResNet-110",
    "He et al. 2016, Table 3: original vs pre-activation",
)


def make_plan(seeds: tuple[int, ...] = SEEDS) -> list[Job]:
    """The jobs in the order a GPU should run them."""
    t6, t2, t3 = TABLES
    jobs = []
    for d in (20, 32, 44, 56, 110):
        rows = [(t6, f"ResNet-{d}", PAPER_TABLE6[d])]
        if d == 110:  # the original ordering of Table 2 is this very network
            rows.append((t2, "original", PAPER_TABLE2["original"]))
        jobs.append(Job(f"table6/resnet{d}", f"cifar_resnet{d}", seeds=seeds, rows=tuple(rows)))
    for ordering in ("bn_after_add", "relu_before_add", "relu_preact", "full_preact"):
        row = (t2, ordering, PAPER_TABLE2[ordering])
        jobs.append(
            Job(
                f"table2/resnet110-{ordering}",
                "cifar_resnet110",
                (("ordering", ordering),),
                seeds,
                (row,),
            )
        )
    for depth in ("164", "1001"):
        for ordering, label in (("original", "original"), ("full_preact", "pre-activation")):
            row = (t3, f"ResNet-{depth} {label}", PAPER_TABLE3[depth, ordering])
            key, model = f"table3/resnet{depth}-{ordering}", f"cifar_preact_resnet{depth}"
            # ResNet-1001 keeps 146 MiB of activations per image (benchmarks/results/
            # grad_checkpointing_*.json): five packed members at batch 128 would need ~91 GiB,
            # with activation checkpointing ~30 GiB, which an 80 GB GPU holds
            extra = (("grad_checkpointing", True),) if depth == "1001" else ()
            jobs.append(Job(key, model, (("ordering", ordering),), seeds, (row,), extra))
    return jobs


# -- state ------------------------------------------------------------------------------------
def load_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "state.json"
    if not path.exists():
        return {"version": 1, "jobs": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt plan state {path}: {exc}") from exc


def save_state(state_dir: Path, state: dict[str, Any]) -> None:
    _write_text(state_dir / "state.json", json.dumps(state, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    from reslab._io import atomic_path  # lazy: --help works without the package on the path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def job_state(state: dict[str, Any], job: Job) -> dict[str, Any]:
    """A job's record: ``status`` (pending, running, finished, failed), per-seed ``members``,
    ``segments`` (one per command that worked on it), ``error``."""
    rec = state["jobs"].setdefault(job.key, {})
    rec.setdefault("status", "pending")
    rec.setdefault("members", {})
    rec.setdefault("segments", [])
    rec.setdefault("error", None)
    return rec


# -- runners ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a runner reports: per seed (as str) a record with ``status`` (finished, running,
    failed) and, when finished, ``test_error`` (%, single view) and its summary numbers."""

    members: dict[str, dict[str, Any]]
    error: str | None = None  # the job could not go on (a crash, not a deadline stop)
    log_tail: str = ""


class Runner(Protocol):
    name: str

    def run(
        self, job: Job, state_dir: Path, members: dict[str, dict[str, Any]], *, deadline: float
    ) -> Outcome:
        """Train ``job``'s unfinished seeds for at most ``deadline`` seconds, continuing runs
        that ``state_dir`` already holds; ``members`` is the job's record so far."""
        ...

    def resume_files(self, job: Job, state_dir: Path) -> list[Path]:
        """The files under ``state_dir`` that continuing ``job`` needs."""
        ...


@dataclass
class _Runner:
    """What both runners are given: the data, the device and threads of each training process,
    an iteration override (None: the recipe's 64k) and trainer options (e.g. cuda_graphs=True)."""

    data: str
    device: str = "cuda"
    threads: int = 2
    iters: int | None = None
    train_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PackedRunner(_Runner):
    """A job's unfinished seeds as one seed-packed network in one subprocess, as ``reslab train
    MODEL --seeds S ...`` trains them (with the job's model options, e.g. an ordering): the
    folder ``JOB-seeds-S-...`` holds the packed run and its members' run folders ``seed-S``."""

    name: str = "packed"

    def run(
        self, job: Job, state_dir: Path, members: dict[str, dict[str, Any]], *, deadline: float
    ) -> Outcome:
        out = {k: dict(v) for k, v in members.items()}
        seeds = [s for s in job.seeds if out.get(str(s), {}).get("status") not in
                 ("finished", "failed")]  # fmt: skip
        if not seeds:
            return Outcome(out)
        run_dir = self.run_dir(job, seeds, state_dir)
        spec = {"data": self.data, "model": job.model, "options": dict(job.options),
                "seeds": seeds, "out": str(run_dir), "device": self.device,
                "threads": self.threads, "iters": self.iters,
                "train_options": {**self.train_options, **dict(job.train_options)}}  # fmt: skip
        rc, tail = train_process(["--packed", json.dumps(spec)], run_dir, deadline)
        failed = {}
        summary = run_dir / "summary.json"
        if summary.exists():
            failed = json.loads(summary.read_text()).get("failed_members", {})
        for seed in seeds:
            member = f"seed-{seed}"
            if member in failed:
                out[str(seed)] = {"status": "failed", "returncode": rc, "message": failed[member]}
            else:
                out[str(seed)] = member_record(run_dir / member, rc, log=run_dir / "train.log")
        return Outcome(out, None, tail)

    @staticmethod
    def run_dir(job: Job, seeds: list[int], state_dir: Path) -> Path:
        """The packed run of ``seeds`` (named by them, so a retry of failed seeds is a new run)."""
        return state_dir / f"{job.slug}-seeds-{'-'.join(map(str, seeds))}"

    def resume_files(self, job: Job, state_dir: Path) -> list[Path]:
        files = []
        for run_dir in sorted(state_dir.glob(f"{job.slug}-seeds-*")):
            if (run_dir / "checkpoint_latest.pt").exists() and not (
                run_dir / "summary.json"
            ).exists():
                files += sorted(p for p in run_dir.rglob("*") if p.is_file())
        return files


def train_process(args: list[str], run_dir: Path, seconds: float) -> tuple[int, str]:
    """``python gpu_plan.py ARGS`` (one training process) for at most ``seconds``, then SIGTERM
    (the trainer checkpoints and stops), killed if still alive STOP_MARGIN later. Appends its
    output to ``run_dir/train.log``; returns the exit status and the log's end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, __file__, *args]
    with (run_dir / "train.log").open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and stops
            try:
                proc.wait(timeout=STOP_MARGIN)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode, (run_dir / "train.log").read_text()[-1500:]


@dataclass
class SequentialRunner(_Runner):
    """The seeds one after another, each a subprocess training as ``reslab train --seed S``."""

    name: str = "sequential"

    def run(
        self, job: Job, state_dir: Path, members: dict[str, dict[str, Any]], *, deadline: float
    ) -> Outcome:
        start = time.monotonic()
        out = {k: dict(v) for k, v in members.items()}
        tail = ""
        for seed in job.seeds:
            if out.get(str(seed), {}).get("status") in ("finished", "failed"):
                continue
            left = deadline - (time.monotonic() - start)
            if left <= 0:
                break
            run_dir = state_dir / f"{job.slug}-seed{seed}"
            rc, tail = self._train(job, seed, run_dir, left)
            out[str(seed)] = member_record(run_dir, rc)  # a failed seed is a result: go on
            if out[str(seed)]["status"] == "running":
                break  # stopped at the deadline: the next command continues it
        return Outcome(out, None, tail)

    def _train(self, job: Job, seed: int, run_dir: Path, seconds: float) -> tuple[int, str]:
        spec = {
            "data": self.data,
            "model": job.model,
            "options": dict(job.options),
            "seed": seed,
            "out": str(run_dir),
            "device": self.device,
            "threads": self.threads,
            "iters": self.iters,
            "train_options": {**self.train_options, **dict(job.train_options)},
        }
        return train_process(["--member", json.dumps(spec)], run_dir, seconds)

    def resume_files(self, job: Job, state_dir: Path) -> list[Path]:
        files = []
        for seed in job.seeds:
            run_dir = state_dir / f"{job.slug}-seed{seed}"
            if (run_dir / "checkpoint_latest.pt").exists() and not (
                run_dir / "summary.json"
            ).exists():
                files += sorted(p for p in run_dir.iterdir() if p.is_file())
        return files


def member_record(run_dir: Path, returncode: int, *, log: Path | None = None) -> dict[str, Any]:
    """A seed's record from its run folder: finished (with the summary's numbers), stopped at
    the deadline (``running``), or failed (the last line of ``log``, default its train.log)."""
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        val = s.get("val_accuracy")
        return {
            "status": "finished",
            "test_error": 100 * (1 - s["test_accuracy_single_view"]),  # the papers' single view
            "val_error": None if val is None else 100 * (1 - val),
            "train_seconds": s["train_seconds"],
            "images_per_second": s["images_per_second"],
            "steps": s["steps"],
        }
    if returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
        return {"status": "running"}
    log = log or run_dir / "train.log"
    last = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    return {"status": "failed", "returncode": returncode, "message": " ".join(last)}


def train_job(spec: dict[str, Any]) -> int:
    """One seed of a job (``spec["seed"]``), or several packed (``spec["seeds"]``), as ``reslab
    train MODEL --recipe paper --seed S`` (or ``--seeds S ...``) trains them, with the job's model
    options (the CLI has no flag for those); continues the run folder if it holds a run. Runs in
    its own process, started by :class:`SequentialRunner` or :class:`PackedRunner`."""
    import torch

    from reslab.data import load_data
    from reslab.models import ResNetConfig, build_model, get_config
    from reslab.models.packed import build_packed
    from reslab.train import TrainConfig, TrainingInterrupted, fit
    from reslab.train.checkpoint import LATEST, load_model

    splits = load_data(spec["data"], verbose=True)
    overrides = {
        "seed": spec.get("seed", 0),
        "device": spec["device"],
        "threads": spec["threads"],
        **spec["train_options"],
    }
    if spec["iters"] is not None:
        overrides["iters"] = spec["iters"]
    cfg = TrainConfig.preset("paper", **overrides)
    out = Path(spec["out"])
    resume = (out / LATEST).exists()
    config = get_config(spec["model"], in_channels=splits.in_channels,
                        num_classes=splits.num_classes, **spec["options"])  # fmt: skip
    model: torch.nn.Module
    if "seeds" in spec:  # resumed or not, the weights are the members' (or the checkpoint's)
        assert isinstance(config, ResNetConfig)  # every job of the plan is a ResNet
        model = build_packed(config, spec["seeds"])
    elif resume:
        model = load_model(out / LATEST).train()
    else:
        torch.manual_seed(cfg.seed)  # the initial weights, as reslab train
        model = build_model(config)
    info = {
        "model_name": spec["model"],
        "model_options": spec["options"],
        "data_spec": spec["data"],
    }
    try:
        fit(
            model, splits, cfg, out, resume=resume, run_info=info, verbose=True, allow_nonempty=True
        )  # the folder holds the plan's own train.log
    except TrainingInterrupted as exc:
        print(f"gpu_plan: {exc}", flush=True)
        return 128 + exc.signum
    return 0


# -- the driver -------------------------------------------------------------------------------
def advance(
    jobs: list[Job],
    state_dir: Path,
    runner: Runner,
    *,
    budget: float,
    clock: Callable[[], float] = time.monotonic,
    min_seconds: float = 60.0,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Work through ``jobs`` in order for at most ``budget`` seconds, saving the state after
    every job segment. Finished and failed jobs are skipped; the job in flight continues first.
    A job is not started with less than ``min_seconds`` left."""
    start = clock()
    state = load_state(state_dir)
    for job in jobs:
        rec = job_state(state, job)
        if rec["status"] in ("finished", "failed"):
            continue
        left = budget - (clock() - start) - STOP_MARGIN
        if left < min_seconds:
            break
        t0 = clock()
        outcome = runner.run(job, state_dir, rec["members"], deadline=left)
        rec["members"] = outcome.members
        status = [outcome.members.get(str(s), {}).get("status") for s in job.seeds]
        rec["segments"].append(
            {
                "runner": runner.name,
                "wall_seconds": clock() - t0,
                "seeds_finished": status.count("finished"),
                "argv": sys.argv[1:] if argv is None else argv,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
        )
        if outcome.error is not None:
            rec["status"], rec["error"] = "failed", f"{outcome.error}\n{outcome.log_tail}"
        elif all(s in ("finished", "failed") for s in status):
            # a seed whose loss went non-finite is a result (listed as failed, not averaged)
            rec["status"] = "finished" if "finished" in status else "failed"
        else:
            rec["status"] = "running"
        save_state(state_dir, state)
        if rec["status"] == "running":
            break  # out of time: the next command continues here
    save_state(state_dir, state)
    return state


def retry_failed(state: dict[str, Any]) -> dict[str, Any]:
    """Mark failed jobs, and the failed seeds of finished ones, to be run again."""
    for rec in state["jobs"].values():
        failed = [s for s, m in rec.get("members", {}).items() if m["status"] == "failed"]
        if rec.get("status") == "failed" or failed:
            rec["status"], rec["error"] = "running", None
            for s in failed:
                rec["members"][s] = {"status": "pending"}
    return state


def summarize(jobs: list[Job], state: dict[str, Any]) -> list[dict[str, Any]]:
    """One result row per (table, job), in plan order, with mean ± std and median over the
    finished seeds (failed seeds are listed, not averaged)."""
    rows = []
    for table in TABLES:
        for job in jobs:
            for t, label, paper in job.rows:
                if t != table:
                    continue
                rec = state["jobs"].get(job.key, {})
                members = rec.get("members", {})
                done = {s: m for s, m in members.items() if m.get("status") == "finished"}
                seeds_done = sorted(done, key=int)
                errors = [done[s]["test_error"] for s in seeds_done]
                rows.append(
                    {
                        "table": table,
                        "row": label,
                        "job": job.key,
                        "model": job.model,
                        "options": dict(job.options),
                        "seeds": list(job.seeds),
                        "status": rec.get("status", "pending"),
                        "seeds_finished": sorted(int(s) for s in done),
                        "seeds_failed": sorted(
                            int(s) for s, m in members.items() if m.get("status") == "failed"
                        ),
                        "test_errors": errors,
                        "mean": statistics.mean(errors) if errors else None,
                        "std": statistics.stdev(errors) if len(errors) > 1 else None,
                        "median": statistics.median(errors) if errors else None,
                        "paper": paper,
                        "wall_seconds": sum(s["wall_seconds"] for s in rec.get("segments", [])),
                        "images_per_second": [done[s]["images_per_second"] for s in seeds_done],
                        "commands": [" ".join(s["argv"]) for s in rec.get("segments", [])],
                    }
                )
    return rows


def render_tables(rows: list[dict[str, Any]]) -> str:
    lines = [
        BEGIN,
        "",
        "Written by `benchmarks/gpu_plan.py` from its state: test error of the final model, single "
        "view, CIFAR-10 JPEG, 45k training images (the papers: original pixels, all 50k).",
        "",
    ]
    head = (
        "| network | seeds done | test error % (mean ± std) | median | paper | wall "
        "| img/s per seed |"
    )
    for table in TABLES:
        lines += [f"#### {table}", "", head, "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["table"] == table):
            if r["mean"] is None:
                err = median = "—"
            else:
                std = f" ± {r['std']:.2f}" if r["std"] is not None else ""
                err, median = f"{r['mean']:.2f}{std}", f"{r['median']:.2f}"
            done = f"{len(r['seeds_finished'])}/{len(r['seeds'])}"
            if r["seeds_failed"]:
                done += f" ({len(r['seeds_failed'])} failed)"
            rate = (
                f"{statistics.mean(r['images_per_second']):,.0f}" if r["images_per_second"] else "—"
            )
            wall = f"{r['wall_seconds'] / 60:.1f} min" if r["wall_seconds"] else "—"
            lines.append(
                f"| {r['row']} | {done} | {err} | {median} | {r['paper']} | {wall} | {rate} |"
            )
        lines.append("")
    commands = sorted({c for r in rows for c in r["commands"]})
    if commands:
        lines += [
            "Commands:",
            "",
            "```bash",
            *(f"python3 benchmarks/gpu_plan.py {c}" for c in commands),
            "```",
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def write_docs(path: Path, block: str) -> None:
    """Replace the text between the gpu_plan markers of ``path`` (append a section if absent)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## GPU plan: the papers' tables with five seeds\n\n"
            + block
            + "\n"
        )
    _write_text(path, text)


def report(
    jobs: list[Job], state: dict[str, Any], json_path: Path, docs: Path, *, device: str = "cuda"
) -> None:
    rows = summarize(jobs, state)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_result

    write_result(json_path, {"plan": [dataclasses.asdict(j) for j in jobs], "rows": rows},
                 device=device)  # fmt: skip
    write_docs(docs, render_tables(rows))


def export(jobs: list[Job], state_dir: Path, runner: Runner, dest: Path) -> list[Path]:
    """Copy what continuing the plan needs (state.json and the runs in flight) to ``dest``."""
    state = load_state(state_dir)
    files = [state_dir / "state.json"]
    for job in jobs:
        if state["jobs"].get(job.key, {}).get("status") == "running":
            files += runner.resume_files(job, state_dir)
    copied = []
    for f in files:
        target = dest / f.relative_to(state_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        copied.append(target)
    return copied


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="CIFAR-10, e.g. a JPEG zip such as cifar10-jpeg.zip")
    p.add_argument("--state", type=Path, default=ROOT / "runs" / "gpu_plan")
    p.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help=f"seconds this command may work (at most {MAX_BUDGET:.0f})",
    )
    p.add_argument("--runner", choices=("packed", "sequential"), default="packed")
    p.add_argument("--jobs", nargs="+", metavar="KEY", help="only these jobs (default: all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="default: the recipe's 64k")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, the whole training step as one CUDA graph (default; reslab train "
        "--cuda-graphs)",
    )
    p.add_argument(
        "--compile-mode",
        default="none",
        help="also torch.compile the model in this mode on CUDA (default 'none'); without "
        "--cuda-graphs, 'reduce-overhead' graphs forward and backward only (docs/results.md)",
    )
    p.add_argument("--retry-failed", action="store_true", help="run failed jobs again")
    p.add_argument("--report", action="store_true", help="only rewrite the JSON and tables")
    p.add_argument("--export", type=Path, default=None, help="copy the state needed to go on")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/gpu_plan.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs/results.md")
    p.add_argument("--member", help=argparse.SUPPRESS)  # a SequentialRunner subprocess
    p.add_argument("--packed", help=argparse.SUPPRESS)  # a PackedRunner subprocess
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not STOP_MARGIN < args.budget <= MAX_BUDGET:
        p.error(
            f"--budget must be above {STOP_MARGIN:.0f} and at most {MAX_BUDGET:.0f} seconds (a "
            f"command stays under 10 minutes; run it again to go on), got {args.budget:g}"
        )
    if args.member or args.packed:
        return train_job(json.loads(args.member or args.packed))
    jobs = make_plan(tuple(args.seeds))
    if args.jobs:
        unknown = sorted(set(args.jobs) - {j.key for j in jobs})
        if unknown:
            p.error(f"unknown jobs {unknown}; the plan's: {', '.join(j.key for j in jobs)}")
        jobs = [j for j in jobs if j.key in args.jobs]
    options: dict[str, Any] = {}
    if args.device.startswith("cuda"):
        options["cuda_graphs"] = args.cuda_graphs
        if args.compile_mode != "none":
            options.update(compile=True, compile_mode=args.compile_mode)
    runner_type = PackedRunner if args.runner == "packed" else SequentialRunner
    runner: Runner = runner_type(args.data or "", args.device, args.threads, args.iters, options)
    if not args.report:
        if not args.data:
            p.error("--data is needed to train")
        if args.retry_failed:
            save_state(args.state, retry_failed(load_state(args.state)))
        advance(jobs, args.state, runner, budget=args.budget)
    state = load_state(args.state)
    report(jobs, state, args.json, args.docs, device=args.device)
    for job in jobs:
        rec = state["jobs"].get(job.key, {})
        print(f"{job.key:<36} {rec.get('status', 'pending')}")
    if args.export is not None:
        copied = export(jobs, args.state, runner, args.export)
        print(f"exported {len(copied)} files to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

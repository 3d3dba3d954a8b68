"""benchmarks/gpu_plan.py: the papers' tables with five seeds, one bounded command at a time.

The bookkeeping (resuming across commands within the budget, failed seeds, the docs block, the
export) runs with a runner that only pretends to train on a fake clock; the two real runners
train tiny runs on the digits (the packed one through the script's command line).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from reslab.models import ResNetConfig, get_config

pytestmark = pytest.mark.usefixtures("one_thread")
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
        # activation checkpointing where five packed members would not fit in 80 GB otherwise
        assert dict(job.train_options) == ({"grad_checkpointing": True} if "1001" in job.key
                                           else {})  # fmt: skip


def test_gpu_plan_runners_pass_the_jobs_recipe_options(gpu_plan, tmp_path, monkeypatch) -> None:
    """What a training process is told: the job's model options and its recipe options on top
    of the runner's (ResNet-1001 checkpoints activations; CUDA graphs stay on)."""
    specs = []

    def record(args, run_dir, seconds):
        specs.append(json.loads(args[1]))
        return 0, ""

    monkeypatch.setattr(gpu_plan, "train_process", record)
    [job] = [j for j in gpu_plan.make_plan((0, 1)) if j.key == "table3/resnet1001-full_preact"]
    for runner_type in (gpu_plan.PackedRunner, gpu_plan.SequentialRunner):
        runner = runner_type("d.zip", "cuda", 2, None, {"cuda_graphs": True})
        runner.run(job, tmp_path, {}, deadline=100)
    # one packed process of both seeds; the sequential runner's seed 0 wrote no summary, so
    # it counts as stopped at the deadline and seed 1 waits for the next command
    assert [spec.get("seeds", spec.get("seed")) for spec in specs] == [[0, 1], 0]
    for spec in specs:
        assert spec["options"] == {"ordering": "full_preact"}
        assert spec["train_options"] == {"cuda_graphs": True, "grad_checkpointing": True}


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


def test_gpu_plan_command_skips_finished_jobs_and_stays_in_its_budget(
    gpu_plan, tmp_path, monkeypatch, capsys
) -> None:
    """The command line on a state whose job is finished (as a command before it left it):
    nothing is trained again (no training process starts), the JSON and the docs table are
    written from the state; a budget that would take the command past 10 minutes is refused."""
    state_dir = tmp_path / "state"
    jobs = gpu_plan.make_plan((0, 1))[:1]
    gpu_plan.advance(jobs, state_dir, _FakeRunner(_Clock(), {"table6/resnet20": 5}), budget=540)
    before = (state_dir / "state.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished job was trained again: {args}")

    monkeypatch.setattr(gpu_plan, "train_process", no_training)
    argv = ["--data", "digits", "--device", "cpu", "--seeds", "0", "1", "--state",
            str(state_dir), "--json", str(tmp_path / "r.json"), "--docs", str(tmp_path / "d.md"),
            "--jobs", "table6/resnet20"]  # fmt: skip
    assert gpu_plan.main(argv) == 0
    assert (state_dir / "state.json").read_text() == before
    assert "table6/resnet20" in capsys.readouterr().out
    assert "| ResNet-20 | 2/2 | 10.50 ± 0.71 | 10.50 | 8.75 |" in (tmp_path / "d.md").read_text()
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["test_errors"] == [10, 11]
    for budget in ("600", "20"):
        with pytest.raises(SystemExit, match="2"):
            gpu_plan.main([*argv, "--budget", budget])
        assert "--budget must be above 30 and at most 570 seconds" in capsys.readouterr().err


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
    state = (state_dir / "state.json").read_text()
    assert gpu_plan.main(argv) == 0  # the next command: the finished job is not run again
    assert (state_dir / "state.json").read_text() == state
    spec = {"data": "digits", "model": "cifar_resnet20", "options": {}, "seeds": [0, 1],
            "out": str(run), "device": "cpu", "threads": 1, "iters": 5,
            "train_options": {}}  # fmt: skip
    assert gpu_plan.train_job(spec) == 0
    assert torch.load(run / "seed-0" / "checkpoint_latest.pt", weights_only=True)["step"] == 5
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error
        gpu_plan.main(["--jobs", "table6/nothing", "--report"])

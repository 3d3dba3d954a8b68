"""The ``paper`` recipe (He et al. 2015, §4.2: 64k iterations, batch 128) for several models and
seeds on one GPU; reports test error as mean ± std over seeds, and wall time.

    python benchmarks/paper_gpu.py --data data/cifar10-jpeg.zip \
        --models cifar_resnet20 cifar_resnet56 --seeds 0 1 2 [--iters N] \
        [-- --compile --compile-mode reduce-overhead]

Every (model, seed) is its own ``python -m reslab train`` process, run one after another (or all
at once with ``--parallel``, which measured no faster on an H100). Arguments after ``--`` go to
every ``reslab train``. ``--deadline S`` sends SIGTERM after S seconds (the
trainer checkpoints and stops), so a run that would outlast a machine's lease still reports how
far it got; ``--resume`` then continues every unfinished run under ``--runs`` from its last
checkpoint (``reslab train --resume``, exact) and skips finished ones, so one 64k-iteration run can
be spread over several commands, or machines when the run folder travels with the next command.
Prints a table and writes JSON (default benchmarks/results/paper_gpu.json) with each run's
summary and error curve; wall time is summed over a run's segments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _alive(job: dict) -> bool:
    return job["proc"] is not None and job["proc"].poll() is None


def _segments(out: Path) -> list[float]:
    """Wall seconds of each earlier command that worked on this run folder."""
    f = out / "paper_gpu_wall.json"
    return json.loads(f.read_text()) if f.exists() else []


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=None, help="default: the recipe's 64k")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    p.add_argument("--parallel", action="store_true", help="start every run at once")
    p.add_argument("--deadline", type=float, default=None, help="SIGTERM every run after S s")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue unfinished runs in --runs from their checkpoints; skip finished ones",
    )
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper_gpu")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "paper_gpu.json")
    args = p.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    specs = [(model, seed) for model in args.models for seed in args.seeds]
    taken = [args.runs / f"{m}-seed{s}" for m, s in specs]
    taken = [d for d in taken if (d / "checkpoint_latest.pt").exists()]
    if taken and not args.resume:  # the trainer would refuse each of them; say so once, here
        sys.exit(f"paper_gpu: {', '.join(map(str, taken))} already hold runs: pass --resume to "
                 f"continue (or skip) them, or --runs to start elsewhere")  # fmt: skip
    jobs: list[dict] = []
    start = time.perf_counter()
    termed = False
    # --parallel: all at once; else one after another (on the H100 six runs side by side did no
    # better together than one alone: the GPU time-slices between processes, docs/results.md)
    while specs or any(_alive(j) for j in jobs):
        running = [j for j in jobs if _alive(j)]
        while specs and not termed and (args.parallel or not running):
            model, seed = specs.pop(0)
            out = args.runs / f"{model}-seed{seed}"
            resuming = args.resume and (out / "checkpoint_latest.pt").exists()
            if resuming and (out / "summary.json").exists():
                print(f"{model} seed {seed}: finished earlier, not run again", flush=True)
                jobs.append({"model": model, "seed": seed, "out": out, "cmd": [], "proc": None,
                             "wall": 0.0, "log": None})  # fmt: skip
                continue
            if resuming:  # the recipe, seed and iteration count come from the run's config.json
                cmd = [sys.executable, "-m", "reslab", "train", "--resume", str(out),
                       "--data", args.data, "--device", args.device,
                       "--threads", str(args.threads)]  # fmt: skip
            else:
                cmd = [sys.executable, "-m", "reslab", "train", model, "--data", args.data,
                       "--recipe", "paper", "--seed", str(seed), "--device", args.device,
                       "--threads", str(args.threads), "--out", str(out)]  # fmt: skip
                if args.iters is not None:
                    cmd += ["--iters", str(args.iters)]
            cmd += extra
            out.mkdir(parents=True, exist_ok=True)
            log = (out / "train.log").open("a" if resuming else "w")
            if not resuming:  # a folder left without a checkpoint starts its wall time afresh
                (out / "paper_gpu_wall.json").unlink(missing_ok=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{'resumed' if resuming else 'started'} {model} seed {seed}", flush=True)
            job = {"model": model, "seed": seed, "out": out, "cmd": cmd, "proc": proc,
                   "t0": time.perf_counter(), "log": log}  # fmt: skip
            jobs.append(job)
            running.append(job)
        for j in jobs:
            if not _alive(j) and "wall" not in j:
                j["wall"] = time.perf_counter() - j["t0"]
        if args.deadline and not termed and time.perf_counter() - start > args.deadline:
            for j in jobs:
                if _alive(j):
                    j["proc"].send_signal(signal.SIGTERM)
            termed, specs = True, []
        time.sleep(0.5)
    runs = []
    for j in jobs:
        if "wall" not in j:
            j["wall"] = time.perf_counter() - j["t0"]
        segments = _segments(j["out"])
        if j["proc"] is not None:
            j["log"].close()
            segments.append(j["wall"])
            (j["out"] / "paper_gpu_wall.json").write_text(json.dumps(segments))
        summary_file = j["out"] / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        history = _read_jsonl(j["out"] / "metrics.jsonl")
        runs.append({
            "model": j["model"], "seed": j["seed"],
            "returncode": j["proc"].returncode if j["proc"] is not None else 0,
            "finished": summary is not None, "wall_seconds": sum(segments),
            "wall_segments": segments,
            "command": " ".join(j["cmd"][1:]), "summary": summary, "history": history,
            "log_tail": (j["out"] / "train.log").read_text()[-1500:],
        })  # fmt: skip

    table = {}
    head = f"{'model':<16} {'seeds':>5} {'test error %':>16} {'train s':>9} {'wall s':>8}"
    print(f"\n{head} {'img/s':>7}")
    for model in args.models:
        done = [r for r in runs if r["model"] == model and r["finished"]]
        if not done:
            print(f"{model:<16} no run finished")
            continue
        errs = [100 * (1 - r["summary"]["test_accuracy"]) for r in done]
        row = {
            "seeds": [r["seed"] for r in done],
            "test_error_percent": errs,
            "test_error_mean": statistics.mean(errs),
            "test_error_std": statistics.stdev(errs) if len(errs) > 1 else None,
            "best_val_accuracy": [r["summary"]["best_val_accuracy"] for r in done],
            "train_seconds": [r["summary"]["train_seconds"] for r in done],
            "wall_seconds": [r["wall_seconds"] for r in done],
            "images_per_second": [r["summary"]["images_per_second"] for r in done],
        }
        table[model] = row
        std = f" ± {row['test_error_std']:.2f}" if row["test_error_std"] is not None else ""
        print(f"{model:<16} {len(done):>5} {row['test_error_mean']:>9.2f}{std:<7} "
              f"{max(row['train_seconds']):>9.0f} {max(row['wall_seconds']):>8.0f} "
              f"{statistics.mean(row['images_per_second']):>7.0f}")  # fmt: skip
    write_result(
        args.json,
        {"argv": sys.argv[1:], "parallel": args.parallel, "models": table, "runs": runs},
        device=args.device,  # the device of the runs it started
    )  # fmt: skip


if __name__ == "__main__":
    main()

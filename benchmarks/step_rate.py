"""Images per second of the bare training step under the layouts, compilation and input sizes
that the ``fast`` recipe chose between, in one run (synthetic inputs: only speed is measured).

    .venv/bin/python benchmarks/step_rate.py [--model cifar_resnet20] [--steps 10] [--threads 2]

Each variant runs in its own subprocess (so compilation caches and allocator state do not carry
over) one after another. Two variants put the bare step beside the recipe's: bf16 autocast (fast
only where the CPU has native bf16), and two single-threaded processes side by side, each on
half the batch (what 2-rank DDP on this CPU would compute; their rates are summed, the
all-reduce is not included). Prints a table and writes benchmarks/results/step_rate.json.

``--profile`` instead profiles the eager channels_last step (torch.profiler) and reports how many
GFLOP/s the convolutions reach forward and backward, to set against the CPU's peak; it writes
benchmarks/results/step_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]

# (label, channels_last, compile, side, precision, processes): the recipe's candidates
VARIANTS = (
    ("eager NCHW, 32 px", False, False, 32, "fp32", 1),
    ("eager channels_last, 32 px", True, False, 32, "fp32", 1),
    ("compiled NCHW, 32 px", False, True, 32, "fp32", 1),
    ("compiled channels_last, 32 px", True, True, 32, "fp32", 1),
    ("eager channels_last, 24 px", True, False, 24, "fp32", 1),
    ("eager channels_last, 16 px", True, False, 16, "fp32", 1),
    ("eager channels_last, 32 px, bf16", True, False, 32, "bf16", 1),
    ("2 procs x 1 thread, cl, 32 px", True, False, 32, "fp32", 2),
    ("2 procs x 1 thread, cl, 16 px", True, False, 16, "fp32", 2),
)


def one(model_name: str, batch: int, channels_last: bool, compiled: bool, side: int,
        steps: int, warmup: int, threads: int, precision: str = "fp32") -> float:  # fmt: skip
    import torch
    import torch.nn.functional as F

    from reslab import create_model

    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(model_name).train().to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    step_model = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    bf16 = precision == "bf16"
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = step_model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def profile(model_name: str, batch: int, steps: int, threads: int) -> dict:
    """Convolution GFLOP/s in the eager channels_last training step (forward counted with
    FlopCounterMode; backward as twice the forward: input and weight gradients)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from reslab import create_model
    from reslab.summary import count_macs

    torch.set_num_threads(threads)
    model = create_model(model_name).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.config.num_classes, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    with torch.no_grad():
        macs, _ = count_macs(model, x)  # conv + fc multiply-adds of one forward pass
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(rows.values())
    fwd_s, bwd_s = rows.get("aten::mkldnn_convolution", 0.0), rows["aten::convolution_backward"]
    fwd_flop = 2 * macs * steps
    return {
        "forward_conv_seconds": fwd_s,
        "backward_conv_seconds": bwd_s,
        "step_seconds_profiled": total,
        "conv_share_of_step": (fwd_s + bwd_s) / total,
        "forward_conv_gflops": fwd_flop / fwd_s / 1e9,
        "backward_conv_gflops": 2 * fwd_flop / bwd_s / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps before (compilation)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_rate.json")
    ap.add_argument("--profile", action="store_true", help="convolution GFLOP/s instead")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # a subprocess's own variant
    args = ap.parse_args()
    if args.profile:
        result = profile(args.model, args.batch_size, args.steps, args.threads)
        result |= {"model": args.model, "batch_size": args.batch_size, "threads": args.threads}
        for k, v in result.items():
            print(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}")
        write_result(args.out.with_name("step_profile.json"), result, device="cpu")
        return
    if args.one:
        cl, comp, side = args.one[0] == "1", args.one[1] == "1", int(args.one[2])
        rate = one(args.model, args.batch_size, cl, comp, side, args.steps, args.warmup,
                   args.threads, args.one[3])  # fmt: skip
        print(json.dumps({"rate": rate}))
        return
    rows = []
    for label, cl, comp, side, precision, procs in VARIANTS:
        # side by side, every process takes its share of the threads and of the batch
        cmd = [sys.executable, __file__, "--model", args.model, "--batch-size",
               str(args.batch_size // procs), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(max(1, args.threads // procs)),
               "--one", str(int(cl)), str(int(comp)), str(side), precision]  # fmt: skip
        load = os.getloadavg()[0]
        running = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(procs)
        ]
        outs = [proc.communicate()[0] for proc in running]
        if any(proc.returncode for proc in running):
            raise RuntimeError(f"{label}: a benchmark subprocess failed: {' '.join(cmd)}")
        rates = [json.loads(o.strip().splitlines()[-1])["rate"] for o in outs]
        rate = sum(rates)
        rows.append({"variant": label, "channels_last": cl, "compile": comp, "side": side,
                     "precision": precision, "processes": procs, "process_rates": rates,
                     "images_per_second": rate, "load_average_before": load})  # fmt: skip
        print(f"{label:<32} {rate:7.0f} img/s", flush=True)
    result = {
        "unit": "training images per second (forward + backward + SGD step), synthetic input",
        "model": args.model,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "rows": rows,
    }
    write_result(args.out, result, device="cpu")


if __name__ == "__main__":
    main()

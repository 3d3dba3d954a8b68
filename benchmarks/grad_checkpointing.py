"""Peak memory of one training step with and without activation checkpointing, in one run.

    .venv/bin/python benchmarks/grad_checkpointing.py [--model cifar_preact_resnet164]
        [--batches 2 4 8] [--checkpointed-batches 128] [--threads 1]

For each batch size, one SGD step (forward, backward, momentum update) of the model as it is
and with ``model.set_grad_checkpointing()``, both measured with torch's ``MemTracker``, which
counts the bytes of every live tensor by kind (parameters, gradients, optimiser state,
activations, temporaries) on any device - here the CPU, so no allocator caching or cuDNN
workspace is included. The tracker is trimmed to the global peak (:func:`peak_tracker`) and
checked against the stock one at the start. A second, untracked step of each is timed (the
ratio is what recomputation costs). ``--checkpointed-batches`` are measured with checkpointing
only and not timed (the ordinary step at those sizes may not fit in this machine's memory).

Activation memory grows linearly with the batch, so each mode's peak is fitted as
``a + b * batch`` on the batches measured and extrapolated to 128 (He et al. 2016's batch),
beside the measurement where there is one. Writes benchmarks/results/grad_checkpointing.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import write_result

from reslab.models import create_model

GIB = 2**30


def peak_tracker(full: bool = False) -> Any:
    """torch's MemTracker, by default with its per-module bookkeeping cut to the global peak.

    On every allocation MemTracker updates the peak of each module it has seen (a loop over all
    of them), which is quadratic in depth: one tracked step of ResNet-1001 at batch 2 took 55
    minutes on the shared CPU. Only the global peak is reported here, so the override keeps the
    second half of its ``_update_peak_stats`` (``full=True``: the stock tracker, for the check
    that both give the same peak).
    """
    from copy import deepcopy

    from torch.distributed._tools import mem_tracker

    if full:
        return mem_tracker.MemTracker()

    class GlobalPeakTracker(mem_tracker.MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mem_tracker._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mem_tracker._TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(snap)

    return GlobalPeakTracker()


def one_step(
    model_name: str,
    batch: int,
    checkpointing: bool,
    *,
    timed: bool = True,
    full_tracker: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Peak bytes of a tracked SGD step and (``timed``) the seconds of an untracked one."""
    torch.manual_seed(seed)
    model = create_model(model_name).train()
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    tracker = peak_tracker(full_tracker)
    tracker.track_external(model, opt)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    seconds = None
    if timed:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    kinds = {str(getattr(k, "value", k)): int(v) for k, v in peak.items()}
    return {
        "model": model_name,
        "batch": batch,
        "checkpointing": checkpointing,
        "peak_bytes": int(peak["Total"]),
        "peak_gib": peak["Total"] / GIB,
        "peak_by_kind": kinds,
        "step_seconds": seconds,
    }


def linear_fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``bytes = a + b * batch``."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (v - my) for b, v in points) / sxx
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_preact_resnet164")
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--checkpointed-batches", type=int, nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # the trimmed tracker must report what the stock one does (a small net, where both are quick)
    check = {
        label: one_step("cifar_preact_resnet164", 2, True, timed=False, full_tracker=full)[
            "peak_bytes"
        ]
        for label, full in (("stock_memtracker", True), ("global_peak_tracker", False))
    }
    print(f"tracker check (ResNet-164, batch 2, checkpointed): {check}")
    if len(set(check.values())) != 1:
        raise SystemExit(f"the trimmed tracker disagrees with MemTracker: {check}")
    rows = []
    for batch in args.batches:
        for checkpointing in (False, True):
            rows.append(one_step(args.model, batch, checkpointing))
            r = rows[-1]
            print(f"{args.model} batch {batch:4d} checkpointing={checkpointing!s:5}: "
                  f"{r['peak_gib']:.3f} GiB, {r['step_seconds']:.2f} s")  # fmt: skip
    for batch in args.checkpointed_batches:
        rows.append(one_step(args.model, batch, True, timed=False))
        print(f"{args.model} batch {batch:4d} checkpointing=True : {rows[-1]['peak_gib']:.3f} GiB")

    fits = {}
    for checkpointing in (False, True):
        pts = [(r["batch"], r["peak_bytes"]) for r in rows
               if r["checkpointing"] == checkpointing and r["batch"] in args.batches]  # fmt: skip
        if len(pts) >= 2:
            a, b = linear_fit(pts)
            fits["checkpointed" if checkpointing else "ordinary"] = {
                "fixed_bytes": a,
                "bytes_per_image": b,
                "at_128_gib": (a + 128 * b) / GIB,
                "at_64_gib": (a + 64 * b) / GIB,
            }
    ratios = {}
    for batch in args.batches:
        by = {r["checkpointing"]: r for r in rows if r["batch"] == batch}
        if len(by) == 2:
            ratios[str(batch)] = {
                "peak": by[True]["peak_bytes"] / by[False]["peak_bytes"],
                "step_time": by[True]["step_seconds"] / by[False]["step_seconds"],
            }
    for name, fit in fits.items():
        print(f"{name}: {fit['bytes_per_image'] / 2**20:.1f} MiB per image; extrapolated: "
              f"batch 128 {fit['at_128_gib']:.2f} GiB, 64 {fit['at_64_gib']:.2f} GiB")  # fmt: skip
    for batch, ratio in ratios.items():
        print(f"batch {batch}: checkpointed / ordinary peak {ratio['peak']:.3f}, "
              f"step time {ratio['step_time']:.2f}")  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"grad_checkpointing_{args.model}.json"
    result = {"model": args.model, "threads": args.threads, "tracker_check": check, "rows": rows,
              "linear_fits": fits, "ratios": ratios}  # fmt: skip
    write_result(out, result, device="cpu")


if __name__ == "__main__":
    main()

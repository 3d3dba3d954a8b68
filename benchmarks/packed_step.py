"""Images per second of seed-packed training against one member alone and against K members run
one after another, in one process (synthetic inputs: only speed is measured).

    PYTHONPATH=. .venv/bin/python benchmarks/packed_step.py [--members 5] [--batch-size 128] \
        [--rounds 4] [--steps 4] [--threads 2] [--device cpu]

Every variant runs the whole training step (forward, per-member loss, backward, optimiser step)
on batches prepared beforehand, in NCHW and in channels_last. The variants are interleaved: each
round runs ``--steps`` steps of every variant in turn, so a machine shared with other jobs slows
them alike; the rate reported is the median over rounds, and each ratio the median of the
ratios within a round. Variants:

- ``one``: one ResNet with ``torch.optim.SGD``, as the trainer steps it;
- ``sequential``: K such ResNets, one step of each in turn (K separate runs in one process);
- ``packed``: :func:`reslab.train.packed.packed_train_step` with :class:`PackedSGD` (per-member
  learning rates and the non-finite mask);
- ``packed, torch SGD``: the packed network with ``torch.optim.SGD`` (every member at one rate,
  no mask), to show what PackedSGD's extra work costs.

Images per second count every member's images (K x batch per packed step). Beside the whole
step, one 3x3 convolution of each ResNet stage is timed (forward + backward) as K separate
convolutions and as one grouped convolution, in both layouts, with the kernel that ran it (from
torch.profiler): whether grouped convolutions have a fast path. Writes
benchmarks/results/packed_step.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write_result

from reslab.models import build_model, get_config
from reslab.models.packed import build_packed, pack_inputs
from reslab.train import TrainConfig
from reslab.train.packed import MemberState, PackedSGD, member_losses, packed_train_step

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variants(
    model_name: str, k: int, batch: int, device: torch.device, channels_last: bool
) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one training step, images it trains on)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cfg = TrainConfig.preset("paper")
    mcfg = get_config(model_name)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, 32, 32, generator=g).to(device, memory_format=fmt)
          for _ in range(k)]  # fmt: skip
    ys = torch.randint(0, mcfg.num_classes, (batch, k), generator=g).to(device)

    def sgd(params: object) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,  # type: ignore[arg-type]
                               weight_decay=cfg.weight_decay)  # fmt: skip

    singles = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = build_model(mcfg).to(device, memory_format=fmt).train()
        singles.append((model, sgd(model.parameters())))

    def single_step(m: int) -> None:
        model, opt = singles[m]
        loss = F.cross_entropy(model(xs[m]), ys[:, m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sequential() -> None:
        for m in range(k):
            single_step(m)

    x = pack_inputs(xs).contiguous(memory_format=fmt)
    packed = build_packed(mcfg, list(range(k))).to(device, memory_format=fmt).train()
    popt = PackedSGD(packed.parameters(), members=k, lr=cfg.lr, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay)  # fmt: skip
    state = MemberState.create(k, warmup=False, device=device)
    counter = [0]

    def packed_step() -> None:
        packed_train_step(packed, popt, x, ys, state, step=counter[0], lr=cfg.lr, cfg=cfg)
        counter[0] += 1

    packed2 = build_packed(mcfg, list(range(k))).to(device, memory_format=fmt).train()
    topt = sgd(packed2.parameters())

    def packed_torch_sgd() -> None:
        loss = member_losses(packed2(x), ys).sum()
        topt.zero_grad(set_to_none=True)
        loss.backward()
        topt.step()

    return {
        "one": (lambda: single_step(0), batch),
        "sequential": (sequential, k * batch),
        "packed": (packed_step, k * batch),
        "packed, torch SGD": (packed_torch_sgd, k * batch),
    }


def _conv_pair(channels: int, side: int, k: int, batch: int, device: torch.device,
               channels_last: bool, repeats: int) -> dict:  # fmt: skip
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def conv(c: int, groups: int) -> torch.nn.Conv2d:
        layer = torch.nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False)
        return layer.to(device, memory_format=fmt)

    def batch_of(c: int) -> torch.Tensor:
        x = torch.randn(batch, c, side, side, device=device)
        return x.to(memory_format=fmt).requires_grad_()

    x, convs = batch_of(channels), [conv(channels, 1) for _ in range(k)]
    xk, grouped = batch_of(k * channels), conv(k * channels, k)

    def separate() -> None:
        for c in convs:
            c(x).sum().backward()

    def packed() -> None:
        grouped(xk).sum().backward()

    times: dict[str, list[float]] = {"separate": [], "grouped": []}
    separate(), packed()  # the first calls create the oneDNN primitives
    for _ in range(repeats):
        for name, fn in (("separate", separate), ("grouped", packed)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    with torch.profiler.profile() as prof:
        packed()
    generic = ("aten::conv2d", "aten::convolution", "aten::_convolution")
    kernels = sorted({e.key for e in prof.key_averages() if "conv" in e.key} - set(generic))
    return {
        "channels": channels,
        "side": side,
        "layout": "channels_last" if channels_last else "NCHW",
        "separate_seconds": min(times["separate"]),
        "grouped_seconds": min(times["grouped"]),
        "grouped_kernels": kernels,
    }


def conv_layers(k: int, batch: int, device: torch.device, repeats: int) -> list[dict]:
    """Forward + backward of one 3x3 convolution per ResNet stage (16 channels at 32 px, 32 at
    16, 64 at 8): K separate ones against one grouped one, NCHW and channels_last; best of
    ``repeats`` (interleaved), and the aten kernels that ran the grouped one."""
    rows = []
    for channels, side in ((16, 32), (32, 16), (64, 8)) if repeats else ():
        for cl in (False, True):
            r = _conv_pair(channels, side, k, batch, device, cl, repeats)
            rows.append(r)
            print(f"conv {channels:>2} ch {side:>2} px {r['layout']:<13} {k} separate "
                  f"{1e3 * r['separate_seconds']:7.1f} ms, grouped "
                  f"{1e3 * r['grouped_seconds']:7.1f} ms  {r['grouped_kernels']}",
                  flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128, help="images per member per step")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--conv-repeats", type=int, default=5, help="0: skip the convolution check")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/packed_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = {}
    for cl in (False, True):
        layout = "channels_last" if cl else "NCHW"
        for name, v in make_variants(args.model, args.members, args.batch_size, device, cl).items():
            variants[f"{name}, {layout}"] = v
    for step, _ in variants.values():
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, (step, images) in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            rates[name].append(args.steps * images / (time.perf_counter() - t0))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load average {loads[-1]:.1f})", flush=True)
    rows = []
    for name, values in rates.items():
        rows.append({"variant": name, "images_per_second": statistics.median(values),
                     "per_round": values})  # fmt: skip
    # each ratio is taken within a round, then the median over rounds: the load of a shared
    # machine drifts between rounds far more than within one
    pairs = {"packed / one": ("packed", "one"), "sequential / one": ("sequential", "one"),
             "packed / sequential": ("packed", "sequential"),
             "packed torch SGD / packed": ("packed, torch SGD", "packed")}  # fmt: skip
    ratios = {
        layout: {
            key: statistics.median(
                a / b
                for a, b in zip(rates[f"{num}, {layout}"], rates[f"{den}, {layout}"], strict=True)
            )
            for key, (num, den) in pairs.items()
        }
        for layout in ("NCHW", "channels_last")
    }
    convs = conv_layers(args.members, args.batch_size, device, args.conv_repeats)
    for row in rows:
        print(f"{row['variant']:<36} {row['images_per_second']:8.0f} img/s")
    for layout, r in ratios.items():
        print(layout, ", ".join(f"{key} {value:.2f}" for key, value in r.items()))
    write_result(
        args.out,
        {
            "unit": "training images per second, all members (forward + backward + SGD step), "
            "median over rounds, synthetic input",
            "model": args.model,
            "members": args.members,
            "batch_size_per_member": args.batch_size,
            "threads": args.threads,
            "device": str(device),
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "load_average": loads,
            "rows": rows,
            "ratios": ratios,
            "conv_layers": convs,
        },
    )


if __name__ == "__main__":
    main()

"""Images per second of seed-packed training against one member alone, in one command.

    PYTHONPATH=. python benchmarks/packed_step.py [--models cifar_resnet20 cifar_resnet56] \
        [--members 5] [--batch-size 128] [--device cpu|cuda] [--graphs | --no-graphs] \
        [--rounds 4] [--steps 4] [--threads 2] [--fit-iters N]

Two measurements, both with the trainer's own code:

1. **The step** (synthetic batches prepared beforehand, uint8 on the device): the trainer's
   training step, :class:`reslab.train.captured.TrainStep` (normalisation, forward, loss,
   backward, masked SGD update, device bookkeeping; a CUDA graph replay with ``--graphs``, the
   default on a GPU), for ``one`` ResNet (``members=1``), K ResNets one after another
   (``sequential``, K separate runs in one process) and the ``packed`` network of K members
   (``members=K``); beside them ``one, plain loop``, the conventional PyTorch step (``F.
   cross_entropy``, ``loss.item()`` to check it, ``torch.optim.SGD``). The variants are
   interleaved: each round runs ``--steps`` steps of each in turn, so a machine shared with other
   jobs slows them alike; rates are medians over rounds, each ratio the median of the ratios
   within a round. NCHW and channels_last (CPU), channels_last (GPU).
2. **The trainer** (``--fit-iters N``, default 300 on a GPU, 0 = skipped on a CPU):
   :func:`reslab.train.fit` itself for one member (seed 0) and for the K members packed (seeds
   0..K-1), the ``paper`` recipe for N steps on synthetic CIFAR-size images held in memory
   (augmentation on the device), one evaluation at the end; images/s is the runs' own
   ``images_per_second`` (training steps only, all members' images counted).

Images per second count every member's images (K x batch per packed step). Beside the whole
step, one 3x3 convolution of each ResNet stage is timed (forward + backward) as K separate
convolutions and as one grouped convolution, in both layouts, with the kernel that ran it (from
torch.profiler): whether grouped convolutions have a fast path on this device. Writes
benchmarks/results/packed_step.json (or ``--out``). The 5-seed ResNet-56 wall time of the whole
paper recipe is what benchmarks/gpu_plan.py measures.
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

from reslab.data import DataSplits, Normalize, Split
from reslab.models import build_model, get_config
from reslab.models.packed import build_packed
from reslab.train import TrainConfig, fit
from reslab.train.captured import GRAPH_WARMUP_STEPS, TrainStep, lr_table
from reslab.train.members import MemberState
from reslab.train.step import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _uint8_batches(k: int, batch: int, device: torch.device) -> tuple[list, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
        for _ in range(k)
    ]
    ys = torch.randint(0, 10, (batch, k), generator=g).to(device)
    return xs, ys


def make_variants(
    model_name: str,
    k: int,
    batch: int,
    device: torch.device,
    *,
    channels_last: bool,
    graphs: bool,
    total_steps: int,
) -> dict[str, tuple[Callable[[], None], int, list[TrainStep]]]:
    """name -> (one training step, images it trains on, the TrainSteps to read after a round)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cfg = TrainConfig.preset("paper", channels_last=channels_last, cuda_graphs=graphs)
    mcfg = get_config(model_name)
    xs, ys = _uint8_batches(k, batch, device)
    norm = Normalize.fit(torch.cat(xs).cpu(), "pixel")
    rates = lr_table(lambda s: cfg.lr, total_steps, device)

    def trainer_step(model: torch.nn.Module, members: int, step_norm: Normalize) -> TrainStep:
        model.to(device, memory_format=fmt).train()
        return TrainStep(
            model,
            build_optimizer(model, cfg),
            members=members,
            rates=rates,
            state=MemberState.create(members, warmup=False, device=device),
            norm=step_norm,
            capacity=total_steps,
            warmup_lr=cfg.warmup_lr,
            warmup_error=cfg.warmup_error,
            channels_last=channels_last,
            graphs=graphs,
        )

    singles = []
    for seed in range(k):
        torch.manual_seed(seed)
        singles.append(trainer_step(build_model(mcfg), 1, norm))

    torch.manual_seed(0)
    plain = build_model(mcfg).to(device, memory_format=fmt).train()
    plain_opt = torch.optim.SGD(
        plain.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    plain_x = norm(xs[0]).contiguous(memory_format=fmt)

    def plain_step() -> None:
        loss = F.cross_entropy(plain(plain_x), ys[:, 0])
        if not torch.isfinite(loss).item():  # the check every conventional loop reads
            raise FloatingPointError("non-finite loss")
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    packed_norm = Normalize(norm.mode, norm.mean.repeat(k, 1, 1), norm.std.repeat(k, 1, 1))
    packed = trainer_step(build_packed(mcfg, list(range(k))), k, packed_norm)
    packed_x = torch.cat(xs, 1)

    def sequential() -> None:
        for m, (single, x) in enumerate(zip(singles, xs, strict=True)):
            single(x, ys[:, m])

    return {
        "one": (lambda: singles[0](xs[0], ys[:, 0]), batch, [singles[0]]),
        "one, plain loop": (plain_step, batch, []),
        "sequential": (sequential, k * batch, singles),
        "packed": (lambda: packed(packed_x, ys), k * batch, [packed]),
    }


def step_rates(args: argparse.Namespace, model_name: str, device: torch.device) -> dict:
    """Part 1 for one model: rates per variant and layout, and the ratios within rounds."""
    layouts = (True,) if device.type == "cuda" else (False, True)
    warmup = max(args.warmup, GRAPH_WARMUP_STEPS + 2) if args.graphs else args.warmup
    total = 2 * (warmup + args.rounds * args.steps)  # "one" and "sequential" share a step
    variants = {}
    for cl in layouts:
        layout = "channels_last" if cl else "NCHW"
        made = make_variants(
            model_name,
            args.members,
            args.batch_size,
            device,
            channels_last=cl,
            graphs=args.graphs,
            total_steps=total,
        )
        for name, v in made.items():
            variants[f"{name}, {layout}"] = v
    for step, _, readers in variants.values():
        for _ in range(warmup):
            step()
        for r in readers:
            r.read()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (step, images, readers) in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            for reader in readers:  # the trainer's own read: synchronises, checks, logs
                assert all(reader.read().alive), name
            _sync(device)
            rates[name].append(args.steps * images / (time.perf_counter() - t0))
        print(
            f"{model_name}: round {r + 1}/{args.rounds} (load {os.getloadavg()[0]:.1f})", flush=True
        )
    pairs = {
        "packed / one": ("packed", "one"),
        "sequential / one": ("sequential", "one"),
        "packed / sequential": ("packed", "sequential"),
        "one / one, plain loop": ("one", "one, plain loop"),
    }
    ratios = {
        ("channels_last" if cl else "NCHW"): {
            key: statistics.median(
                a / b
                for a, b in zip(
                    rates[f"{num}, {'channels_last' if cl else 'NCHW'}"],
                    rates[f"{den}, {'channels_last' if cl else 'NCHW'}"],
                    strict=True,
                )
            )
            for key, (num, den) in pairs.items()
        }
        for cl in layouts
    }
    rows = [
        {"variant": n, "images_per_second": statistics.median(v), "per_round": v}
        for n, v in rates.items()
    ]
    return {"rows": rows, "ratios": ratios}


def _conv_pair(
    channels: int,
    side: int,
    k: int,
    batch: int,
    device: torch.device,
    channels_last: bool,
    repeats: int,
) -> dict:
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
            print(
                f"conv {channels:>2} ch {side:>2} px {r['layout']:<13} {k} separate "
                f"{1e3 * r['separate_seconds']:7.1f} ms, grouped "
                f"{1e3 * r['grouped_seconds']:7.1f} ms  {r['grouped_kernels']}",
                flush=True,
            )
    return rows


def _synthetic_splits(n_train: int) -> DataSplits:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        y = torch.randint(0, 10, (n,), generator=g)
        return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), y)

    return DataSplits(
        split(n_train), split(512), split(512), [str(i) for i in range(10)], "synthetic 32x32"
    )


def trainer_rates(args: argparse.Namespace, model_name: str, device: torch.device) -> dict:
    """Part 2 for one model: ``fit`` of one member and of the K members packed."""
    data = _synthetic_splits(max(4096, args.batch_size * 8))
    cfg = TrainConfig.preset(
        "paper",
        iters=args.fit_iters,
        eval_every=args.fit_iters,
        eval_test=False,
        device=str(device),
        cuda_graphs=args.graphs,
        channels_last=device.type == "cuda",
        tensorboard=False,
        threads=args.threads,
    )
    mcfg = get_config(model_name)
    out = {}
    for label, seeds in (("one", [0]), ("packed", list(range(args.members)))):
        model = build_packed(mcfg, seeds) if len(seeds) > 1 else _seeded(mcfg, seeds[0])
        t0 = time.perf_counter()
        result = fit(model, data, cfg, verbose=False)
        wall = time.perf_counter() - t0
        rate = result.summary["images_per_second"]
        out[label] = {"seeds": seeds, "images_per_second": rate, "wall_seconds": wall}
        print(
            f"{model_name} fit {label} ({len(seeds)} members): {rate:,.0f} img/s, "
            f"{wall:.1f} s wall",
            flush=True,
        )
    out["packed / one"] = out["packed"]["images_per_second"] / out["one"]["images_per_second"]
    return out


def _seeded(mcfg: object, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # as reslab train --seed S initialises one model
    return build_model(mcfg)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="default: cifar_resnet20 on a CPU, cifar_resnet20 and 56 on a GPU",
    )
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128, help="images per member per step")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay the step as a CUDA graph (default: on a GPU)",
    )
    ap.add_argument(
        "--fit-iters",
        type=int,
        default=None,
        help="steps of each fit run (default: 300 on a GPU, 0 = skip on a CPU)",
    )
    ap.add_argument("--conv-repeats", type=int, default=5, help="0: skip the convolution check")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/packed_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.graphs = gpu if args.graphs is None else args.graphs and gpu
    args.models = args.models or (
        ["cifar_resnet20", "cifar_resnet56"] if gpu else ["cifar_resnet20"]
    )
    args.fit_iters = (300 if gpu else 0) if args.fit_iters is None else args.fit_iters
    loads = [os.getloadavg()[0]]
    results = {}
    for name in args.models:
        results[name] = {"step": step_rates(args, name, device)}
        if args.fit_iters:
            results[name]["fit"] = trainer_rates(args, name, device)
        loads.append(os.getloadavg()[0])
    convs = conv_layers(args.members, args.batch_size, device, args.conv_repeats)
    for name, r in results.items():
        for row in r["step"]["rows"]:
            print(f"{name:<16} {row['variant']:<32} {row['images_per_second']:10,.0f} img/s")
        for layout, ratios in r["step"]["ratios"].items():
            print(name, layout, ", ".join(f"{key} {v:.2f}" for key, v in ratios.items()))
        if "fit" in r:
            print(f"{name} fit: packed / one {r['fit']['packed / one']:.2f}")
    write_result(
        args.out,
        {
            "unit": "training images per second, all members; step: median over rounds, "
            "synthetic batches; fit: the run's own images_per_second (training steps only)",
            "members": args.members,
            "batch_size_per_member": args.batch_size,
            "threads": args.threads,
            "graphs": args.graphs,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "fit_iters": args.fit_iters,
            "load_average": loads,
            "models": results,
            "conv_layers": convs,
        },
        device=device,
    )


if __name__ == "__main__":
    main()

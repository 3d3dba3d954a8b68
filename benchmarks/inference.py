"""Inference images/s on this CPU, every deployment path of reslab against its peers, one run.

For each model and batch size, every path takes the same float images (0..1, NCHW) and returns
logits, normalisation included:

- ``torchvision eager``: torchvision's own ResNet-18/50 with ``Normalize`` in front, the
  conventional way (ImageNet-size models only: torchvision has no CIFAR ResNets, so for
  ``cifar_resnet20/56`` reslab eager is the baseline);
- ``reslab eager``, ``reslab channels_last``, ``reslab BN-folded`` (+ channels_last),
  ``reslab compile`` (``torch.compile`` with Inductor freezing, on the folded channels_last
  network): reslab's fp32 paths, whose best is compared with the peers;
- ``ONNX Runtime fp32``: the file ``reslab export --format onnx`` writes, under ONNX Runtime
  (the strongest fp32 peer on a CPU);
- ``int8 compile``: the file ``reslab export --int8 --format pt2`` writes (torchao pt2e,
  calibrated on CIFAR-10 training images), loaded and compiled with freezing, which lowers it to
  oneDNN int8 kernels; ``ONNX Runtime int8``: ``reslab export --int8 --format onnx`` (QDQ)
  under ONNX Runtime's int8 kernels.

reslab's ImageNet models are built with ``stride_in="3x3"`` and hold torchvision's weights, so
every path computes torchvision's function and top-1 agreement is like for like (vs torchvision
eager; vs reslab eager for the CIFAR nets). No ImageNet weights are at hand (nothing downloads):
those two are random, their BatchNorm statistics re-estimated on real images so activations and
logits have a trained network's scale (a random net's raw logits grow with depth). Their top-1
agreement is over 1,000 near-tied classes, a harsher test of int8 than a trained net's. The
CIFAR nets are random too, except ``cifar_resnet20`` when a trained run is given
(``--cifar-run``): then agreement is on 1,000 CIFAR-10 (JPEG q75) test images and fp32/int8
accuracy on the whole test set are measured.

Timing: every path runs ~``--seconds`` per round, paths interleaved within a round, so all of
them see the same background load; rates are medians over ``--rounds`` rounds and every ratio
the median of the ratios within a round. One thread by default: on a CPU shared by more
processes than it has cores, a multi-threaded PyTorch (OpenMP) pool stalls at every barrier
(``--threads 2`` here measured ResNet-20 eager at batch 1 100x slower than one thread). The
1-minute load average is recorded each round.

    PYTHONPATH=. python benchmarks/inference.py --cifar-run runs/cifar20-fast
    PYTHONPATH=. python benchmarks/inference.py --quick   # smoke test, a few minutes

Writes benchmarks/results/inference.json (``--quick``: inference-quick.json) and prints the
Markdown tables of docs/deploy.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import write_result
from torch import Tensor, nn

from reslab import create_model
from reslab.data import load_data
from reslab.data.presets import IMAGENET_MEAN, IMAGENET_STD, InputConfig
from reslab.deploy import InferenceModel, fold_batchnorm, load_exported, load_trained
from reslab.deploy.export import ExportOptions, export_model
from reslab.deploy.quantize import compile_for_cpu
from reslab.train.checkpoint import model_record, set_input

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.zip"
MODELS = {"resnet18": 224, "resnet50": 224, "cifar_resnet20": 32, "cifar_resnet56": 32}
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
FP32 = ("reslab eager", "reslab channels_last", "reslab BN-folded", "reslab compile")
INT8 = ("int8 compile", "ONNX Runtime int8")
PEERS = ("torchvision eager", "ONNX Runtime fp32")
Fn = Callable[[Tensor], Tensor]


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def load() -> float:
    return os.getloadavg()[0]


@torch.no_grad()
def reestimate_bn(net: nn.Module, images: Tensor, batch: int = 32) -> None:
    """BatchNorm running statistics as the cumulative average over ``images`` (normalised):
    a random network at a trained one's operating point (its logits of order one)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
    net.train()
    for i in range(0, len(images), batch):
        net(images[i : i + batch])
    net.eval()


def checkpoint_for(
    name: str, folder: Path, cifar_run: Path | None, bn_images: Tensor
) -> tuple[Path, nn.Module | None]:
    """A reslab checkpoint of ``name`` (the trained run for cifar_resnet20 when given) and, for
    the ImageNet models, the torchvision twin whose weights it holds."""
    if name == "cifar_resnet20" and cifar_run is not None:
        return cifar_run, None
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    twin = None
    if name.startswith("resnet"):
        import torchvision

        twin = getattr(torchvision.models, name)()
        reestimate_bn(twin, TF.normalize(bn_images, list(IMAGENET_MEAN), list(IMAGENET_STD)))
        net = create_model(name, stride_in="3x3")  # torchvision's "v1.5" strides
        net.load_state_dict(twin.state_dict())
        cfg = InputConfig()  # torchvision's evaluation: resize 256, centre crop 224, ImageNet stats
    else:
        net = create_model(name)
        cfg = InputConfig(size=(32, 32), resize=None, mean=CIFAR_MEAN, std=CIFAR_STD)
        reestimate_bn(net, TF.normalize(bn_images, list(CIFAR_MEAN), list(CIFAR_STD)))
    set_input(net, cfg)  # the checkpoint carries its input config, as a run's does (format 3)
    record = model_record(net)
    path = folder / f"{name}.pt"
    classes = [str(i) for i in range(record["model_config"]["num_classes"])]
    torch.save({**record, "classes": classes, "step": 0, "train_config": {}}, path)
    return path, twin


def padded(fn: Fn, x: Tensor, batch: int) -> Tensor:
    """``fn`` over ``x`` in chunks of exactly ``batch`` (the last one zero-padded), so a
    static-shape compiled path sees no new shape (each costs a compilation)."""
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - n, *chunk.shape[1:])])
        out.append(fn(chunk)[:n])
    return torch.cat(out)


def build_paths(
    ckpt: Path,
    twin: nn.Module | None,
    size: int,
    folder: Path,
    *,
    calibration: int,
    data: str | None,
    log: Callable[[str], None],
) -> tuple[dict[str, Fn], dict[str, Any]]:
    """Every path of one model, and what the exports reported (their own parity checks).
    ``data``: int8 calibration images (``None``: the run's own training split)."""
    # the side is given: a run from before checkpoints carried their input (format 1-2) needs it
    trained = load_trained(ckpt, image_size=size)
    spec = trained.spec
    model = InferenceModel(trained.net, spec, "float").eval()
    example = torch.rand(2, 3, size, size)
    folded = fold_batchnorm(model, example).to(memory_format=torch.channels_last)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def nhwc(x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    paths: dict[str, Fn] = {}
    if twin is not None:
        from torchvision.transforms.v2 import functional as TF

        mean, std = spec.mean.flatten().tolist(), spec.std.flatten().tolist()
        paths["torchvision eager"] = lambda x: twin(TF.normalize(x, mean, std))
    paths["reslab eager"] = model
    paths["reslab channels_last"] = lambda x: cl(nhwc(x))
    paths["reslab BN-folded"] = lambda x: folded(nhwc(x))
    compiled = compile_for_cpu(folded)
    paths["reslab compile"] = lambda x: compiled(nhwc(x))

    checks: dict[str, Any] = {}
    log("  export ONNX fp32")
    onnx32 = export_model(ckpt, folder / f"{ckpt.stem}-{size}.onnx", ExportOptions(image_size=size))
    checks["onnx fp32 max |logit diff|"] = onnx32.max_abs_diff
    paths["ONNX Runtime fp32"] = load_exported(onnx32.path).run_graph
    for fmt in ("pt2", "onnx"):
        log(f"  int8: calibrate on {calibration} training images, export .{fmt}")
        options = ExportOptions(fmt, int8=True, data=data, image_size=size,
                                calibration_images=calibration, check_images=64)  # fmt: skip
        result = export_model(ckpt, folder / f"{ckpt.stem}-{size}-int8.{fmt}", options)
        checks[f"{fmt} int8 top-1 agreement ({result.check_images} images)"] = result.top1_agreement
        if fmt == "pt2":
            paths["int8 compile"] = compile_for_cpu(torch.export.load(str(result.path)).module())
        else:
            paths["ONNX Runtime int8"] = load_exported(result.path).run_graph
    return paths, checks


@torch.no_grad()
def time_paths(
    paths: dict[str, Fn], x: Tensor, *, rounds: int, seconds: float
) -> tuple[dict[str, list[float]], list[float]]:
    """Images/s of each path in each of ``rounds`` interleaved rounds (~``seconds`` a path
    a round, the order rotated each round), and the load average before each round and after
    the last."""
    reps = {}
    for name, fn in paths.items():
        for _ in range(2):  # warm-up (and compilation) outside the clock
            fn(x)
        t0 = time.perf_counter()
        fn(x)
        reps[name] = max(1, round(seconds / max(time.perf_counter() - t0, 1e-5)))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    loads = []
    names = list(paths)
    for r in range(rounds):
        loads.append(load())
        for name in names[r % len(names) :] + names[: r % len(names)]:  # no path always first
            fn = paths[name]
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn(x)
            samples[name].append(reps[name] * len(x) / (time.perf_counter() - t0))
    loads.append(load())
    return samples, loads


def ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of rate(a) / rate(b) within the round."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


def targets(samples: dict[str, list[float]]) -> dict[str, Any]:
    """The issue's targets at one batch size: the best reslab fp32 path against ONNX Runtime
    fp32 and torchvision eager, the best int8 path against the best fp32."""
    rate = {k: statistics.median(v) for k, v in samples.items()}
    best = max(FP32, key=rate.__getitem__)
    out: dict[str, Any] = {"best_fp32": best, "best_fp32_vs": {}}
    for peer in PEERS:
        if peer in samples:
            out["best_fp32_vs"][peer] = ratio(samples, best, peer)
    out["int8_vs_best_fp32"] = {k: ratio(samples, k, best) for k in INT8}
    out["onnx_int8_vs_onnx_fp32"] = ratio(samples, "ONNX Runtime int8", "ONNX Runtime fp32")
    return out


@torch.no_grad()
def agreement(paths: dict[str, Fn], x: Tensor, reference: str) -> dict[str, float]:
    preds = {name: padded(fn, x, 32).argmax(1) for name, fn in paths.items()}
    return {name: float((p == preds[reference]).float().mean()) for name, p in preds.items()}


@torch.no_grad()
def test_accuracy(paths: dict[str, Fn], names: list[str], n: int | None) -> dict[str, Any]:
    """Top-1 accuracy of ``names`` on the CIFAR-10 (JPEG q75) test set (the first ``n`` images
    of a fixed shuffle; ``None``: all 10,000)."""
    test = load_data(str(CIFAR_ZIP)).test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
    x, labels = test.images[pick].float() / 255, test.labels[pick]
    out: dict[str, Any] = {"images": len(x)}
    for name in names:
        out[name] = float((padded(paths[name], x, 32).argmax(1) == labels).float().mean())
    return out


def evaluation_images(size: int, n: int) -> Tensor:
    """``n`` CIFAR-10 test images of a fixed shuffle (every class), float 0..1, resized to
    ``size`` for the ImageNet models."""
    from torchvision.transforms.v2 import functional as TF

    test = load_data(str(CIFAR_ZIP)).test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
    x = test.images[pick]
    x = x if size == 32 else TF.resize(x, [size, size], antialias=True)
    return x.float() / 255


def bench_model(name: str, args: argparse.Namespace, tmp: Path, log: Callable[[str], None]) -> dict:
    """Build, check and time every path of one model. (Long: it is the run's whole recipe for
    a model, step by step, each logged.)"""
    size = MODELS[name]
    trained = name == "cifar_resnet20" and args.cifar_run is not None
    log(f"{name} at {size}x{size}: building paths (load {load():.1f})")
    n = args.agreement_images if size == 32 else args.imagenet_agreement_images
    images = evaluation_images(size, max(n, args.bn_images))
    ckpt, twin = checkpoint_for(name, tmp, args.cifar_run, images[: args.bn_images])
    calibration = args.calibration if size == 32 else args.imagenet_calibration
    data = None if trained else str(CIFAR_ZIP)  # a run calibrates on its own training split
    paths, checks = build_paths(ckpt, twin, size, tmp, calibration=calibration, data=data, log=log)
    reference = "torchvision eager" if twin is not None else "reslab eager"
    log(f"  top-1 agreement on {n} test images")
    entry: dict[str, Any] = {
        "input": size,
        "weights": "trained run" if trained else "random, BN statistics re-estimated",
        "reference": reference,
        "calibration_images": calibration,
        "export_checks": checks,
        "agreement_images": n,
        "top1_agreement": agreement(paths, images[:n], reference),
        "images_per_second": {},
        "per_round": {},
        "load_average": {},
        "targets": {},
    }
    for batch in args.batches:
        log(f"  timing batch {batch} (load {load():.1f})")
        xb = images[:batch] if batch <= len(images) else torch.rand(batch, 3, size, size)
        samples, loads = time_paths(paths, xb, rounds=args.rounds, seconds=args.seconds)
        key = str(batch)
        entry["per_round"][key] = samples
        entry["load_average"][key] = loads
        entry["images_per_second"][key] = {k: statistics.median(v) for k, v in samples.items()}
        entry["targets"][key] = targets(samples)
        log(f"    {entry['targets'][key]}")
    if trained:
        log("  accuracy on the CIFAR-10 test set")
        entry["test_accuracy"] = test_accuracy(paths, ["reslab eager", *INT8], args.test_images)
        log(f"    {entry['test_accuracy']}")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="per path per round")
    parser.add_argument("--agreement-images", type=int, default=1000, help="CIFAR nets")
    parser.add_argument("--imagenet-agreement-images", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=512, help="int8, CIFAR nets")
    parser.add_argument("--imagenet-calibration", type=int, default=128)
    parser.add_argument("--bn-images", type=int, default=128, help="BN re-estimation")
    parser.add_argument("--test-images", type=int, help="default: the whole test set")
    parser.add_argument("--cifar-run", type=Path, help="a trained cifar_resnet20 run folder")
    parser.add_argument("--threads", type=int, default=1)
    quick = "smoke test: cifar_resnet20 only, short rounds, few images"
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not CIFAR_ZIP.is_file():
        parser.error(f"needs the CIFAR-10 JPEG zip at {CIFAR_ZIP}")
    if args.quick:
        args.models = args.models or ["cifar_resnet20"]
        args.rounds, args.seconds = min(args.rounds, 2), min(args.seconds, 0.1)
        args.agreement_images = args.imagenet_agreement_images = 64
        args.calibration = args.imagenet_calibration = args.bn_images = 32
        args.test_images = args.test_images or 500
    args.models = args.models or list(MODELS)
    name = "inference-quick.json" if args.quick else "inference.json"
    args.out = args.out or ROOT / "benchmarks" / "results" / name
    torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    load_start = load()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: bench_model(name, args, Path(tmp), log) for name in args.models}
    command = " ".join(["PYTHONPATH=. python benchmarks/inference.py", *sys.argv[1:]])
    write_result(
        args.out,
        {
            "command": command,
            "cpu_model": cpu_model(),
            "threads": args.threads,
            "rounds": args.rounds,
            "seconds_per_round": args.seconds,
            "load_average_start_end": [load_start, load()],
            "wall_seconds": time.time() - t_start,
            "models": results,
        },
        device="cpu",
    )
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """One table per model: images/s and the ratio to the baseline at each batch size, and
    top-1 agreement with the fp32 reference."""
    lines = []
    for name, entry in results.items():
        batches = list(entry["images_per_second"])
        base = entry["reference"]
        lines.append(f"\n**{name}** ({entry['input']}x{entry['input']}, {entry['weights']}); "
                     f"x = median within-round ratio to {base}\n")  # fmt: skip
        head = "| path | " + " | ".join(f"batch {b} images/s | x" for b in batches)
        lines.append(head + " | top-1 agreement |")
        lines.append("|---|" + "---:|---:|" * len(batches) + "---:|")
        for path in entry["images_per_second"][batches[0]]:
            cells = []
            for b in batches:
                rounds = entry["per_round"][b]
                cells.append(f"{entry['images_per_second'][b][path]:.1f}")
                cells.append(f"{ratio(rounds, path, base):.2f}")
            agree = 100 * entry["top1_agreement"][path]
            lines.append(f"| {path} | " + " | ".join(cells) + f" | {agree:.1f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

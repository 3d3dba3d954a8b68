"""Inference images/s on this CPU, every deployment path of reslab against its peers, one run.

For each model and batch size, every path takes the same float images (0..1, NCHW) and returns
logits, normalisation included:

- ``torchvision eager``: torchvision's own ResNet-18/50 with ``Normalize`` in front, the
  conventional way (ImageNet-size models only; torchvision has no CIFAR ResNets, so for
  ``cifar_resnet20/56`` reslab eager is the baseline);
- ``reslab eager``, ``reslab channels_last``, ``reslab BN-folded`` (+ channels_last),
  ``reslab compile`` (``torch.compile`` with Inductor freezing, on the folded channels_last
  network): reslab's fp32 paths, whose best is compared with the peers;
- ``ONNX Runtime fp32``: ``reslab export --format onnx`` under ONNX Runtime (the strongest
  fp32 peer on a CPU);
- ``int8 compile``: ``reslab export --int8 --format pt2`` (torchao pt2e, calibrated on 512
  CIFAR-10 training images) loaded and compiled with freezing (oneDNN int8 kernels);
  ``ONNX Runtime int8``: the same quantisation exported as ONNX QDQ.

reslab's ImageNet models are built with ``stride_in="3x3"`` and load torchvision's weights, so
every path computes torchvision's function and top-1 agreement (vs torchvision eager, or reslab
eager for the CIFAR nets) is a like-for-like check. Weights are random except for a trained
``cifar_resnet20`` run given with ``--cifar-run``, whose fp32 and int8 accuracy on the whole
CIFAR-10 (JPEG q75) test set are reported. Timings are medians of interleaved rounds, so every
path sees the same background load; quote ratios, not absolute numbers, on a shared machine.

    PYTHONPATH=. python benchmarks/inference.py --cifar-run runs/cifar20-fast

Writes benchmarks/results/inference.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
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
from reslab.deploy import InferenceModel, fold_batchnorm, load_exported, load_trained
from reslab.deploy.export import ExportOptions, export_model
from reslab.deploy.quantize import compile_for_cpu
from reslab.train.checkpoint import model_record

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.zip"
MODELS = {"resnet18": 224, "resnet50": 224, "cifar_resnet20": 32, "cifar_resnet56": 32}
Path_ = Callable[[Tensor], Tensor]


def checkpoint_for(
    name: str, folder: Path, cifar_run: Path | None
) -> tuple[Path, nn.Module | None]:
    """A reslab checkpoint of ``name`` (the trained run for cifar_resnet20 when given) and, for
    ImageNet models, the torchvision twin whose weights it holds."""
    if name == "cifar_resnet20" and cifar_run is not None:
        return cifar_run, None
    torch.manual_seed(0)
    twin = None
    if name.startswith("resnet"):
        import torchvision

        twin = getattr(torchvision.models, name)().eval()
        net = create_model(name, stride_in="3x3")  # torchvision's "v1.5" strides
        net.load_state_dict(twin.state_dict())
    else:
        net = create_model(name)
    record = model_record(net)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    record["normalization"] = {"mode": "channel", "mean": mean[:, None, None],
                               "std": std[:, None, None]}  # fmt: skip
    path = folder / f"{name}.pt"
    torch.save({**record, "classes": [str(i) for i in range(net.config.num_classes)],
                "step": 0, "train_config": {}}, path)  # fmt: skip
    return path, twin


def images(size: int, n: int) -> Tensor:
    """Real CIFAR-10 test images (uint8), resized to ``size`` for the ImageNet models."""
    from torchvision.transforms.v2 import functional as TF

    test = load_data(str(CIFAR_ZIP)).test.images[:n]
    return test if size == 32 else TF.resize(test, [size, size], antialias=True)


def build_paths(
    ckpt: Path, twin: nn.Module | None, size: int, folder: Path, log: Callable[[str], None]
) -> dict[str, Path_]:
    trained = load_trained(ckpt, image_size=None if size == 32 else size)
    spec = trained.spec
    model = InferenceModel(trained.net, spec, "float").eval()
    example = torch.rand(2, 3, size, size)
    folded = fold_batchnorm(model, example).to(memory_format=torch.channels_last)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    paths: dict[str, Path_] = {}
    if twin is not None:
        from torchvision.transforms.v2 import functional as TF

        mean, std = spec.mean.flatten().tolist(), spec.std.flatten().tolist()
        paths["torchvision eager"] = lambda x: twin(TF.normalize(x, mean, std))
    paths["reslab eager"] = model
    paths["reslab channels_last"] = lambda x: cl(x.contiguous(memory_format=torch.channels_last))
    paths["reslab BN-folded"] = lambda x: folded(x.contiguous(memory_format=torch.channels_last))
    compiled = compile_for_cpu(folded)
    paths["reslab compile"] = lambda x: compiled(x.contiguous(memory_format=torch.channels_last))

    log("  export ONNX fp32")
    fp32 = ExportOptions(image_size=_side(size))
    onnx32 = export_model(ckpt, folder / f"{ckpt.stem}-{size}.onnx", fp32)
    paths["ONNX Runtime fp32"] = load_exported(onnx32.path).run_graph

    log("  int8: calibrate, export .pt2 and ONNX")
    q = ExportOptions("pt2", int8=True, data=str(CIFAR_ZIP), image_size=_side(size),
                      check_images=200)  # fmt: skip
    pt2 = export_model(ckpt, folder / f"{ckpt.stem}-{size}-int8.pt2", q)
    log(f"    pt2 int8 check: {pt2.top1_agreement}")
    int8 = compile_for_cpu(torch.export.load(str(pt2.path)).module())
    paths["int8 compile"] = int8
    onnx8 = export_model(
        ckpt, folder / f"{ckpt.stem}-{size}-int8.onnx",
        ExportOptions("onnx", int8=True, data=str(CIFAR_ZIP), image_size=_side(size),
                      check_images=200),
    )  # fmt: skip
    paths["ONNX Runtime int8"] = load_exported(onnx8.path).run_graph
    return paths


def _side(size: int) -> int | None:
    return None if size == 32 else size


@torch.no_grad()
def time_paths(
    paths: dict[str, Path_], x: Tensor, *, rounds: int, seconds: float
) -> dict[str, float]:
    """Images/s of each path: median over ``rounds`` interleaved rounds of ~``seconds`` each."""
    reps = {}
    for name, fn in paths.items():
        for _ in range(2):  # warm-up (and compilation) outside the clock
            fn(x)
        t0 = time.perf_counter()
        fn(x)
        reps[name] = max(1, round(seconds / max(time.perf_counter() - t0, 1e-4)))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn(x)
            samples[name].append(reps[name] * len(x) / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in samples.items()}


@torch.no_grad()
def agreement(paths: dict[str, Path_], x: Tensor, reference: str) -> dict[str, float]:
    preds = {name: torch.cat([fn(x[i : i + 32]).argmax(1) for i in range(0, len(x), 32)])
             for name, fn in paths.items()}  # fmt: skip
    ref = preds[reference]
    return {name: float((p == ref).float().mean()) for name, p in preds.items()}


@torch.no_grad()
def test_accuracy(paths: dict[str, Path_], names: list[str]) -> dict[str, float]:
    """Top-1 accuracy of ``names`` on the whole CIFAR-10 (JPEG q75) test set."""
    test = load_data(str(CIFAR_ZIP)).test
    x = test.images.float() / 255
    out = {}
    for name in names:
        pred = torch.cat([paths[name](x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
        out[name] = float((pred == test.labels).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per path per round")
    parser.add_argument("--agreement-images", type=int, default=1000)
    parser.add_argument("--cifar-run", type=Path, help="a trained cifar_resnet20 run folder")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inference.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            size = MODELS[name]
            log(f"{name} at {size}x{size}: building paths")
            ckpt, twin = checkpoint_for(name, Path(tmp), args.cifar_run)
            paths = build_paths(ckpt, twin, size, Path(tmp), log)
            reference = "torchvision eager" if twin is not None else "reslab eager"
            n = args.agreement_images if size == 32 else min(args.agreement_images, 128)
            x = images(size, n).float() / 255
            entry: dict[str, Any] = {
                "input": size,
                "reference": reference,
                "trained": name == "cifar_resnet20" and args.cifar_run is not None,
                "agreement_images": n,
                "top1_agreement": agreement(paths, x, reference),
                "images_per_second": {},
            }
            for batch in args.batches:
                log(f"  timing batch {batch}")
                xb = x[:batch] if batch <= len(x) else torch.rand(batch, 3, size, size)
                entry["images_per_second"][str(batch)] = time_paths(
                    paths, xb, rounds=args.rounds, seconds=args.seconds
                )
            if entry["trained"]:
                log("  accuracy on the CIFAR-10 test set")
                entry["test_accuracy"] = test_accuracy(
                    paths, ["reslab eager", "int8 compile", "ONNX Runtime int8"]
                )
            results[name] = entry
            log(f"  {entry['images_per_second']}")
    write_result(args.out, {"command": "PYTHONPATH=. python benchmarks/inference.py "
                            + (f"--cifar-run {args.cifar_run}" if args.cifar_run else ""),
                            "threads": args.threads, "rounds": args.rounds,
                            "seconds_per_round": args.seconds, "models": results})  # fmt: skip
    print(markdown(results))


FP32 = ("reslab eager", "reslab channels_last", "reslab BN-folded", "reslab compile")


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for name, entry in results.items():
        for batch, rates in entry["images_per_second"].items():
            best = max(FP32, key=lambda k: rates[k])
            base = rates.get("torchvision eager", rates["reslab eager"])
            lines.append(f"\n**{name}** ({entry['input']}x{entry['input']}), batch {batch}; "
                         f"x = vs {entry['reference']}; best reslab fp32: {best}\n")  # fmt: skip
            lines.append("| path | images/s | x | top-1 agreement |")
            lines.append("|---|---:|---:|---:|")
            for path, r in rates.items():
                agree = entry["top1_agreement"][path]
                lines.append(f"| {path} | {r:.1f} | {r / base:.2f} | {100 * agree:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Reading weight files safely and renaming their keys to reslab's module names.

Only two readers are used: ``safetensors`` (a header and raw tensors, nothing to execute) and
``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors, numbers, strings
and plain containers only. A pickle that asks for anything else (a class, ``os.system``, ...)
is refused before any of it runs; we never fall back to full unpickling.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "UnsafeWeightsError",
    "Weights",
    "cifar_resnet_name",
    "detect_format",
    "file_sha256",
    "read_weights",
    "rename_to_reslab",
    "to_reslab_names",
]

# A safetensors file starts with the header length (8 bytes, little endian) and a JSON header.
_SAFETENSORS_SUFFIX = ".safetensors"
# Wrappers other code bases put around a state dict: torch.nn.DataParallel/DistributedDataParallel
# ("module.") and torch.compile ("_orig_mod.").
_PREFIXES = ("module.", "_orig_mod.")


class UnsafeWeightsError(ValueError):
    """The file can only be read by unpickling arbitrary objects, which could run code."""


@dataclass
class Weights:
    """A state dict read from a file, with what the file says about itself.

    ``format`` is ``"reslab"`` (a reslab checkpoint), ``"resnet"`` (torchvision's names, which
    timm's ``resnet*`` share), ``"timm-resnetv2"`` (timm's pre-activation ``resnetv2_*``) or
    ``"cifar-resnet"`` (the widely shared PyTorch CIFAR ResNet-20/32/44/56/110/1202 files:
    ``conv1 ... layer3.N.bn2``, a ``linear`` classifier, option-A shortcuts that split their zero
    channels; see :data:`reslab.models.layers.SHORTCUT_PADS`). ``renamed`` says, in words, which
    wrappers and prefixes were taken off.
    """

    state_dict: dict[str, Tensor]
    format: str
    path: Path
    sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # reslab: model_config, classes, step ...
    renamed: list[str] = field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    if path.suffix == _SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


# What the weights-only unpickler says when a pickle asks for code: a global (class, function),
# a call or an object build. Its other errors ("Unsupported operand", ...) mean a damaged file.
_UNSAFE = re.compile(r"GLOBAL|unrecognized function|Can only (create new object|build)")


def _unreadable(path: Path, exc: BaseException) -> ValueError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ValueError(
        f"corrupt or unreadable weight file {path}: {type(exc).__name__}"
        + (f": {first}" if first else "")
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _UNSAFE.search(str(exc)):  # garbage, not a request for code
            inner = exc.__context__  # torch re-raises the unpickler's error with a long preface
            raise _unreadable(path, inner if inner is not None else exc) from None
        raise UnsafeWeightsError(
            f"refusing to load {path}: it is a pickle that needs more than tensors, numbers, "
            "strings and containers to unpickle, and arbitrary unpickling can run code. Only "
            "safetensors files and torch.load(weights_only=True)-loadable files are accepted; "
            "if you trust the file, re-save its state dict with "
            "torch.save(model.state_dict(), ...) or safetensors. "
            f"(torch said: {str(exc.__context__ or exc).strip().splitlines()[0]})"
        ) from None
    except Exception as exc:  # truncated zip (RuntimeError), empty file (EOFError), text, ...
        raise _unreadable(path, exc) from exc


def _safetensors_load(path: Path) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError: a truncated file, a pickle named .safetensors
        error = _unreadable(path, exc)
        with open(path, "rb") as f:
            head = f.read(2)
        if head in (b"PK", b"\x80\x02"):  # torch.save's zip, or a legacy pickle
            error = ValueError(f"{error} (it looks like a torch.save file: name it .pth)")
        raise error from exc


def _strip_prefixes(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The state dict without wrapper prefixes, and which prefixes were found."""
    out, found = {}, set()
    for key, value in state.items():
        # repeatedly: torch.compile(DDP(model)) saves "_orig_mod.module.x"
        while key.startswith(_PREFIXES):
            prefix = next(p for p in _PREFIXES if key.startswith(p))
            found.add(prefix)
            key = key[len(prefix) :]
        out[key] = value
    return out, [f"{p}* -> * (prefix taken off)" for p in _PREFIXES if p in found]


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """The state dict, the metadata and the wrapper (in words, if any) of a loaded object."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if "model" in obj and isinstance(obj["model"], Mapping):  # reslab checkpoint
        meta = {k: v for k, v in obj.items() if k != "model"}
        return dict(obj["model"]), meta, []
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        # training checkpoints of timm, Lightning and the CIFAR ResNets ({"state_dict", "epoch",
        # "best_prec1"}): the scalars beside the weights are kept as metadata
        meta = {k: v for k, v in obj.items() if isinstance(v, int | float | str)}
        scalars = ", ".join(sorted(meta))
        return (
            dict(obj["state_dict"]),
            meta,
            [f"state dict unwrapped from {{'state_dict': ...{', ' + scalars if scalars else ''}}}"],
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path} contains no tensors (keys: {sorted(obj)[:10]})")
    return tensors, {}, []


# The PyTorch CIFAR ResNets (He et al. 2015 §4.2 re-implemented with a `linear` classifier and
# option-A shortcuts in a LambdaLayer): three stages of BasicBlocks `layerS.U.conv1/bn1/conv2/bn2`
# (plus `shortcut.0/1` in their option-B variant), a 16-channel 3x3 stem.
_CIFAR_UNIT = re.compile(r"^layer([123])\.(\d+)\.(conv|bn)[12]\.")


def detect_format(state: Mapping[str, Tensor], meta: Mapping[str, Any]) -> str:
    if "model_config" in meta:
        return "reslab"
    if any(k.startswith(("stages.", "stem.conv.")) for k in state):
        return "timm-resnetv2"
    if "linear.weight" in state and "fc.weight" not in state and any(map(_CIFAR_UNIT.match, state)):
        return "cifar-resnet"
    return "resnet"


def cifar_resnet_name(weights: Weights) -> str | None:
    """The registered model a ``"cifar-resnet"`` file fits (``cifar_resnet{6n+2}``, n units per
    stage), or None when the file is not one of them or its stages are unequal."""
    if weights.format != "cifar-resnet":
        return None
    units: dict[str, set[str]] = {}
    for key in weights.state_dict:
        m = _CIFAR_UNIT.match(key)
        if m:
            units.setdefault(m[1], set()).add(m[2])
    counts = {len(u) for u in units.values()}
    if len(units) != 3 or len(counts) != 1:
        return None
    return f"cifar_resnet{6 * counts.pop() + 2}"


def read_weights(path: str | Path, *, sha256: str | None = None) -> Weights:
    """Read a weight file without running any code from it.

    ``sha256``, if given, must equal the file's SHA-256 (hex), checked before reading.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a named pipe (would block), a device
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ValueError(f"{path} is {kind}, not a weight file")
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"corrupt or unreadable weight file {path}: the file is empty")
    digest = None
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256.lower():
            raise ValueError(f"sha256 mismatch for {path}: expected {sha256}, file has {digest}")
    obj = _safetensors_load(path) if _is_safetensors(path) else _torch_load(path)
    state, meta, renamed = _unwrap(obj, path)
    state, stripped = _strip_prefixes(state)
    return Weights(state, detect_format(state, meta), path, digest, meta, renamed + stripped)


# --------------------------------------------------------------------------------------------
# timm ResNetV2 -> reslab full pre-activation ResNet
# --------------------------------------------------------------------------------------------
# timm (models/resnetv2.py): stem.conv, stages.{i}.blocks.{j}.{norm,conv}{k}, .downsample.conv,
# norm, head.fc (a 1x1 conv). In a PreActBottleneck normK is the BN-ReLU in front of convK, which
# is exactly reslab's bnK under the "full_preact" ordering; the final norm is reslab's final_bn.
_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str], str]  # pattern, new name, words
_TIMM_V2_RULES: list[_Rule] = [
    (re.compile(r"^stem\.conv\.(.+)$"), lambda m: f"conv1.{m[1]}", "stem.conv -> conv1"),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.norm(\d)\.(.+)$"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{m[3]}.{m[4]}",
        "stages.S.blocks.U.normK -> layer{S+1}.U.bnK",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.conv(\d)\.(.+)$"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{m[3]}.{m[4]}",
        "stages.S.blocks.U.convK -> layer{S+1}.U.convK",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.(.+)$"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.{m[3]}",
        "stages.S.blocks.U.downsample.conv -> layer{S+1}.U.downsample.0",
    ),
    (re.compile(r"^norm\.(.+)$"), lambda m: f"final_bn.{m[1]}", "norm -> final_bn"),
    (re.compile(r"^head\.fc\.(.+)$"), lambda m: f"fc.{m[1]}", "head.fc (a 1x1 conv) -> fc"),
]

# The PyTorch CIFAR ResNets name their classifier `linear` and the projection of their option-B
# variant `shortcut.0/1` (conv, BN); everything else already has torchvision's names.
_CIFAR_RULES: list[_Rule] = [
    (re.compile(r"^linear\.(.+)$"), lambda m: f"fc.{m[1]}", "linear.* -> fc.*"),
    (
        re.compile(r"^(layer\d+\.\d+)\.shortcut\.([01])\.(.+)$"),
        lambda m: f"{m[1]}.downsample.{m[2]}.{m[3]}",
        "layerS.U.shortcut.0/1 -> layerS.U.downsample.0/1",
    ),
]
_RULES: dict[str, list[_Rule]] = {"timm-resnetv2": _TIMM_V2_RULES, "cifar-resnet": _CIFAR_RULES}


def rename_to_reslab(weights: Weights) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict under reslab's module names, and the renaming rules that applied (in
    words, for the load report)."""
    rules = _RULES.get(weights.format, [])
    out, used = {}, []
    for key, value in weights.state_dict.items():
        new = key  # keys no rule knows (deep stems, ...) stay as they are and show as unexpected
        for pattern, repl, words in rules:
            m = pattern.match(key)
            if m:
                new = repl(m)
                if words not in used:
                    used.append(words)
                break
        if new == "fc.weight" and value.ndim == 4:  # timm's head is a 1x1 conv
            value = value.flatten(1)
        out[new] = value
    return out, used


def to_reslab_names(weights: Weights) -> dict[str, Tensor]:
    """The state dict under reslab's module names (torchvision's, for post-activation nets)."""
    return rename_to_reslab(weights)[0]

"""The network as it is deployed: normalisation inside, BatchNorm folded into convolutions.

:class:`InferenceModel` puts the checkpoint's input normalisation in front of the network, so an
exported graph takes raw pixels (uint8 0..255, or floats 0..1) and a user cannot forget it.
:func:`fold_batchnorm` folds every BatchNorm that directly follows a convolution into that
convolution (``w' = w * gamma / sigma``, ``b' = (b - mu) * gamma / sigma + beta``;
:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`), which removes a memory pass per layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from reslab.deploy.inputs import InputSpec

__all__ = ["INPUT_DTYPES", "InferenceModel", "fold_batchnorm", "foldable_pairs"]

#: What an exported graph takes: uint8 pixels 0..255, or float32 pixels scaled to 0..1 (what
#: torchvision's ``to_dtype(..., scale=True)`` / ``ToTensor`` give).
INPUT_DTYPES = ("float", "uint8")


class InferenceModel(nn.Module):
    """``net((x / range - mean) / std)`` as one fused multiply-add on the way in, then logits.

    ``input_dtype="uint8"``: ``x`` is uint8 (N, C, H, W) in 0..255, cast inside the graph;
    ``"float"``: float32 in 0..1. The arithmetic is that of :class:`reslab.data.Normalize`
    (``addcmul(-mean/std, x, 1/(range*std))``), so uint8 inputs give the trainer's numbers.
    """

    def __init__(self, net: nn.Module, spec: InputSpec, input_dtype: str = "float") -> None:
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"unknown input dtype {input_dtype!r}; valid choices: float, uint8")
        self.net = net
        self.input_dtype = input_dtype
        value_range = 255.0 if input_dtype == "uint8" else 1.0
        self.scale: Tensor
        self.shift: Tensor
        self.register_buffer("scale", 1.0 / (value_range * spec.std))
        self.register_buffer("shift", -spec.mean / spec.std)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.addcmul(self.shift, x.to(torch.float32), self.scale))


def foldable_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm reads the convolution's output
    and nothing else does, found in the graph ``torch.export`` traces from ``example``.

    Reading the traced graph, rather than assuming a block layout, keeps this right for any
    ordering: a pre-activation unit's BN follows an addition or the input, not a conv, and is
    left alone (folding it into the *next* conv would be wrong at zero-padded borders).
    """
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, (example,))
    finally:
        model.train(was_training)
    owner = {**program.graph_signature.inputs_to_parameters}
    owner.update(program.graph_signature.inputs_to_buffers)

    def module_of(node: object) -> str | None:
        target = owner.get(getattr(node, "name", ""))
        return target.rsplit(".", 1)[0] if target else None

    uses: dict[str, int] = {}
    pairs = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "conv" in name:
            conv = module_of(node.args[1])
            if conv:
                uses[conv] = uses.get(conv, 0) + 1
        if "batch_norm" not in name:
            continue
        src = node.args[0]
        if "conv" not in str(getattr(src, "target", "")) or len(src.users) != 1:
            continue
        conv, bn = module_of(src.args[1]), module_of(node.args[3])  # weight, running mean
        if conv and bn:
            pairs.append((conv, bn))
    # a module called twice shares its weights between two places: fold neither
    return [(c, b) for c, b in pairs if uses.get(c) == 1 and [p[1] for p in pairs].count(b) == 1]


def fold_batchnorm(model: nn.Module, example: Tensor) -> nn.Module:
    """A copy of ``model`` (in eval mode) with each BatchNorm that follows a convolution folded
    into it and replaced by an identity; the outputs are the same up to float rounding."""
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in foldable_pairs(folded, example):
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        _replace(folded, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace(folded, bn_name, nn.Identity())
    return folded


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def batchnorms(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

"""int8 through the PyTorch 2 export quantisation flow (torchao's pt2e).

The network is captured with ``torch.export``, annotated by torchao's ``X86InductorQuantizer``
(static quantisation: uint8 activations, int8 per-channel weights, the conv-BN-ReLU and
conv-add-ReLU patterns oneDNN fuses), observed on calibration images, and converted to a graph
of quantise/dequantise operations around the float ones. That graph is portable (it exports to
``.pt2`` and to ONNX as QDQ, which ONNX Runtime runs with int8 kernels); for int8 speed in
PyTorch it is compiled by Inductor with freezing (:func:`compile_for_cpu`), which lowers each
q-conv-dq pattern to a oneDNN int8 convolution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["compile_for_cpu", "quantize_int8"]

SCHEME = (
    "pt2e static int8, X86InductorQuantizer default config (u8 activations, s8 per-channel weights)"
)


def _export_for_quantization(model: nn.Module, example: Tensor) -> nn.Module:
    # strict (TorchDynamo) capture: the quantizer groups nodes by the module call they came
    # from, and the non-strict capture of torch 2.14 merges every call of a shared nn.ReLU into
    # one group ("Input partition has more than one output node"), torchvision's ResNets too
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        model.eval(), (example,), dynamic_shapes=({0: batch},), strict=True
    )
    return program.module()


@torch.no_grad()
def quantize_int8(
    model: nn.Module,
    calibration: Tensor,
    *,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> nn.Module:
    """``model`` (float, eval mode) quantised to int8, its activation ranges observed on
    ``calibration`` (inputs as the model takes them, e.g. uint8 images for an
    :class:`~reslab.deploy.graph.InferenceModel` built for uint8)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one image")
    captured = _export_for_quantization(model, calibration[: min(2, len(calibration))])
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(captured, quantizer)
    for i in range(0, len(calibration), batch_size):
        prepared(calibration[i : i + batch_size])
        if progress is not None:
            progress(min(i + batch_size, len(calibration)))
    converted = convert_pt2e(prepared)
    # an exported graph ignores .eval(): its train/eval-dependent ops are rewritten instead, and
    # the flag set by hand so exporters do not warn of a model "in training mode"
    move_exported_model_to_eval(converted)
    for module in converted.modules():
        module.training = False
    return converted


def compile_for_cpu(model: nn.Module, *, cpp_wrapper: bool = True) -> Callable[[Tensor], Tensor]:
    """``torch.compile`` (static shapes: one graph per batch size) with Inductor's freezing,
    which constant-folds the weights and turns quantised patterns into oneDNN int8 kernels
    (without freezing an int8 graph runs its quantise/dequantise steps in float). Freezing is
    switched on around each call rather than globally; passing it as ``options=`` does not
    reach the int8 weight prepacking (torch 2.14 fails on ``onednn.qconv_prepack``).

    ``cpp_wrapper``: Inductor calls the kernels from generated C++ rather than Python. A small
    network at batch 1 spends much of its time in that per-call overhead (ResNet-20 on one
    core: 10-25 % more images/s, fp32 and int8); the price is a C++ build at compilation."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=False)

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        with inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper):
            return compiled(x)

    return run

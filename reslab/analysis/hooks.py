"""Record gradients with respect to activations without full backward hooks.

A forward hook on each watched module registers a *tensor* hook on the module's output; the tensor
hook receives ``dL/d(output)`` during ``backward``. Unlike ``register_full_backward_hook`` this
works on models with in-place ops such as torchvision's ``ReLU(inplace=True)`` and
``out += identity`` (pytorch#61519), because the tensor hook sits on the value the module
returned. Every handle is removed on exit, so nothing is left behind on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ActivationRecord", "GradientRecorder", "find_blocks", "find_weight_layers"]

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual units (or their plain twins) of a network, in definition order.

    reslab's ``ResNet.units()`` / ``DenseResNet.layers``; for other models (torchvision, timm) any
    module whose class is named ``*Block`` or ``Bottleneck``.
    """
    names = {m: n for n, m in model.named_modules()}
    units = getattr(model, "units", None)
    if callable(units):
        return [(names[u], u) for u in units()]
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return [(names[m], m) for m in layers]
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m).__name__.endswith("Block") or type(m).__name__ == "Bottleneck"
    ]


def find_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and linear layer (the "weight layers" the papers count)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


@dataclass
class ActivationRecord:
    """One watched module's output in the last forward/backward pass."""

    name: str
    order: int  # position in the forward pass (first call)
    output_std: float = float("nan")
    grad_norm: float = float("nan")  # ||dL/d(output)||, Frobenius over the batch
    grad_rms: float = float("nan")  # the same per element: grad_norm / sqrt(numel)


@dataclass
class GradientRecorder:
    """Context manager recording output statistics and output gradients of ``modules``.

    >>> with GradientRecorder(find_blocks(model)) as rec:
    ...     loss_fn(model(x), y).backward()
    >>> [r.grad_norm for r in rec.records()]
    """

    modules: Iterable[tuple[str, nn.Module]]
    capture: Callable[[str, Tensor], None] | None = None  # optional: sees each output tensor
    _records: dict[str, ActivationRecord] = field(default_factory=dict, init=False)
    _handles: list[RemovableHandle] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.modules = list(self.modules)

    def __enter__(self) -> GradientRecorder:
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every forward hook and every tensor hook still attached to a live tensor."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                return
            rec = self._records.get(name)
            if rec is None:
                rec = self._records[name] = ActivationRecord(name, len(self._records))
            rec.output_std = float(output.detach().double().std())
            if self.capture is not None:
                self.capture(name, output)
            if output.requires_grad:

                def grad_hook(grad: Tensor, rec: ActivationRecord = rec) -> None:
                    g = grad.detach().double()
                    rec.grad_norm = float(g.norm())
                    rec.grad_rms = rec.grad_norm / max(g.numel(), 1) ** 0.5

                self._handles.append(output.register_hook(grad_hook))

        return hook

    def records(self) -> list[ActivationRecord]:
        """Records in forward order (modules that never ran are left out)."""
        return sorted(self._records.values(), key=lambda r: r.order)

    def __iter__(self) -> Iterator[ActivationRecord]:
        return iter(self.records())


def count_hooks(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks on every module of ``model`` (for tests)."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            total += len(getattr(m, attr, {}) or {})
    return total


def zero_grads(params: Iterable[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None

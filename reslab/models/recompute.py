"""Activation checkpointing that leaves BatchNorm's running statistics as one forward left them.

``torch.utils.checkpoint`` keeps only a module's input and runs the module a second time during
the backward pass to rebuild what the gradients need (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost"). That second forward is a real forward: a BatchNorm layer in training
mode updates its running mean and variance (and ``num_batches_tracked``) again, so momentum would
be applied twice per step and the statistics would differ from an ordinary run's. The
non-reentrant checkpoint does not prevent this (measured with torch 2.14: ``num_batches_tracked``
reaches 2 after one step). :func:`checkpoint_module` therefore restores every buffer of the
module after the recomputation. The recomputed outputs themselves are unaffected: in training
mode BN normalises with the batch's statistics, which the second forward computes again exactly,
and the checkpoint replays the random number generator for dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_module", "restored_buffers"]


@contextlib.contextmanager
def restored_buffers(module: nn.Module) -> Iterator[None]:
    """Run the body, then put every buffer of ``module`` back to the value it had on entry."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def checkpoint_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, keeping only ``x`` for the backward pass, which runs ``module`` again.

    Non-reentrant (``use_reentrant=False``: PyTorch's recommended form; it works when ``x`` needs
    no gradient and with ``torch.autograd.grad``); the recomputation restores the buffers (see
    the module docstring), so parameters, gradients and BN statistics equal an ordinary step's.
    """

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), restored_buffers(module)

    if torch.compiler.is_compiling():
        # torch.compile cannot trace a custom context_fn, and needs none: its backward graph
        # recomputes the activations but not the forward graph's buffer updates (measured with
        # torch 2.14: num_batches_tracked stays 1 after a compiled checkpointed step)
        out = checkpoint(module, x, use_reentrant=False)
    else:
        out = checkpoint(module, x, use_reentrant=False, context_fn=contexts)
    assert isinstance(out, Tensor)
    return out

"""Seed-packed networks: K independent copies of one ResNet computed as a single wide network.

The papers report CIFAR results over several seeds (He et al. 2015, Table 6; He et al. 2016,
Tables 1-4), and a small CIFAR ResNet leaves a GPU mostly idle. Packing gives each launch K times
the work without coupling the members: every convolution becomes a grouped convolution whose
groups are the members' own, every BatchNorm one BatchNorm over the K members' channels (its
statistics are per channel, hence per member), the classifier a block-diagonal linear map, and
option A's zero padding pads each member's channels. Member ``m`` owns channels
``[m*C, (m+1)*C)`` of every feature map; the input is the members' own batches concatenated along
channels, ``(N, K*C_in, H, W)``, and the output is ``(N, K, num_classes)``.

The packing is generic: it copies member 0's module tree and replaces each *leaf* module by its
packed form (:data:`PACKERS`), leaving every non-leaf forward as it is. That is exact as long as
those forwards combine leaf outputs with elementwise operations only (the residual addition, the
ReLU, flatten after global pooling), as reslab's blocks do. A leaf type without a packer, a
non-leaf module that holds its own parameters, or a network that is not a convolutional
:class:`~reslab.models.resnet.ResNet` is refused with a ``ValueError`` naming it.

Invariant used by :func:`unpack`: every packed parameter and buffer is the members' tensors
concatenated along dim 0 (0-dim buffers, BatchNorm's batch counter, are shared and equal), so a
member's state dict is a slice of the packed one and parameters keep their member's rank.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from reslab.models.config import ResNetConfig
from reslab.models.layers import PadShortcut
from reslab.models.resnet import ResNet
from reslab.models.shortcuts import ConstantScaling
from reslab.models.zoo import build_model

__all__ = [
    "PACKERS",
    "GroupedLinear",
    "MemberWise",
    "PackedNet",
    "build_packed",
    "pack",
    "pack_inputs",
    "unpack",
    "unpack_state_dicts",
]


class GroupedLinear(nn.Module):
    """K independent ``nn.Linear(in_features, out_features)`` maps over the members' features.

    ``weight`` is ``(K*out_features, in_features)`` and ``bias`` ``(K*out_features,)``: the K
    members' tensors stacked along dim 0, so each keeps its own rank (weight decay grouped by rank
    treats them as it treats the members'). Input ``(N, K*in_features)``, output
    ``(N, K*out_features)``; the product is one batched matrix multiply over the members.
    """

    def __init__(
        self,
        members: int,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        shape = (members * out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(shape[0], device=device, dtype=dtype)) if bias else None
        )

    def forward(self, x: Tensor) -> Tensor:
        k = self.members
        xk = x.unflatten(1, (k, self.in_features)).transpose(0, 1)  # (K, N, in)
        w = self.weight.unflatten(0, (k, self.out_features)).transpose(1, 2)  # (K, in, out)
        if self.bias is None:
            out = torch.bmm(xk, w)
        else:  # bias + x W^T, each member with its own W and bias
            out = torch.baddbmm(self.bias.unflatten(0, (k, 1, self.out_features)), xk, w)
        return out.transpose(0, 1).flatten(1)  # (N, K*out)

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class MemberWise(nn.Module):
    """Apply a parameter-free, per-sample module to each member's channels on their own.

    The K members are folded into the batch, ``(N, K*C, H, W) -> (N*K, C, H, W)``, so a module
    that mixes channels (option A's zero padding appends channels) sees one member at a time.
    """

    def __init__(self, module: nn.Module, members: int) -> None:
        super().__init__()
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise ValueError(f"MemberWise takes a module without state, got {module}")
        self.module, self.members = module, members

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        folded = x.unflatten(1, (self.members, -1)).flatten(0, 1)  # (N*K, C, ...)
        out = self.module(folded)
        return out.unflatten(0, (n, self.members)).flatten(1, 2)  # (N, K*C', ...)


def _copy_state(packed: nn.Module, members: Sequence[nn.Module]) -> nn.Module:
    """Fill ``packed``'s parameters and buffers with the members' concatenated along dim 0."""
    states = [m.state_dict() for m in members]
    merged = {}
    for key, t in states[0].items():
        if t.ndim == 0:  # a shared counter (BatchNorm's num_batches_tracked)
            if any(not torch.equal(s[key], t) for s in states[1:]):
                values = [int(s[key]) for s in states]
                raise ValueError(f"cannot pack {key}: the members differ ({values})")
            merged[key] = t.clone()
        else:
            merged[key] = torch.cat([s[key] for s in states], 0)
    packed.load_state_dict(merged)
    return packed


def _pack_conv(convs: Sequence[nn.Conv2d]) -> nn.Module:
    c = convs[0]
    k = len(convs)
    if c.padding_mode != "zeros":
        raise ValueError(f"cannot pack a convolution with padding_mode={c.padding_mode!r}")
    packed = skip_init(
        nn.Conv2d,
        k * c.in_channels,
        k * c.out_channels,
        c.kernel_size,
        stride=c.stride,
        padding=c.padding,
        dilation=c.dilation,
        groups=k * c.groups,  # member m's groups are [m*groups, (m+1)*groups)
        bias=c.bias is not None,
        device=c.weight.device,
        dtype=c.weight.dtype,
    )
    return _copy_state(packed, convs)


def _placement(module: nn.Module) -> dict:
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return {"device": t.device, "dtype": t.dtype} if t is not None else {}


def _pack_batchnorm(norms: Sequence[nn.BatchNorm2d]) -> nn.Module:
    b = norms[0]
    # statistics are per channel, so over K*C channels each member keeps its own
    packed = nn.BatchNorm2d(
        len(norms) * b.num_features,
        eps=b.eps,
        momentum=b.momentum,
        affine=b.affine,
        track_running_stats=b.track_running_stats,
        **_placement(b),
    )
    return _copy_state(packed, norms)


def _pack_groupnorm(norms: Sequence[nn.GroupNorm]) -> nn.Module:
    g = norms[0]
    k = len(norms)
    # groups are contiguous channel ranges, so member m's groups stay its own
    packed = nn.GroupNorm(
        k * g.num_groups, k * g.num_channels, eps=g.eps, affine=g.affine, **_placement(g)
    )
    return _copy_state(packed, norms)


def _pack_linear(linears: Sequence[nn.Linear]) -> nn.Module:
    f = linears[0]
    w = f.weight
    packed = GroupedLinear(
        len(linears),
        f.in_features,
        f.out_features,
        bias=f.bias is not None,
        device=w.device,
        dtype=w.dtype,
    )
    return _copy_state(packed, linears)


def _pack_memberwise(modules: Sequence[nn.Module]) -> nn.Module:
    return MemberWise(copy.deepcopy(modules[0]), len(modules))


def _share(modules: Sequence[nn.Module]) -> nn.Module:
    """Channelwise and parameter-free (ReLU, pooling): the same module serves all members."""
    return copy.deepcopy(modules[0])


#: Leaf module type -> function that packs the K members' modules of that type into one.
#: Matched by exact type: a subclass may compute something else in its forward.
PACKERS: dict[type[nn.Module], Callable[[Sequence[Any]], nn.Module]] = {
    nn.Conv2d: _pack_conv,
    nn.BatchNorm2d: _pack_batchnorm,
    nn.GroupNorm: _pack_groupnorm,
    nn.Linear: _pack_linear,
    PadShortcut: _pack_memberwise,
    ConstantScaling: _share,  # He et al. 2016 Table 1's fixed scalings: elementwise, no weights
    nn.ReLU: _share,
    nn.Identity: _share,
    nn.MaxPool2d: _share,
    nn.AvgPool2d: _share,
    nn.AdaptiveAvgPool2d: _share,
}

_REASONS: dict[type[nn.Module], str] = {
    nn.Dropout: "its masks come from one random stream, so members would not match separate runs",
}


class PackedNet(nn.Module):
    """K members of one ResNet config, trained together, computed as one wide network.

    ``forward`` takes the members' batches concatenated along channels, ``(N, K*C, H, W)`` (see
    :func:`pack_inputs`), and returns per-member logits ``(N, K, num_classes)``.
    ``config`` is the members' config; ``seeds`` the seeds they were built with, if known.
    """

    def __init__(self, body: ResNet, config: ResNetConfig, seeds: Sequence[int] | None) -> None:
        super().__init__()
        self.body = body
        self.config = config
        self.members = body.config.in_channels // config.in_channels
        self.seeds = list(seeds) if seeds is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).unflatten(1, (self.members, self.config.num_classes))

    def forward_shared(self, x: Tensor) -> Tensor:
        """Every member on the same images ``(N, C, H, W)``: logits ``(N, K, num_classes)``
        (evaluation, and an ensemble of the members for the cost of one wide forward)."""
        return self(x.repeat(1, self.members, 1, 1))

    def extra_repr(self) -> str:
        return f"members={self.members}, seeds={self.seeds}"


def pack_inputs(batches: Sequence[Tensor]) -> Tensor:
    """The members' own batches ``(N, C, H, W)`` each, as the packed input ``(N, K*C, H, W)``."""
    shapes = {tuple(b.shape) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"the members' batches must have one shape, got {sorted(shapes)}")
    return torch.cat(list(batches), 1)


def _check_packable(models: Sequence[nn.Module]) -> list[ResNet]:
    if not models:
        raise ValueError("pack needs at least one model")
    for i, m in enumerate(models):
        if not isinstance(m, ResNet):
            raise ValueError(
                f"cannot pack member {i}, a {type(m).__name__}: only convolutional ResNets "
                "(a ResNetConfig) can be packed; a dense net's flattened input and read-out "
                "do not separate by channel"
            )
    resnets = cast(list[ResNet], list(models))
    config = resnets[0].config
    for i, m in enumerate(resnets[1:], start=1):
        if m.config != config:
            raise ValueError(f"member {i}'s config differs from member 0's: {m.config} vs {config}")
        if m.training != resnets[0].training:
            raise ValueError("the members must all be in train mode or all in eval mode")
    return resnets


def pack(models: Sequence[nn.Module], *, seeds: Sequence[int] | None = None) -> PackedNet:
    """Pack K ResNets of one config into a :class:`PackedNet` (their weights are copied).

    Raises ``ValueError`` for anything it cannot pack exactly: other model kinds, differing
    configs, a leaf module without a packer in :data:`PACKERS`, a non-leaf module that holds
    parameters itself.
    """
    resnets = _check_packable(models)
    config = resnets[0].config
    k = len(resnets)
    if seeds is not None and len(seeds) != k:
        raise ValueError(f"{len(seeds)} seeds for {k} models")
    body = copy.deepcopy(resnets[0])
    named = [dict(m.named_modules()) for m in resnets]
    for name, module in list(body.named_modules()):
        if next(module.children(), None) is not None:  # a container: its forward stays
            own = [*module._parameters, *module._buffers]
            if own:
                raise ValueError(
                    f"cannot pack {name or 'the model'} ({type(module).__name__}): it holds "
                    f"{own} itself, outside any leaf module"
                )
            continue
        packer = PACKERS.get(type(module))
        if packer is None:
            why = _REASONS.get(type(module), "no packer is registered for it in PACKERS")
            raise ValueError(f"cannot pack {name} ({type(module).__name__}): {why}")
        _replace(body, name, packer([n[name] for n in named]))
    # the body's config describes its interface (K*in_channels in, K*num_classes out), which is
    # what ResNet's input check reads; PackedNet.config stays the members' config
    body.config = dataclasses.replace(
        config, in_channels=k * config.in_channels, num_classes=k * config.num_classes
    )
    packed = PackedNet(body, config, seeds)
    norm = getattr(models[0], "input_norm", None)
    if norm is not None:
        packed.input_norm = norm
    packed.train(resnets[0].training)
    _verify(packed, resnets)
    return packed


def _verify(packed: PackedNet, members: list[ResNet]) -> None:
    """One forward in eval mode on random inputs: the packed network must compute each member's
    output. The leaf-by-leaf packing cannot see a forward *between* leaves that mixes channels
    (a concatenation, a channel shuffle); this catches it before any training does."""
    cfg = members[0].config
    side = 64 if cfg.stem == "imagenet" else 32  # the ImageNet stem divides by 4 before stage 1
    param = next(packed.parameters())
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, cfg.in_channels, side, side, generator=g).to(param) for _ in members]
    modes = [m.training for m in (packed, *members)]
    try:
        with torch.no_grad():  # eval mode: running statistics are read, not updated
            got = packed.eval()(pack_inputs(xs))
            want = torch.stack([m.eval()(x) for m, x in zip(members, xs, strict=True)], 1)
    finally:
        for m, mode in zip((packed, *members), modes, strict=True):
            m.train(mode)
    diff = float((got - want).abs().max())
    if not diff <= 1e-3 * float(want.abs().max()) + 1e-5:
        raise ValueError(
            f"the packed network does not compute its members' outputs (max difference {diff:.3g})"
            ": a forward between the leaf modules mixes the members' channels, which packing "
            "leaf by leaf cannot keep apart"
        )


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)


def build_packed(config: ResNetConfig, seeds: Sequence[int]) -> PackedNet:
    """K members initialised as ``reslab train --seed S`` initialises one model:
    ``torch.manual_seed(S)``, then :func:`~reslab.models.build_model`. The caller's global
    random state is left as it was."""
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {list(seeds)}")
    models = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models.append(build_model(config))
    return pack(models, seeds=seeds)


def unpack_state_dicts(packed: PackedNet) -> list[dict[str, Tensor]]:
    """Each member's state dict, with the keys and shapes of an ordinary model of
    ``packed.config`` (copies, so they outlive further training of ``packed``)."""
    k = packed.members
    states: list[dict[str, Tensor]] = [{} for _ in range(k)]
    for key, t in packed.body.state_dict().items():
        parts = [t] * k if t.ndim == 0 else t.chunk(k, 0)
        for state, part in zip(states, parts, strict=True):
            state[key] = part.detach().clone()
    return states


def unpack(packed: PackedNet) -> list[nn.Module]:
    """K ordinary models of ``packed.config`` holding the members' weights (strict load), in
    ``packed``'s mode, device and dtype, with its ``input_norm`` if it has one."""
    models = []
    param = next(packed.parameters())
    norm = getattr(packed, "input_norm", None)
    for state in unpack_state_dicts(packed):
        with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG
            model = build_model(packed.config)
        model.to(device=param.device, dtype=param.dtype).train(packed.training)
        model.load_state_dict(state, strict=True)
        if norm is not None:
            model.input_norm = norm
        models.append(model)
    return models

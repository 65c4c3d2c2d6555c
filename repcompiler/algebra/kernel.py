"""Folded kernels and the tensor half of the algebra.

A :class:`Kernel` is what an expression evaluates to: one ``weight`` (shape
``[out, in/groups, *kernel_size]``), an optional ``bias`` and the :class:`ConvSpec`
geometry. The functions here compose, sum and concatenate kernels following the plans
of :mod:`repcompiler.algebra.geometry`; all of them are plain differentiable tensor
code, so autograd reaches every leaf parameter when a kernel is built inside a forward.

Cost: composing with a per-channel affine map is an elementwise product; composing
with a pointwise (1x1) conv is one batched matmul; only a true kxk-after-kxk
composition runs a (small) convolution of kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InexactFoldError
from .geometry import ConvSpec, ParPlan, SeqPlan, parallel, sequence

__all__ = [
    "CONV_MODULES",
    "CONV_TYPES",
    "Kernel",
    "pad_input",
    "expand_groups",
    "spread",
    "compose",
    "add",
    "concat",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: the conv module class for a number of spatial dims.
CONV_MODULES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: the conv module classes the algebra folds to (for ``isinstance`` checks).
CONV_TYPES: tuple[type[nn.Module], ...] = tuple(CONV_MODULES.values())
_PAD_MODULE = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}


def _fpad(padding: Sequence[tuple[int, int]]) -> list[int]:
    """Per-dim ``(left, right)`` pairs (first spatial dim first) -> ``F.pad`` order."""
    out: list[int] = []
    for left, right in reversed(list(padding)):
        out += [left, right]
    return out


def pad_input(x: Tensor, padding: Sequence[tuple[int, int]]) -> Tensor:
    """Zero-pad the spatial dims of ``x`` by per-dim ``(left, right)`` pairs."""
    if all(p == (0, 0) for p in padding):
        return x
    return F.pad(x, _fpad(padding))


@dataclass
class Kernel:
    """One convolution: ``weight``, optional ``bias`` and its geometry ``spec``."""

    weight: Tensor
    bias: Tensor | None
    spec: ConvSpec

    def apply(self, x: Tensor) -> Tensor:
        """Run the convolution on a feature map ``x`` (``[N, C, *spatial]``)."""
        s = self.spec
        if s.symmetric_padding:
            return _CONV[s.dims](
                x, self.weight, self.bias, s.stride, tuple(a for a, _ in s.padding), s.dilation, s.groups
            )
        return _CONV[s.dims](pad_input(x, s.padding), self.weight, self.bias, s.stride, 0, s.dilation, s.groups)

    def to_module(self) -> nn.Module:
        """A plain ``nn.Conv1d/2d/3d`` holding detached copies of the folded tensors.

        Asymmetric padding (rare: even kernels) becomes ``ConstantPadNd -> ConvNd``. The
        conv is built without running its random initialisation (``skip_init``), so the
        global random state is left as it was.
        """
        s = self.spec
        sym = s.symmetric_padding
        conv = torch.nn.utils.skip_init(
            CONV_MODULES[s.dims],
            s.in_channels,
            s.out_channels,
            s.kernel_size,
            stride=s.stride,
            padding=tuple(a for a, _ in s.padding) if sym else 0,
            dilation=s.dilation,
            groups=s.groups,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        if sym:
            return conv
        return nn.Sequential(_PAD_MODULE[s.dims](tuple(_fpad(s.padding)), 0.0), conv)

    def detach(self) -> "Kernel":
        return Kernel(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.spec)


# -- tensor helpers ---------------------------------------------------------------


def expand_groups(weight: Tensor, groups: int, new_groups: int) -> Tensor:
    """Rewrite a ``groups``-grouped weight as a ``new_groups``-grouped one
    (``new_groups`` divides ``groups``): the block-diagonal expansion."""
    if groups == new_groups:
        return weight
    if groups % new_groups:
        raise ValueError(f"cannot expand groups={groups} to groups={new_groups}")
    r = groups // new_groups
    out_ch, cin_g = weight.shape[0], weight.shape[1]
    ksize = weight.shape[2:]
    og = out_ch // groups
    w = weight.reshape(new_groups, r, og, 1, cin_g, *ksize)
    eye = torch.eye(r, dtype=weight.dtype, device=weight.device).reshape(1, r, 1, r, 1, *([1] * len(ksize)))
    return (w * eye).reshape(out_ch, r * cin_g, *ksize)


def spread(weight: Tensor, up: Sequence[int], offsets: Sequence[int] | None = None, size: Sequence[int] | None = None) -> Tensor:
    """Spread kernel taps ``up`` apart (insert zeros: a dilation) and place them at
    ``offsets`` in a frame of ``size`` taps (zero elsewhere)."""
    ksize = weight.shape[2:]
    dims = len(ksize)
    offsets = offsets or (0,) * dims
    spread_size = [(k - 1) * u + 1 for k, u in zip(ksize, up)]
    size = size or [o + s for o, s in zip(offsets, spread_size)]
    if all(u == 1 for u in up):
        w = weight
    else:
        w = weight.new_zeros(*weight.shape[:2], *spread_size)
        w[(slice(None), slice(None)) + tuple(slice(None, None, u) for u in up)] = weight
    pads: list[int] = []
    for o, s, total in reversed(list(zip(offsets, spread_size, size))):
        pads += [o, total - o - s]
    if any(pads):
        w = F.pad(w, pads)
    return w


def _bias_through(weight: Tensor, groups: int, bias_in: Tensor) -> Tensor:
    """``sum_{m,k} weight[o, m, k] * bias_in[m]`` for a grouped weight."""
    out_ch, m_g = weight.shape[:2]
    w = weight.reshape(groups, out_ch // groups, m_g, -1).sum(-1)
    return torch.einsum("gom,gm->go", w, bias_in.reshape(groups, m_g)).reshape(out_ch)


def _depthwise(spec: ConvSpec) -> bool:
    return spec.groups == spec.in_channels == spec.out_channels


def _channelwise(spec: ConvSpec) -> bool:
    """Each output channel reads one input channel (depthwise, any channel multiplier)."""
    return spec.groups == spec.in_channels and spec.out_channels % spec.groups == 0


def compose(a: Kernel, b: Kernel, *, check: bool = True, plan: SeqPlan | None = None) -> Kernel:
    """The kernel of ``b(a(x))``. With ``check`` an inexact composition raises
    :class:`InexactFoldError` naming the reasons."""
    plan = plan or sequence(a.spec, b.spec)
    if check and plan.reasons:
        raise InexactFoldError("; ".join(plan.reasons))
    sa, sb, spec = a.spec, b.spec, plan.spec
    dims = sa.dims
    w1, w2 = a.weight, b.weight
    if sb.is_diagonal:
        scale = w2.reshape(-1)
        weight = w1 * scale.reshape(-1, *([1] * (w1.dim() - 1)))
        groups = sa.groups
    elif sa.is_diagonal:
        scale = w1.reshape(-1)
        o, mg = w2.shape[:2]
        g2 = sb.groups
        weight = (w2.reshape(g2, o // g2, mg, -1) * scale.reshape(g2, 1, mg, 1)).reshape(w2.shape)
        groups = g2
    elif _depthwise(sb) and all(k == 1 for k in sa.kernel_size):
        # pointwise conv then a per-channel (depthwise) kernel: an outer product
        m, cg = w1.shape[:2]
        weight = w1.reshape(m, cg, *([1] * dims)) * w2.reshape(m, 1, *w2.shape[2:])
        if plan.step != (1,) * dims:
            weight = spread(weight, plan.step)
        groups = sa.groups
    elif _channelwise(sa) and all(k == 1 for k in sb.kernel_size) and b.weight.shape[1] % (
            sa.out_channels // sa.in_channels) == 0:
        # depthwise kernel (E = out/in outputs per input channel, OREPA's dw -> pw branch)
        # then a pointwise conv whose groups hold whole E-bundles: per group, each input
        # channel's composed kernel sums its E depthwise kernels weighted by the pointwise
        # weights (cheaper than the dense route, which expands the depthwise kernel to
        # [E*C, C, k] and convolves)
        o, mg = w2.shape[:2]
        g2, e = sb.groups, sa.out_channels // sa.in_channels
        weight = torch.einsum("gice,gcek->gick", w2.reshape(g2, o // g2, mg // e, e),
                              w1.reshape(g2, mg // e, e, -1)).reshape(o, mg // e, *w1.shape[2:])
        if plan.up != (1,) * dims:
            weight = spread(weight, plan.up)
        groups = g2
    else:
        g = plan.groups
        e1 = expand_groups(w1, sa.groups, g)
        e2 = expand_groups(w2, sb.groups, g)
        m, cg = e1.shape[:2]
        o, mg = e2.shape[:2]
        if all(k == 1 for k in sa.kernel_size):
            k2 = e2.shape[2:]
            weight = torch.einsum(
                "gomk,gmc->gock", e2.reshape(g, o // g, mg, -1), e1.reshape(g, m // g, cg)
            ).reshape(o, cg, *k2)
            if plan.step != (1,) * dims:
                weight = spread(weight, plan.step)
        elif all(k == 1 for k in sb.kernel_size):
            k1 = e1.shape[2:]
            weight = torch.einsum(
                "gom,gmck->gock", e2.reshape(g, o // g, mg), e1.reshape(g, m // g, cg, -1)
            ).reshape(o, cg, *k1)
            if plan.up != (1,) * dims:
                weight = spread(weight, plan.up)
        else:
            x = spread(e1, plan.up).transpose(0, 1)  # [C/g, M, K1']
            flipped = e2.flip(list(range(2, 2 + dims)))
            pad = tuple(st * (k - 1) for st, k in zip(plan.step, sb.kernel_size))
            weight = _CONV[dims](x, flipped, None, 1, pad, plan.step, g).transpose(0, 1)
        groups = g
    if groups != spec.groups:
        weight = expand_groups(weight, groups, spec.groups)
    bias = b.bias
    if a.bias is not None:
        through = _bias_through(w2, sb.groups, a.bias)
        bias = through if bias is None else bias + through
    return Kernel(weight.contiguous(), bias, spec)


def _frame(kernels: Sequence[Kernel], plan: ParPlan, groups: int) -> list[Tensor]:
    assert plan.spec is not None
    size = plan.spec.kernel_size
    return [
        spread(expand_groups(k.weight, k.spec.groups, groups), up, off, size)
        for k, up, off in zip(kernels, plan.ups, plan.offsets)
    ]


def _plan_or_raise(kernels: Sequence[Kernel], concat: bool, check: bool) -> ParPlan:
    plan = parallel([k.spec for k in kernels], concat=concat)
    if plan.spec is None or (check and plan.reasons):
        raise InexactFoldError("; ".join(plan.reasons))
    return plan


def add(kernels: Sequence[Kernel], *, check: bool = True) -> Kernel:
    """The kernel of ``sum_i k_i(x)`` (branches on the same input)."""
    if len(kernels) == 1:
        return kernels[0]
    plan = _plan_or_raise(kernels, False, check)
    weight = torch.stack(_frame(kernels, plan, plan.groups)).sum(0)
    biases = [k.bias for k in kernels if k.bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    assert plan.spec is not None
    return Kernel(weight, bias, plan.spec)


def concat(kernels: Sequence[Kernel], *, check: bool = True) -> Kernel:
    """The kernel of ``cat([k_i(x)], dim=1)`` (branches on the same input)."""
    plan = _plan_or_raise(kernels, True, check)
    weight = torch.cat(_frame(kernels, plan, 1), 0)
    bias = None
    if any(k.bias is not None for k in kernels):
        bias = torch.cat(
            [k.bias if k.bias is not None else k.weight.new_zeros(k.spec.out_channels) for k in kernels]
        )
    assert plan.spec is not None
    return Kernel(weight, bias, plan.spec)

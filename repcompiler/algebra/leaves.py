"""Leaves of the kernel algebra.

Every leaf is a linear (affine) map on feature maps that is one convolution:

* :class:`Conv` - any ``nn.Conv1d/2d/3d`` geometry (asymmetric and even kernels,
  stride, per-side padding, dilation, groups, bias); ``Conv.from_module`` shares the
  module's parameters.
* :class:`Affine` - per-channel ``x * scale + shift`` (``scale`` a vector, a scalar or
  absent; ``shift`` a vector or absent). :func:`Scale` makes a learnable scale,
  :func:`Bias` a learnable bias add, :func:`Constant` a multiply by a constant.
* :class:`BatchNorm` (in :mod:`.leaves_fixed`) - wraps an ``nn.BatchNorm*d``. Unfolded it *runs the module* (so
  in training mode it uses batch statistics, as a multi-branch block trained offline
  does); folded it is the eval-mode affine map of its running statistics.
* :class:`Identity`, :class:`AvgPool` (in :mod:`.leaves_fixed`) (``count_include_pad`` semantics handled: with
  ``count_include_pad=False`` and padding the border divisor differs, which is
  reported as inexact; ``ceil_mode`` with a stride > 1 may add a partial window,
  also reported; ``divisor_override`` is a plain scale), :class:`ZeroPad`
  (``ZeroPad >> BatchNorm`` is how "BN, then pad with the BN's bias" is written).

Every leaf validates its geometry at construction and raises
:class:`~repcompiler.errors.IncompatibleError` / :class:`~repcompiler.errors.UnsupportedError`
naming the leaf (its ``name`` or module type) and the reason: bad groups, negative
padding, avg-pool padding above half the kernel, a non-zeros ``padding_mode``, ...

This module owns the leaf base classes (:class:`Leaf`, :class:`BufferedLeaf`) and
the learnable leaves (conv, affine); :mod:`.leaves_fixed` owns BN, identity, padding and
pooling. Leaves without parameters keep a non-persistent empty buffer so that ``.double()`` or
``.to(device)`` on the expression decides the dtype/device of their kernels, without
adding anything to ``state_dict``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import IncompatibleError, UnsupportedError, check_choice
from .expr import Expr
from .geometry import ConvSpec, normalize_padding
from .kernel import Kernel

__all__ = [
    "Leaf",
    "BufferedLeaf",
    "Conv",
    "Affine",
    "Scale",
    "Bias",
    "Constant",
    "dims_of",
    "POOL_TYPES",
]

_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BN_TYPES = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
POOL_TYPES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


def dims_of(module: nn.Module) -> int:
    """Spatial dimensionality of a conv, BN or avg-pool module (subclasses included)."""
    for table in (_CONV_TYPES, _BN_TYPES, POOL_TYPES):
        for cls, d in table.items():
            if isinstance(module, cls):
                return d
    raise UnsupportedError(f"cannot tell the dimensionality of {type(module).__name__}")


def _as_tensor(value: Tensor | float | Sequence[float], what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


def _register(module: nn.Module, name: str, value: Tensor | None) -> None:
    if value is None or isinstance(value, nn.Parameter):
        module.register_parameter(name, value)  # type: ignore[arg-type]
    else:
        module.register_buffer(name, value)


class Leaf(Expr):
    """Base of the leaves: ``plan`` from ``_spec``, ``fold`` from ``_kernel``."""

    reasons: tuple[str, ...] = ()

    def plan(self) -> tuple[ConvSpec | None, tuple[str, ...]]:
        return self._spec(), tuple(self.reasons)

    def _spec(self) -> ConvSpec:
        raise NotImplementedError

    def fold(self, check: bool = True) -> Kernel:
        self._check(check)
        return self._kernel()

    def _kernel(self) -> Kernel:
        raise NotImplementedError


class BufferedLeaf(Leaf):
    """A leaf with no tensors of its own: keeps a dtype/device anchor buffer."""

    def __init__(self, channels: int, dims: int) -> None:
        super().__init__()
        if channels < 1:
            raise IncompatibleError(f"{type(self).__name__} needs a positive channel count, got {channels}")
        if dims not in (1, 2, 3):
            raise IncompatibleError(f"{type(self).__name__}: dims must be 1, 2 or 3, got {dims}")
        self.channels = int(channels)
        self.dims = int(dims)
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def _diag(self, value: float, ksize: Sequence[int] | None = None) -> Tensor:
        ksize = tuple(ksize or (1,) * self.dims)
        a = self._anchor
        return torch.full((self.channels, 1, *ksize), value, dtype=a.dtype, device=a.device)


class Conv(Leaf):
    """A convolution leaf: ``weight [out, in/groups, *k]``, optional ``bias``.

    ``padding`` takes an int, a per-dim tuple, per-dim ``(left, right)`` pairs,
    ``"valid"`` or ``"same"`` (stride 1; even kernels pad more on the right, as torch).
    Tensors passed as ``nn.Parameter`` stay parameters (shared if they belong to a
    module); plain tensors become buffers.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] | Sequence[Sequence[int]] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        name: str = "",
    ) -> None:
        super().__init__()
        if weight.dim() not in (3, 4, 5):
            raise IncompatibleError(f"conv weight must be 3-, 4- or 5-d, got shape {tuple(weight.shape)}")
        dims = weight.dim() - 2
        _register(self, "weight", weight)
        _register(self, "bias", bias)
        self.name = name
        self.dims = dims
        self.stride = tuple(stride) if not isinstance(stride, int) else (stride,) * dims
        self.dilation = tuple(dilation) if not isinstance(dilation, int) else (dilation,) * dims
        self.groups = int(groups)
        ksize = tuple(weight.shape[2:])
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0),) * dims
            elif padding == "same":
                if any(s != 1 for s in self.stride):
                    raise UnsupportedError(f"{self._name()}: padding='same' needs stride 1")
                pads = tuple(
                    (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(self.dilation, ksize)
                )
            else:
                raise UnsupportedError(f"{self._name()}: unknown padding {padding!r}")
        else:
            pads = normalize_padding(padding, dims)
        self.padding = pads
        if bias is not None and bias.shape != (weight.shape[0],):
            raise IncompatibleError(
                f"{self._name()}: bias shape {tuple(bias.shape)} does not match {weight.shape[0]} output channels"
            )
        try:
            self._spec()  # validate geometry now, naming this operand on failure
        except IncompatibleError as err:
            raise IncompatibleError(f"{self._name()}: {err}") from None

    def _name(self) -> str:
        return self.name or "Conv"

    @classmethod
    def from_module(cls, module: nn.Module, name: str = "") -> "Conv":
        """A leaf sharing ``module``'s parameters (any ``nn.Conv1d/2d/3d`` subclass)."""
        if not isinstance(module, tuple(_CONV_TYPES)):
            raise UnsupportedError(f"{name or type(module).__name__}: not a Conv1d/2d/3d ({type(module).__name__})")
        label = name or type(module).__name__
        if module.padding_mode != "zeros":
            raise UnsupportedError(
                f"{label}: padding_mode={module.padding_mode!r} is not linear-foldable (only 'zeros')"
            )
        return cls(
            module.weight,
            module.bias,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            name=label,
        )

    def _spec(self) -> ConvSpec:
        w = self.weight
        return ConvSpec(
            dims=self.dims,
            in_channels=w.shape[1] * self.groups,
            out_channels=w.shape[0],
            kernel_size=tuple(w.shape[2:]),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            has_bias=self.bias is not None,
        )

    def _kernel(self) -> Kernel:
        return Kernel(self.weight, self.bias, self._spec())

    def forward(self, x: Tensor) -> Tensor:
        return self._kernel().apply(x)

    def label(self) -> str:
        return f"{self.name + ' ' if self.name else ''}{self._spec().describe()}"


class Affine(BufferedLeaf):
    """Per-channel ``x * scale + shift``.

    ``scale``: ``[C]`` tensor, 0-d tensor (scalar), float, or ``None`` (1).
    ``shift``: ``[C]`` tensor or ``None``. ``nn.Parameter`` values stay learnable.
    """

    def __init__(
        self,
        channels: int,
        dims: int = 2,
        scale: Tensor | float | None = None,
        shift: Tensor | None = None,
        name: str = "",
    ) -> None:
        super().__init__(channels, dims)
        self.name = name
        if scale is not None:
            scale = _as_tensor(scale, "scale")
            if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != channels):
                raise IncompatibleError(
                    f"{name or 'Affine'}: scale of shape {tuple(scale.shape)} for {channels} channels"
                )
        if shift is not None and shift.shape != (channels,):
            raise IncompatibleError(f"{name or 'Affine'}: shift of shape {tuple(shift.shape)} for {channels} channels")
        _register(self, "scale", scale)  # type: ignore[arg-type]
        _register(self, "shift", shift)

    def _spec(self) -> ConvSpec:
        d = self.dims
        return ConvSpec(d, self.channels, self.channels, (1,) * d, (1,) * d, ((0, 0),) * d, (1,) * d,
                        self.channels, self.shift is not None)

    def _scale_vector(self) -> Tensor:
        if self.scale is None:
            return self._diag(1.0).reshape(self.channels)
        ref = self._diag(1.0).reshape(self.channels)
        return self.scale.expand_as(ref) if self.scale.dim() == 0 else self.scale

    def _kernel(self) -> Kernel:
        w = self._scale_vector().reshape(self.channels, 1, *([1] * self.dims))
        return Kernel(w, self.shift, self._spec())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, self.channels) + (1,) * self.dims
        if self.scale is not None:
            x = x * (self.scale if self.scale.dim() == 0 else self.scale.reshape(shape))
        if self.shift is not None:
            x = x + self.shift.reshape(shape)
        return x

    def label(self) -> str:
        return self.name or f"Affine({self.channels})"


def Scale(channels: int, dims: int = 2, init: float = 1.0, kind: str = "vector", name: str = "") -> Affine:
    """A learnable per-channel (``kind="vector"``) or single (``"scalar"``) scale."""
    check_choice("scale kind", kind, ("vector", "scalar"))
    shape = (channels,) if kind == "vector" else ()
    return Affine(channels, dims, scale=nn.Parameter(torch.full(shape, float(init))), name=name or "Scale")


def Bias(channels: int, dims: int = 2, init: float = 0.0, name: str = "") -> Affine:
    """A learnable per-channel bias add."""
    return Affine(channels, dims, shift=nn.Parameter(torch.full((channels,), float(init))), name=name or "Bias")


def Constant(channels: int, dims: int = 2, value: float = 1.0, name: str = "") -> Affine:
    """Multiply by a fixed constant."""
    return Affine(channels, dims, scale=torch.tensor(float(value)), name=name or f"x{value:g}")

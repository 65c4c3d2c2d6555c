"""Leaves of the kernel algebra without learnable weights of their own.

* :class:`BatchNorm` - wraps an ``nn.BatchNorm*d``. Unfolded it *runs the module* (so
  in training mode it uses batch statistics, as a multi-branch block trained offline
  does); folded it is the eval-mode affine map of its running statistics.
* :class:`Identity`, :class:`ZeroPad` (``ZeroPad >> BatchNorm`` is how "BN, then pad
  with the BN's bias" is written) and :class:`AvgPool` (``count_include_pad=False``
  with padding, and ``ceil_mode`` partial windows, are reported as inexact;
  ``divisor_override`` is a plain scale).

The base classes and the learnable leaves are in :mod:`.leaves`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import IncompatibleError, UnsupportedError
from .geometry import ConvSpec, normalize_padding
from .kernel import Kernel, pad_input
from .leaves import POOL_TYPES, BufferedLeaf, Leaf, dims_of

__all__ = ["BatchNorm", "Identity", "ZeroPad", "AvgPool"]

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class BatchNorm(Leaf):
    """A BatchNorm leaf wrapping an ``nn.BatchNorm1d/2d/3d`` (or subclass).

    Unfolded it runs the module (batch statistics in training mode); folded it is the
    eval-mode per-channel affine ``gamma / sqrt(var + eps)``, ``beta - mean * scale``,
    differentiable in ``gamma`` and ``beta``.
    """

    def __init__(self, bn: nn.Module, dims: int | None = None, name: str = "") -> None:
        super().__init__()
        label = name or type(bn).__name__
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedError(f"{label}: not a BatchNorm module ({type(bn).__name__})")
        if bn.running_mean is None or bn.running_var is None:
            raise UnsupportedError(
                f"{label}: track_running_stats=False has no eval-mode affine form to fold"
            )
        self.bn = bn
        self.name = label
        self.dims = dims if dims is not None else dims_of(bn)

    def _spec(self) -> ConvSpec:
        c, d = self.bn.num_features, self.dims
        return ConvSpec(d, c, c, (1,) * d, (1,) * d, ((0, 0),) * d, (1,) * d, c, True)

    def affine(self) -> tuple[Tensor, Tensor]:
        """The eval-mode ``(scale, shift)`` of the wrapped BN."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var + bn.eps)
        scale = inv if bn.weight is None else bn.weight * inv
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scale, shift

    def _kernel(self) -> Kernel:
        scale, shift = self.affine()
        return Kernel(scale.reshape(-1, 1, *([1] * self.dims)), shift, self._spec())

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)

    def label(self) -> str:
        return f"{self.name}({self.bn.num_features})"


class Identity(BufferedLeaf):
    """The identity map on ``channels`` channels."""

    def _spec(self) -> ConvSpec:
        d, c = self.dims, self.channels
        return ConvSpec(d, c, c, (1,) * d, (1,) * d, ((0, 0),) * d, (1,) * d, c, False)

    def _kernel(self) -> Kernel:
        return Kernel(self._diag(1.0), None, self._spec())

    def forward(self, x: Tensor) -> Tensor:
        return x

    def label(self) -> str:
        return f"Identity({self.channels})"


class ZeroPad(BufferedLeaf):
    """Zero padding of the spatial dims by per-dim ``(left, right)`` (or symmetric) amounts."""

    def __init__(self, channels: int, dims: int, padding: int | Sequence[int] | Sequence[Sequence[int]]) -> None:
        super().__init__(channels, dims)
        self.padding = normalize_padding(padding, dims)
        if any(p < 0 for pair in self.padding for p in pair):
            raise UnsupportedError(f"ZeroPad: negative padding (cropping) {self.padding} is not supported")

    @classmethod
    def from_fpad(cls, channels: int, dims: int, pad: Sequence[int]) -> "ZeroPad":
        """From an ``F.pad``-style tuple (last dim first), covering spatial dims only."""
        pad = list(pad)
        if len(pad) % 2 or len(pad) // 2 > dims:
            raise UnsupportedError(f"ZeroPad: F.pad tuple {tuple(pad)} does not pad only the {dims} spatial dims")
        pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
        pairs += [(0, 0)] * (dims - len(pairs))
        return cls(channels, dims, tuple(reversed(pairs)))

    def _spec(self) -> ConvSpec:
        d, c = self.dims, self.channels
        return ConvSpec(d, c, c, (1,) * d, (1,) * d, self.padding, (1,) * d, c, False)

    def _kernel(self) -> Kernel:
        return Kernel(self._diag(1.0), None, self._spec())

    def forward(self, x: Tensor) -> Tensor:
        return pad_input(x, self.padding)

    def label(self) -> str:
        return f"ZeroPad({self.channels}, {list(self.padding)})"


class AvgPool(BufferedLeaf):
    """Average pooling as a depthwise conv with weights ``1 / prod(kernel)``.

    Exact when the border divisor equals the window size, i.e. ``count_include_pad``
    is true or there is no padding (or ``divisor_override`` is set); ``ceil_mode`` is
    exact only when it cannot add a window, i.e. with stride 1.
    """

    def __init__(
        self,
        channels: int,
        dims: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        super().__init__(channels, dims)
        ks = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
        st = ks if stride is None or stride == [] else ((stride,) * dims if isinstance(stride, int) else tuple(stride))
        self.kernel_size, self.stride = ks, st
        self.pool_padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
        self.ceil_mode = bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        self.divisor_override = divisor_override
        if divisor_override is not None and dims == 1:
            raise UnsupportedError("AvgPool1d has no divisor_override")
        if len(ks) != dims or len(st) != dims or len(self.pool_padding) != dims:
            raise IncompatibleError(
                f"AvgPool: kernel_size={ks}, stride={st}, padding={self.pool_padding} do not all have {dims} entries"
            )
        if any(p < 0 or 2 * p > k for p, k in zip(self.pool_padding, ks)):
            raise UnsupportedError(
                f"AvgPool(k={ks}, p={self.pool_padding}): padding must be between 0 and half the kernel size"
            )
        try:
            self._spec()
        except IncompatibleError as err:
            raise IncompatibleError(f"AvgPool(k={ks}, s={st}, p={self.pool_padding}): {err}") from None
        reasons = []
        if any(self.pool_padding) and not count_include_pad and divisor_override is None:
            reasons.append(
                f"AvgPool(k={ks}, p={self.pool_padding}) with count_include_pad=False divides border "
                f"windows by fewer than {math.prod(ks)} taps"
            )
        if ceil_mode and any(s != 1 for s in st):
            reasons.append(f"AvgPool(k={ks}, s={st}) with ceil_mode=True may add a partial window")
        self.reasons = tuple(reasons)

    @classmethod
    def from_module(cls, module: nn.Module, channels: int) -> "AvgPool":
        """From an ``nn.AvgPool1d/2d/3d``; ``channels`` is the input channel count."""
        if not isinstance(module, tuple(POOL_TYPES)):
            raise UnsupportedError(f"{type(module).__name__} is not an AvgPool1d/2d/3d")
        dims = dims_of(module)

        def tup(v):  # AvgPool1d stores 1-tuples
            return tuple(v) if isinstance(v, (tuple, list)) else v

        return cls(
            channels,
            dims,
            tup(module.kernel_size),
            tup(module.stride),
            tup(module.padding),
            module.ceil_mode,
            module.count_include_pad,
            getattr(module, "divisor_override", None),
        )

    def _spec(self) -> ConvSpec:
        d, c = self.dims, self.channels
        pads = tuple((p, p) for p in self.pool_padding)
        return ConvSpec(d, c, c, self.kernel_size, self.stride, pads, (1,) * d, c, False)

    def _kernel(self) -> Kernel:
        div = self.divisor_override or math.prod(self.kernel_size)
        return Kernel(self._diag(1.0 / div, self.kernel_size), None, self._spec())

    def forward(self, x: Tensor) -> Tensor:
        kwargs = dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.pool_padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
        )
        if self.dims > 1:
            kwargs["divisor_override"] = self.divisor_override
        small = any(n < k for n, k in zip(x.shape[2:], self.kernel_size))
        if self.dims == 3 and small and any(self.pool_padding) and self.count_include_pad and not self.ceil_mode:
            # avg_pool3d (unlike 1-d/2-d) refuses inputs smaller than the kernel even when
            # the padding makes room: pad explicitly (zeros, counted as count_include_pad does)
            x = F.pad(x, [p for p in reversed(self.pool_padding) for _ in range(2)])
            kwargs["padding"] = 0
        return _AVG_POOL[self.dims](x, **kwargs)

    def label(self) -> str:
        return f"AvgPool(k={self.kernel_size}, s={self.stride}, p={self.pool_padding})"

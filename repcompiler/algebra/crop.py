"""The crop leaf of the kernel algebra: a zero pad with negative amounts.

This module owns :class:`Crop`. Slicing that drops border rows/columns of a feature
map (``x[:, :, a:-b, :]``, ACNet's block with ``padding < k // 2``) and ``F.pad``
with negative amounts are linear maps that are one convolution: per dimension, a
crop of ``a`` on the left and ``b`` on the right is a depthwise ``(a + b + 1)`` kernel
whose only non-zero tap (1) is at index ``a``, with no padding; a signed ``F.pad``
(crop on one side, pad on the other) is the same kernel with the positive amounts as
zero padding. The output length ``L + l + r`` and the positions read are exactly
those of the slice/pad.

:class:`Crop` is a :class:`~repcompiler.algebra.ZeroPad` (generalised to signed
amounts), so everything that treats a zero pad as a weight-free per-channel leaf (it
costs no convolution weights and never makes a region "hold a conv") treats a crop
the same way; the kernel-level exactness rules of
:mod:`~repcompiler.algebra.geometry` then decide every composition: a crop followed
by a conv that zero-pads the cropped dimension is refused (the pad would replace
data the crop dropped, not zeros), a crop after a biased op is exact, and a crop
that also pads is subject to the usual "bias under zero padding" rule.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from .geometry import ConvSpec, normalize_padding
from .kernel import Kernel
from .leaves_fixed import ZeroPad

__all__ = ["Crop"]


class Crop(ZeroPad):
    """Signed padding of the spatial dims: per-dim ``(left, right)``, negative = crop.
    ``Crop.from_fpad`` (inherited) reads a signed ``F.pad`` tuple."""

    def __init__(self, channels: int, dims: int, padding: int | Sequence[int] | Sequence[Sequence[int]]) -> None:
        # ZeroPad's constructor refuses negative amounts: initialise its base instead
        super(ZeroPad, self).__init__(channels, dims)
        self.padding = normalize_padding(padding, dims)

    def _taps(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...]]:
        """Kernel size, index of the one tap, and the (non-negative) zero padding."""
        size, tap, pads = [], [], []
        for left, right in self.padding:
            cl, cr = max(0, -left), max(0, -right)
            size.append(cl + cr + 1)
            tap.append(cl)
            pads.append((max(0, left), max(0, right)))
        return tuple(size), tuple(tap), tuple(pads)

    def _spec(self) -> ConvSpec:
        d, c = self.dims, self.channels
        size, _, pads = self._taps()
        return ConvSpec(d, c, c, size, (1,) * d, pads, (1,) * d, c, False)

    def _kernel(self) -> Kernel:
        size, tap, _ = self._taps()
        w = self._diag(0.0, size)
        w[(slice(None), 0, *tap)] = 1.0
        return Kernel(w, None, self._spec())

    def forward(self, x: Tensor) -> Tensor:
        fpad: list[int] = []
        for left, right in reversed(self.padding):
            fpad += [left, right]
        return F.pad(x, fpad) if any(fpad) else x

    def label(self) -> str:
        return f"Crop({self.channels}, {list(self.padding)})"

"""Training-time multi-branch blocks written the way their papers (and official code)
describe them, for tests of ``fold``, ``deploy`` and ``linearize``.

Each block is a plain ``nn.Module`` with a small constructor
``Block(in_channels, out_channels, kernel_size=3, stride=1, groups=1, ...)``, BN in
every branch, and *no* deploy code of its own: the compiler must find and fold the
branches. ``randomize_bn(model, seed)`` gives every BN non-trivial running statistics
and affine parameters so that folding is not a no-op.

* :class:`RepVGGBlock` (Ding et al. 2021): 3x3 conv + BN, 1x1 conv + BN, identity BN
  (when shapes allow), summed, then ReLU.
* :class:`DBBBlock` (Diverse Branch Block, Ding et al. 2021): kxk + BN; 1x1 + BN;
  1x1 -> BN that pads with its own bias (:class:`BNAndPad`) -> kxk average pool -> BN;
  1x1 (identity-based, :class:`IdentityBasedConv1x1`) -> BN that pads -> kxk (no
  padding) -> BN; summed, then ReLU.
* :class:`ACBlock` (ACNet, Ding et al. 2019): kxk, 1xk and kx1 convs each with BN, summed.
* :class:`MobileOneBlock` (Vasu et al. 2023): ``num_branches`` kxk conv + BN branches,
  a 1x1 conv + BN scale branch (k > 1), a BN skip (when shapes allow), summed, then ReLU.
* :class:`RepVGGNet`: a small RepVGG-style network (stem and stages of RepVGG blocks,
  global pooling, linear head).

``BNAndPad`` and ``IdentityBasedConv1x1`` compute what the official DBB code computes
(in-place border fill, ``weight + identity``); they are leaves with lowering rules
registered here, the way a user teaches repcompiler their own layers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from repcompiler import algebra as A
from repcompiler.explain.report import count_convs  # noqa: F401  (re-exported for the tests)
from repcompiler.rules import LowerInfo, register_rule

from helpers import randomize_bn as _randomize_bn

__all__ = [
    "conv_bn",
    "BNAndPad",
    "IdentityBasedConv1x1",
    "RepVGGBlock",
    "DBBBlock",
    "ACBlock",
    "MobileOneBlock",
    "RepVGGNet",
    "randomize_bn",
    "count_convs",
    "ALL_BLOCKS",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def conv_bn(cin: int, cout: int, k, stride=1, padding=0, groups: int = 1, dilation=1, dims: int = 2) -> nn.Sequential:
    """``Sequential(conv=ConvNd(bias=False), bn=BatchNormNd)`` as the papers' code builds it."""
    seq = nn.Sequential()
    seq.add_module("conv", _CONV[dims](cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False))
    seq.add_module("bn", _BN[dims](cout))
    return seq


class BNAndPad(nn.Module):
    """BN, then *bias* padding: the border is filled with the BN's own
    eval-mode shift, so that a following unpadded kxk conv sees exactly what it would
    see after padding the BN's input with zeros (official DBB ``BNAndPadLayer``)."""

    def __init__(self, pad: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        if self.pad > 0:
            bn = self.bn
            pad_values = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            out = F.pad(out, [self.pad] * 4)
            pv = pad_values.view(1, -1, 1, 1)
            p = self.pad
            out[:, :, 0:p, :] = pv
            out[:, :, -p:, :] = pv
            out[:, :, :, 0:p] = pv
            out[:, :, :, -p:] = pv
        return out


def _lower_bn_and_pad(m: BNAndPad, info: LowerInfo) -> A.Expr:
    # BN then fill the border with the BN's shift == pad with zeros, then BN (eval)
    return A.ZeroPad(m.bn.num_features, 2, m.pad) >> A.BatchNorm(m.bn, dims=2, name=info.name + ".bn")


class IdentityBasedConv1x1(nn.Conv2d):
    """A 1x1 conv whose effective kernel is ``weight + identity`` (weight initialised to
    zero), official DBB ``IdentityBasedConv1x1``."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        assert channels % groups == 0
        input_dim = channels // groups
        id_value = torch.zeros(channels, input_dim, 1, 1)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.register_buffer("id_tensor", id_value)
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.get_actual_kernel(), None, 1, 0, 1, self.groups)


def _lower_id_conv(m: IdentityBasedConv1x1, info: LowerInfo) -> A.Expr:
    return A.Conv(m.get_actual_kernel(), None, groups=m.groups, name=info.name)


register_rule(BNAndPad, _lower_bn_and_pad, override=True)
register_rule(IdentityBasedConv1x1, _lower_id_conv, override=True)


class RepVGGBlock(nn.Module):
    """RepVGG training-time block: 3x3+BN, 1x1+BN, identity BN, sum, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, dims: int = 2) -> None:
        super().__init__()
        assert kernel_size == 3
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = _BN[dims](in_channels) if out_channels == in_channels and stride == 1 else None
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups, dims=dims)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups, dims=dims)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class DBBBlock(nn.Module):
    """Diverse Branch Block (training form) with four branches (see module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, padding: int | None = None, internal_channels_1x1_3x3: int | None = None,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size, self.out_channels, self.groups = kernel_size, out_channels, groups
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(padding, out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module(
                "conv1", nn.Conv2d(in_channels, internal_channels_1x1_3x3, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(padding, internal_channels_1x1_3x3))
        self.dbb_1x1_kxk.add_module(
            "conv2", nn.Conv2d(internal_channels_1x1_3x3, out_channels, kernel_size, stride, 0, groups=groups,
                               bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class ACBlock(nn.Module):
    """ACNet asymmetric convolution block: kxk, 1xk and kx1 convs each with BN, summed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, padding: int | None = None) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, padding,
                                     groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(out_channels)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, (padding, 0),
                                  groups=groups, bias=False)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, (0, padding),
                                  groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.hor_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square_outputs = self.square_bn(self.square_conv(x))
        vertical_outputs = self.ver_bn(self.ver_conv(x))
        horizontal_outputs = self.hor_bn(self.hor_conv(x))
        return square_outputs + vertical_outputs + horizontal_outputs


class MobileOneBlock(nn.Module):
    """MobileOne training-time block: ``num_branches`` kxk conv+BN, 1x1 conv+BN scale
    branch, BN skip; summed, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, num_branches: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.num_conv_branches = num_branches
        self.rbr_skip = nn.BatchNorm2d(in_channels) if out_channels == in_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            [conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups) for _ in range(num_branches)]
        )
        self.rbr_scale = conv_bn(in_channels, out_channels, 1, stride, 0, groups) if kernel_size > 1 else None
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out = out + self.rbr_conv[ix](x)
        return self.activation(out)


class RepVGGNet(nn.Module):
    """A small RepVGG-style classifier: every layer is a :class:`RepVGGBlock`."""

    def __init__(self, widths=(8, 16, 32), blocks=(1, 2, 2), in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [RepVGGBlock(in_channels, widths[0], stride=2)]
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                layers.append(RepVGGBlock(cin, w, stride=stride))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    @property
    def num_blocks(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.gap(self.stages(x)), 1))


def _randomize_id_conv(m: nn.Module, g: torch.Generator) -> None:
    """:class:`IdentityBasedConv1x1` starts at ``weight == 0``: perturb it, so that a
    lowering that ignored ``weight`` would be caught."""
    if isinstance(m, IdentityBasedConv1x1):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)


# helpers.randomize_bn with the ranges these fixtures have always used (narrower than
# the helpers defaults, no sign flips, BNs without running stats left alone, float32
# draws), plus the zero-initialised IdentityBasedConv1x1 weights.
randomize_bn = functools.partial(
    _randomize_bn,
    mean_std=0.2,
    var_range=(0.25, 1.75),
    bias_std=0.2,
    flip_prob=0.0,
    skip_untracked=True,
    draw_dtype=torch.float32,
    extra=_randomize_id_conv,
)


ALL_BLOCKS = {
    "repvgg": RepVGGBlock,
    "dbb": DBBBlock,
    "acnet": ACBlock,
    "mobileone": MobileOneBlock,
}

"""Re-parameterizable blocks written with the constructs their authors' code uses.

Unlike :mod:`fixtures_blocks` (written to be traceable, with rules registered for its
custom layers), nothing here is written for repcompiler and no rule is registered:
each class computes what the official training code computes, with the same Python
constructs (our own code, not copied), and carries the author's own conversion
(``switch_to_deploy``) so tests can compare ``rc.fold`` with it.

* :class:`DBBIdentityConv1x1` - DBB's ``IdentityBasedConv1x1``: a ``Conv2d`` subclass
  whose ``forward`` adds a fixed identity to its weight (``F.conv2d`` with a computed
  weight).
* :class:`DBBBNAndPad` - DBB's BN-and-pad layer: BN, then ``F.pad`` and **in-place
  slice writes** of the BN's shift into the border (``out[:, :, 0:p, :] = values``).
* :class:`DBBBlock` - the Diverse Branch Block, accumulating in place
  (``out += branch(x)``).
* :class:`ACNetBlock` - ACNet's block; with ``padding < k // 2`` the asymmetric
  branches crop their input by slicing.
* :class:`OfficialOREPA` - the official OREPA block: the kernel is generated every
  forward from six branches with Python arithmetic on parameter shapes
  (``int(t / g)``, ``view(*shape)``), then one ``F.conv2d`` and a BN.
* :class:`YoloConv` / :class:`YoloRepConv` - ultralytics' ``Conv`` with a class-level
  activation shared by every instance (``default_act = nn.SiLU()``) and its RepConv.
* :class:`InPlaceParent` - an untraceable parent (a data-dependent branch) that
  accumulates in place into a conv -> BN child's output (DBB's ResNet bottleneck).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DBBIdentityConv1x1",
    "DBBBNAndPad",
    "DBBBlock",
    "ACNetBlock",
    "OfficialOREPA",
    "YoloConv",
    "YoloRepConv",
    "InPlaceParent",
    "AssertingRepVGG",
    "ShapeCheckBetweenConvAndBN",
    "fuse_bn",
]


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' ``transI_fusebn``: a kernel and the BN after it as one kernel + bias."""
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Sequential:
    s = nn.Sequential()
    s.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    s.add_module("bn", nn.BatchNorm2d(cout))
    return s


# -- DBB ------------------------------------------------------------------------------------


class DBBIdentityConv1x1(nn.Conv2d):
    """A 1x1 conv initialised at zero whose effective weight is ``weight + identity``."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        input_dim = channels // groups
        ident = torch.zeros(channels, input_dim, 1, 1)
        for i in range(channels):
            ident[i, i % input_dim, 0, 0] = 1
        self.id_tensor = ident  # a plain attribute, as in the official code
        nn.init.zeros_(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)

    def get_actual_kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor.to(self.weight.device)


class DBBBNAndPad(nn.Module):
    """BN, then a zero pad whose border is overwritten with the BN's output for zero."""

    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            p = self.pad_pixels
            output[:, :, 0:p, :] = pad_values
            output[:, :, -p:, :] = pad_values
            output[:, :, :, 0:p] = pad_values
            output[:, :, :, -p:] = pad_values
        return output


class DBBBlock(nn.Module):
    """The Diverse Branch Block (kxk, 1x1, 1x1 -> avg, 1x1 -> kxk; BN in every branch)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.k, self.stride, self.padding, self.groups, self.cin = k, stride, padding, groups, cin
        self.nonlinear = nn.Identity()
        self.dbb_origin = _conv_bn(cin, cout, k, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", DBBBNAndPad(padding, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=k, stride=stride, padding=0))
            self.dbb_1x1 = _conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=k, stride=stride, padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", DBBIdentityConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", DBBBNAndPad(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


# -- ACNet ----------------------------------------------------------------------------------


class ACNetBlock(nn.Module):
    """kxk + kx1 + 1xk convs, each with a BN, summed; crops by slicing when
    ``padding < k // 2``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.square_conv = nn.Conv2d(cin, cout, (k, k), stride, padding, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        if padding - k // 2 >= 0:
            self.crop = 0
            hor_padding = [padding - k // 2, padding]
            ver_padding = [padding, padding - k // 2]
        else:
            self.crop = k // 2 - padding
            hor_padding = [0, padding]
            ver_padding = [padding, 0]
        self.ver_conv = nn.Conv2d(cin, cout, (k, 1), stride, ver_padding, bias=False)
        self.hor_conv = nn.Conv2d(cin, cout, (1, k), stride, hor_padding, bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)
        self.hor_bn = nn.BatchNorm2d(cout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        square = self.square_bn(self.square_conv(input))
        if self.crop > 0:
            ver_input = input[:, :, :, self.crop:-self.crop]
            hor_input = input[:, :, self.crop:-self.crop, :]
        else:
            ver_input = input
            hor_input = input
        vertical = self.ver_bn(self.ver_conv(ver_input))
        horizontal = self.hor_bn(self.hor_conv(hor_input))
        return square + vertical + horizontal


# -- official OREPA ---------------------------------------------------------------------------


class OfficialOREPA(nn.Module):
    """OREPA's training block as its official code computes it: a kernel generated from
    six branches (shape arithmetic in Python), one conv, a BN (the authors' deploy form
    folds the BN into the generated kernel)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = cin, cout, k
        self.stride, self.padding, self.groups, self.dilation = stride, padding, groups, 1
        self.nonlinear = nn.Identity()
        self.weight_orepa_origin = nn.Parameter(torch.empty(cout, cin // groups, k, k))
        nn.init.kaiming_uniform_(self.weight_orepa_origin, a=math.sqrt(1.0))
        self.weight_orepa_avg_conv = nn.Parameter(torch.empty(cout, cin // groups, 1, 1))
        self.weight_orepa_pfir_conv = nn.Parameter(torch.empty(cout, cin // groups, 1, 1))
        nn.init.kaiming_uniform_(self.weight_orepa_avg_conv, a=0.0)
        nn.init.kaiming_uniform_(self.weight_orepa_pfir_conv, a=0.0)
        self.register_buffer("weight_orepa_avg_avg", torch.ones(k, k).mul(1.0 / k / k))
        internal = cin if groups < cout else 2 * cin
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(cin, cin // groups, 1, 1))
        ident = torch.zeros(cin, cin // groups, 1, 1)
        for i in range(cin):
            ident[i, i % (cin // groups), 0, 0] = 1
        self.register_buffer("id_tensor", ident)
        assert internal == cin or groups > 1
        self.weight_orepa_1x1_kxk_conv2 = nn.Parameter(torch.empty(cout, cin // groups, k, k))
        nn.init.kaiming_uniform_(self.weight_orepa_1x1_kxk_conv2, a=math.sqrt(0.0))
        self.weight_orepa_1x1 = nn.Parameter(torch.empty(cout, cin // groups, 1, 1))
        nn.init.kaiming_uniform_(self.weight_orepa_1x1, a=0.0)
        expand = 8
        self.weight_orepa_gconv_dw = nn.Parameter(torch.empty(cin * expand, 1, k, k))
        self.weight_orepa_gconv_pw = nn.Parameter(torch.empty(cout, cin * expand // groups, 1, 1))
        nn.init.kaiming_uniform_(self.weight_orepa_gconv_dw, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.weight_orepa_gconv_pw, a=math.sqrt(5))
        prior = torch.zeros(cout, k, k)
        for i in range(cout):
            for h in range(k):
                for w in range(k):
                    prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i % k) / k) * math.cos(
                        math.pi * (w + 0.5) * ((i // k) % k) / k)
        self.register_buffer("weight_orepa_prior", prior)
        self.vector = nn.Parameter(torch.Tensor(6, cout))
        for row, value in enumerate((0.25, 0.25, 0.0, 0.5, 1.0, 0.5)):
            nn.init.constant_(self.vector[row, :], value)
        self.bn = nn.BatchNorm2d(cout)

    def dwsc2full(self, weight_dw: torch.Tensor, weight_pw: torch.Tensor, groups: int, groups_conv: int = 1) -> torch.Tensor:
        t, ig, h, w = weight_dw.size()
        o, _, _, _ = weight_pw.size()
        tg = int(t / groups)
        i = int(ig * groups)
        ogc = int(o / groups_conv)
        groups_gc = int(groups / groups_conv)
        weight_dw = weight_dw.view(groups_conv, groups_gc, tg, ig, h, w)
        weight_pw = weight_pw.squeeze().view(ogc, groups_conv, groups_gc, tg)
        weight_dsc = torch.einsum("cgtihw,ocgt->cogihw", weight_dw, weight_pw)
        return weight_dsc.reshape(o, int(i / groups_conv), h, w)

    def weight_gen(self) -> torch.Tensor:
        w_origin = torch.einsum("oihw,o->oihw", self.weight_orepa_origin, self.vector[0, :])
        w_avg = torch.einsum("oihw,o->oihw", torch.einsum(
            "oi,hw->oihw", self.weight_orepa_avg_conv.squeeze(3).squeeze(2), self.weight_orepa_avg_avg),
            self.vector[1, :])
        w_pfir = torch.einsum("oihw,o->oihw", torch.einsum(
            "oi,ohw->oihw", self.weight_orepa_pfir_conv.squeeze(3).squeeze(2), self.weight_orepa_prior),
            self.vector[2, :])
        conv1 = (self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor).squeeze(3).squeeze(2)
        conv2 = self.weight_orepa_1x1_kxk_conv2
        if self.groups > 1:
            g = self.groups
            t, ig = conv1.size()
            o, tg, h, w = conv2.size()
            conv1 = conv1.view(g, int(t / g), ig)
            conv2 = conv2.view(g, int(o / g), tg, h, w)
            w_1x1_kxk = torch.einsum("gti,gothw->goihw", conv1, conv2).reshape(o, ig, h, w)
        else:
            w_1x1_kxk = torch.einsum("ti,othw->oihw", conv1, conv2)
        w_1x1_kxk = torch.einsum("oihw,o->oihw", w_1x1_kxk, self.vector[3, :])
        p = self.kernel_size // 2
        w_1x1 = torch.einsum("oihw,o->oihw", F.pad(self.weight_orepa_1x1, [p, p, p, p]), self.vector[4, :])
        w_gconv = self.dwsc2full(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw, self.in_channels, self.groups)
        w_gconv = torch.einsum("oihw,o->oihw", w_gconv, self.vector[5, :])
        return w_origin + w_avg + w_1x1_kxk + w_pfir + w_gconv + w_1x1

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "orepa_reparam"):
            return self.nonlinear(self.orepa_reparam(inputs))
        weight = self.weight_gen()
        out = F.conv2d(inputs, weight, bias=None, stride=self.stride, padding=self.padding,
                       dilation=self.dilation, groups=self.groups)
        return self.nonlinear(self.bn(out))

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        kernel, bias = fuse_bn(self.weight_gen(), self.bn)
        self.orepa_reparam = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.padding, groups=self.groups, bias=True)
        self.orepa_reparam.weight.copy_(kernel)
        self.orepa_reparam.bias.copy_(bias)
        for name in [n for n, _ in self.named_parameters() if n.startswith("weight_orepa") or n == "vector"]:
            delattr(self, name)
        del self.bn


# -- ultralytics ------------------------------------------------------------------------------


class YoloConv(nn.Module):
    """ultralytics' ``Conv``: conv, BN, and a class-level activation module shared by
    every instance in the model."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | nn.Module = True) -> None:
        super().__init__()
        p = k // 2 if p is None else p
        self.conv = nn.Conv2d(c1, c2, k, s, p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class YoloRepConv(nn.Module):
    """ultralytics' ``RepConv``: 3x3 conv-BN + 1x1 conv-BN (+ identity BN), shared
    activation."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1, bn: bool = False) -> None:
        super().__init__()
        self.c1, self.c2, self.g = c1, c2, g
        self.act = self.default_act
        self.bn = nn.BatchNorm2d(c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = YoloConv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = YoloConv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class InPlaceParent(nn.Module):
    """A parent that does not trace (it branches on a tensor's value) and accumulates in
    place into its conv -> BN child's output, as DBB's ResNet bottleneck does."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.body = _conv_bn(c, c, 3, 1, 1)
        self.short = _conv_bn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if bool(x.sum() > -1e30):  # data-dependent control flow: symbolic tracing fails here
            out += self.short(x)
        return torch.relu(out)


# -- plain ``assert`` statements in forward (here, not in a test module: pytest rewrites the
# asserts of test modules into other bytecode) ------------------------------------------------


class AssertingRepVGG(nn.Module):
    """A RepVGG-style block that checks its input with plain ``assert`` statements, as
    much user code does (``x.ndim``, ``x.shape[1]``, an ``assert not``)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.k3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.k1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4, "expected NCHW"
        assert not x.shape[1] != self.c
        return self.bn3(self.k3(x)) + self.bn1(self.k1(x))


class ShapeCheckBetweenConvAndBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        assert y.shape[1] == 4
        return self.bn(y)

"""fold on hand-written graphs: function regions, boundaries, refusals, report, deploy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repcompiler
from repcompiler import algebra as A
from repcompiler.errors import RepCompilerError, UnsupportedError, VerificationError
from repcompiler.online.conv import OfflineBlock, OnlineConv
from repcompiler.rules.defaults import default_rules
from fixtures_blocks import count_convs, randomize_bn


def _eq(a, b, tol=1e-10):
    return torch.allclose(a, b, rtol=tol, atol=tol)


class SharedConv(nn.Module):
    """One conv module called twice (shared weights), each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.relu(x)))


def test_shared_conv_is_not_misfused():
    m = randomize_bn(SharedConv().double()).eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    folded, report = repcompiler.fold(m, return_report=True)
    assert _eq(folded(x), m(x))
    assert isinstance(folded.conv, nn.Conv2d) and folded.conv.bias is None  # untouched
    assert torch.equal(folded.conv.weight, m.conv.weight)
    assert not report.folded


class SharedAtTwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 3, 1, bias=False)
        self.a = nn.Sequential(conv, nn.BatchNorm2d(3))
        self.b = nn.Sequential(conv, nn.BatchNorm2d(3))

    def forward(self, x):
        return self.a(x) * self.b(x)


def test_module_registered_twice_is_a_boundary():
    m = randomize_bn(SharedAtTwoPaths().double()).eval()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    folded = repcompiler.fold(m)
    assert _eq(folded(x), m(x))
    assert folded.a[0] is folded.b[0]


class FunctionalSimple(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=0, bias=True)
        self.c2 = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.register_buffer("beta", torch.randn(1, 8, 1, 1))

    def forward(self, x):
        a = self.c1(F.pad(x, [1, 1, 1, 1])) * 0.5
        b = 2.0 * self.c2(x) - x[:, :1] * 0 + 1.0
        y = torch.cat([a, b], dim=1)
        return torch.relu(self.bn(y) * self.gamma.view(1, -1, 1, 1) + self.beta)

    def extra(self):
        return "user method"


def test_functional_region_folds_into_one_conv_in_the_root():
    m = randomize_bn(FunctionalSimple().double()).eval()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    folded, report = repcompiler.fold(m, return_report=True)
    assert _eq(folded(x), m(x))
    assert isinstance(folded, FunctionalSimple) and folded.extra() == "user method"
    # c1 (with pad, scale), bn, gamma, beta fold; c2's branch reads x[:, :1] (opaque)
    assert report.folded, report
    assert count_convs(folded) <= count_convs(m)


class PadThenConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ConstantPad2d((1, 1, 1, 1), 0.0)
        self.conv = nn.Conv2d(3, 5, 3, bias=False)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return torch.sigmoid(self.bn(self.conv(self.pad(x))))


def test_module_chain_with_pad_is_rewritten_in_place():
    m = randomize_bn(PadThenConvBN().double()).eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    folded = repcompiler.fold(m)
    assert type(folded) is PadThenConvBN  # no forward rewrite needed for module chains
    assert isinstance(folded.pad, nn.Identity) and isinstance(folded.bn, nn.Identity)
    assert folded.conv.padding == (1, 1)
    assert _eq(folded(x), m(x))


class Inexact(nn.Module):
    """3x3 (bias) -> 3x3 padded: not equal to one 5x5 at the borders."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1, bias=True)
        self.b = nn.Conv2d(3, 3, 3, padding=1, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def test_inexact_region_is_refused_with_reason():
    m = Inexact().double().eval()
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    folded, report = repcompiler.fold(m, return_report=True)
    assert count_convs(folded) == 2 and _eq(folded(x), m(x))
    assert report.refused and "bias" in report.refused[0].reason
    assert "refused" in str(report)


class Bottleneck(nn.Module):
    """conv1x1 96->8 -> BN -> conv1x1 8->96 -> BN: exact but a low-rank factorization."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(96, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 96, 1, bias=False), nn.BatchNorm2d(96)

    def forward(self, x):
        return self.b2(self.c2(self.b1(self.c1(x))))


def test_factorized_chain_is_not_merged_but_bns_fold():
    m = randomize_bn(Bottleneck().double()).eval()
    folded, report = repcompiler.fold(m, return_report=True)
    assert count_convs(folded) == 2
    assert isinstance(folded.b1, nn.Identity) and isinstance(folded.b2, nn.Identity)
    assert any("bigger" in e.reason for e in report.entries)
    merged = repcompiler.fold(m, merge_convs=True)  # still not: it would be bigger
    assert count_convs(merged) == 2
    x = torch.randn(1, 96, 4, 4, dtype=torch.float64)
    assert _eq(folded(x), m(x))


class OneByOneThenKxK(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 1, bias=False)
        self.c2 = nn.Conv2d(4, 6, 3, padding=0, stride=2, bias=True)

    def forward(self, x):
        return self.c2(self.c1(x))


def test_conv_then_conv_composes():
    m = OneByOneThenKxK().double().eval()
    kept, report = repcompiler.fold(m, return_report=True)
    assert count_convs(kept) == 2 and "merge_convs" in report.entries[0].reason
    folded = repcompiler.fold(m, merge_convs=True)
    assert count_convs(folded) == 1
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    assert _eq(folded(x), m(x))


def test_bad_inputs():
    with pytest.raises(UnsupportedError, match="nn.Module"):
        repcompiler.fold(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError, match="example_inputs"):
        repcompiler.fold(nn.Conv2d(1, 1, 1), example_inputs=3)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError, match="does not run"):
        repcompiler.fold(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.randn(1, 5, 4, 4))
    with pytest.raises(RepCompilerError):
        repcompiler.fold(torch.jit.script(nn.Conv2d(1, 1, 1)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow
            return self.head(y)
        return -self.head(y)


def test_untraceable_root_falls_back_to_submodules_and_reports():
    m = randomize_bn(Untraceable().double()).eval()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    folded, report = repcompiler.fold(m, x, return_report=True)
    assert type(folded) is Untraceable
    assert isinstance(folded.body[1], nn.Identity)
    assert _eq(folded(x), m(x))
    assert report.skipped and report.skipped[0][0] == "<root>"
    assert "skipped" in str(report)


class WrongRuleBN(nn.BatchNorm2d):
    pass


def test_wrong_rule_is_caught_by_verification():
    reg = default_rules().copy()
    reg.register(WrongRuleBN, lambda m, info: A.Identity(info.in_channels, info.dims))  # ignores the BN
    m = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), WrongRuleBN(3))
    randomize_bn(m)
    with pytest.raises(VerificationError, match=r"0 -> 1"):
        repcompiler.fold(m.eval(), rules=reg)
    folded = repcompiler.fold(m.eval(), rules=reg, verify=False)  # the user asked for it
    assert count_convs(folded) == 1


def test_weight_standardized_conv_subclass_is_opaque():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    m = randomize_bn(nn.Sequential(StdConv(2, 3, 3, bias=False), nn.BatchNorm2d(3)).double()).eval()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    folded = repcompiler.fold(m)
    assert _eq(folded(x), m(x))


def test_hooked_modules_are_opaque_and_parametrized_weights_fold():
    """A forward hook may change what a module computes and a fold would drop it, so a
    hooked conv or BN is left as it is (hook-based spectral_norm recomputes the weight in
    a pre-hook); a parametrized weight (torch.nn.utils.parametrizations) is read through
    the parametrization, so it folds, with its current value."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def net():
        return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).double()).eval()

    hooked = net()
    hooked[0].register_forward_hook(lambda mod, inp, out: 2 * out)
    folded = repcompiler.fold(hooked)
    assert count_convs(folded) == 1 and isinstance(folded[1], nn.BatchNorm2d)
    assert _eq(folded(x), hooked(x))
    pre = net()
    pre[1].register_forward_pre_hook(lambda mod, inp: (inp[0] + 1,))
    assert _eq(repcompiler.fold(pre)(x), pre(x))
    old_sn = net()
    nn.utils.spectral_norm(old_sn[0])
    want = old_sn(x)  # hook-based: the forward computes the normalised weight (a non-leaf
    folded = repcompiler.fold(old_sn, inplace=True)  # attribute: the model cannot be copied)
    assert isinstance(folded[1], nn.BatchNorm2d) and _eq(folded(x), want)
    new_sn = net()
    nn.utils.parametrizations.spectral_norm(new_sn[0])
    with torch.no_grad():
        want = new_sn(x)
    folded = repcompiler.fold(new_sn)
    assert isinstance(folded[1], nn.Identity) and _eq(folded(x), want)


def test_report_table_lists_regions():
    from fixtures_blocks import RepVGGNet

    _, report = repcompiler.fold(randomize_bn(RepVGGNet()).eval(), return_report=True)
    text = str(report)
    assert "folded" in text and "stages.0" in text and "convs 12 -> 6" in text
    assert report.counts() == {"folded": 6}
    row = report.folded[0]
    assert row.params_before > row.params_after > 0


def _online(cin, cout, post_bn):
    w1 = nn.Parameter(torch.randn(cout, cin, 3, 3, dtype=torch.float64))
    w2 = nn.Parameter(torch.randn(cout, cin, 1, 1, dtype=torch.float64))
    expr = A.Conv(w1, padding=1) + (A.Conv(w2) >> A.Scale(cout).double())
    bn = nn.BatchNorm2d(cout).double() if post_bn else None
    return OnlineConv(expr, bn)


class OnlineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = _online(3, 4, post_bn=True)
        self.b2 = _online(4, 4, post_bn=False)
        self.bn2 = nn.BatchNorm2d(4).double()

    def forward(self, x):
        return self.bn2(self.b2(torch.relu(self.b1(x))))


@pytest.mark.parametrize("entry", [repcompiler.deploy, repcompiler.fold])
def test_deploy_online_blocks_become_one_conv_each(entry):
    m = randomize_bn(OnlineNet()).eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    deployed, report = entry(m, return_report=True)
    assert count_convs(deployed) == 2
    assert not any(isinstance(mm, (OnlineConv, nn.BatchNorm2d)) for mm in deployed.modules())
    assert _eq(deployed(x), m(x))
    assert report.title == entry.__name__


def test_deploy_offline_block():
    w = nn.Parameter(torch.randn(4, 4, 3, 3, dtype=torch.float64))
    bn = nn.BatchNorm2d(4).double()
    expr = (A.Conv(w, padding=1) >> A.BatchNorm(bn)) + A.Identity(4, 2).double()
    m = randomize_bn(nn.Sequential(OfflineBlock(expr, nn.BatchNorm2d(4).double()), nn.ReLU())).eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    deployed = repcompiler.deploy(m)
    assert count_convs(deployed) == 1 and _eq(deployed(x), m(x))


def test_frozen_batchnorm_folds():
    from torchvision.ops.misc import FrozenBatchNorm2d

    fbn = FrozenBatchNorm2d(4)
    fbn.running_var.uniform_(0.5, 2)
    fbn.running_mean.normal_()
    fbn.weight.uniform_(0.5, 2)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), fbn, nn.ReLU()).eval()
    x = torch.randn(1, 2, 6, 6)
    folded = repcompiler.fold(m)
    assert isinstance(folded[1], nn.Identity)
    assert torch.allclose(folded(x), m(x), rtol=1e-5, atol=1e-5)

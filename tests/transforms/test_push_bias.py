"""PushBias (passes/push_bias.py) and its use in deploy: the bias an inserted post-BN
leaves on a conv that had none moves into the BNs downstream, exactly, and only where
every use reaches a BN through constant-carrying ops."""

from __future__ import annotations

import torch
from torch import nn

import repcompiler as rc
from repcompiler.explain.report import count_params
from repcompiler.capture.tracing import trace_model
from repcompiler.passes.base import run_passes
from repcompiler.passes.push_bias import PushBias
from repcompiler.passes.state import pipeline_state

from helpers import randomize_bn, rel_err


class DenseLike(nn.Module):
    """conv (no bias, no BN after) -> concat with the input -> BN, DenseNet style; plus a
    pooled path to a second BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn_a = nn.BatchNorm2d(10)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        a = self.bn_a(torch.cat([x, y], 1))
        b = self.bn_b(self.pool(y))
        return a.sum((2, 3)) + b.sum((2, 3)).repeat(1, 2)[:, :10]


class Leaky(nn.Module):
    """The conv's output also reaches the model output directly: the bias must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(torch.cat([y, x], 1)), y


def _trained(model: nn.Module) -> nn.Module:
    model = rc.orepa_transform(model).double()
    randomize_bn(model)
    return model.eval()


def test_inserted_bias_moves_into_downstream_bns_exactly():
    torch.manual_seed(0)
    plain = DenseLike().double().eval()
    model = _trained(plain)
    assert model.conv.bias_from_inserted_bn
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    deployed = rc.deploy(model, (x,))
    assert deployed.conv.bias is None
    assert count_params(deployed) == count_params(rc.deploy(plain, (x,)))
    with torch.no_grad():
        assert rel_err(deployed(x), model(x)) < 1e-12


def test_bias_is_kept_when_a_use_does_not_reach_a_bn():
    torch.manual_seed(0)
    model = _trained(Leaky().double().eval())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    deployed = rc.deploy(model, (x,))
    assert deployed.conv.bias is not None
    with torch.no_grad():
        for got, want in zip(deployed(x), model(x)):
            assert rel_err(got, want) < 1e-12


def test_pass_alone_reports_what_it_moved_and_respects_shared_bns():
    torch.manual_seed(0)
    m = DenseLike().double().eval()
    m.conv.bias = nn.Parameter(torch.randn(6, dtype=torch.float64))
    randomize_bn(m)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
    gm = trace_model(m)
    assert not run_passes(gm, [PushBias(["conv"])]).modified  # the input's channel count is unknown
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x)
    assert run_passes(gm, [PushBias(["conv"])]).modified and pipeline_state(gm).pushed_biases == ["conv"]
    with torch.no_grad():
        assert rel_err(m(x), want) < 1e-12
    # a BN module called twice cannot absorb a shift for one of its calls

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1, bias=True), nn.BatchNorm2d(3).eval()

        def forward(self, t):
            return self.bn(self.conv(t)) + self.bn(t)

    s = Shared()
    assert not run_passes(trace_model(s), [PushBias(["conv"])]).modified and s.conv.bias is not None

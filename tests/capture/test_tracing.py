"""The tracer: rule-registered leaves, torchvision helpers, fallback to submodules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from repcompiler.errors import TraceError
from repcompiler.online.conv import OnlineConv
from repcompiler.capture.tracing import RepTracer, trace_model, trace_units
from repcompiler import algebra as A


class MyConv(nn.Conv2d):
    pass


class Opaque(nn.Module):
    def forward(self, x):
        return x * 2


def test_rule_modules_are_leaves_and_containers_are_traced_through():
    m = nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), Opaque()))
    gm = trace_model(m)
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert mods == ["0", "1", "2.0"]  # Opaque is traced through (its x * 2 is a function node)
    assert gm.get_submodule("0") is m[0]  # leaves are shared, not copied


def test_online_conv_is_a_leaf():
    expr = A.Conv(nn.Parameter(torch.randn(4, 3, 3, 3)), padding=1)
    m = nn.Sequential(OnlineConv(expr), nn.ReLU())
    gm = trace_model(m)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert RepTracer().is_leaf_module(m[0], "0")


def test_trace_error_names_the_model():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="Bad"):
        trace_model(Bad())
    with pytest.raises(TraceError):
        trace_model(3)  # type: ignore[arg-type]


def test_trace_is_specialised_on_training_flag():
    m = torchvision.models.googlenet(weights=None, init_weights=False, aux_logits=True)
    m.eval()
    gm = trace_model(m)
    assert not any("aux" in str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def test_detection_model_falls_back_to_backbone_and_heads():
    m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None).eval()
    res = trace_units(m)
    paths = [u.path for u in res.units]
    assert "backbone" in paths and "rpn.head.conv" in paths
    skipped = dict(res.skipped)
    assert "<root>" in skipped and "iterated" in skipped["<root>"]
    assert not res.whole


def test_whole_model_traces():
    res = trace_units(torchvision.models.resnet18())
    assert res.whole and res.units[0].path == ""


class BNAct(nn.BatchNorm2d):
    """timm-style BN + activation in one module (its own forward)."""

    def __init__(self, c, act=True):
        super().__init__(c)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps))


def _bn_act_rule(m, info):
    return A.BatchNorm(m, dims=info.dims) if isinstance(m.act, nn.Identity) else None


def test_a_leaf_whose_rule_declines_is_traced_into_and_its_linear_part_folds():
    import repcompiler
    from repcompiler.rules import default_rules
    from helpers import randomize_bn

    rules = default_rules().copy()
    rules.register(BNAct, _bn_act_rule)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4, act=True), nn.Conv2d(4, 4, 1), BNAct(4, act=False)))
    m = m.double().eval()
    gm = trace_model(m, rules=rules)
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert mods == ["0", "1.act", "2", "3"]  # declined: traced into; accepted: a leaf
    assert any(n.target is torch.nn.functional.batch_norm for n in gm.graph.nodes)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded = repcompiler.fold(m, rules=rules)
    assert sum(isinstance(c, nn.Conv2d) for c in folded.modules()) == 2
    assert torch.allclose(folded(x), m(x), rtol=1e-10, atol=1e-10)
    # in training mode it stays a leaf: tracing its forward would bake the training
    # branch (batch statistics) into a rewritten forward
    m.train()
    assert RepTracer(rules).is_leaf_module(m[1], "1")

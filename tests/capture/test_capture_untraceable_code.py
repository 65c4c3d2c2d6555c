"""Capture of code plain ``torch.fx`` rejects (through the compiler's tracer, :func:`trace_model`),
and the rules and passes for the layers of real models.

Covers :mod:`repcompiler.capture.python`, :mod:`repcompiler.capture.patterns`,
:mod:`repcompiler.rules.layers` (with :class:`repcompiler.algebra.crop.Crop`) and
:mod:`repcompiler.passes.fold_linear_bn`. Whole-family fold checks live in
``test_real_models.py``.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import repcompiler as rc
from fixtures_thirdparty import (AssertingRepVGG, DBBBNAndPad, DBBIdentityConv1x1, OfficialOREPA,
                                 ShapeCheckBetweenConvAndBN)
from helpers import linear_bn_folds
from repcompiler.algebra.crop import Crop
from repcompiler.capture.python import CaptureTracerMixin, capture_info
from repcompiler.capture.tracing import trace_model
from repcompiler.errors import TraceError
from repcompiler.rules.layers import crop_of_index
from repcompiler.testing import randomize_bn

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _randomized(m: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    randomize_bn(m, torch.Generator().manual_seed(seed))
    return m.eval()


# -- capture -----------------------------------------------------------------------------


def test_bn_and_pad_border_writes_become_pad_then_bn_in_eval():
    m = _randomized(DBBBNAndPad(2, 6))
    gm = trace_model(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert operator.setitem not in targets and F.pad in targets
    order = [n.op for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    assert order == ["call_function", "call_module"]  # F.pad, then the BN leaf
    info = capture_info(gm)
    assert info.needed and info.rewrites and not info.declined
    x = torch.randn(2, 6, 7, 9)
    assert _rel(gm(x), m(x)) < 1e-6


def test_bn_and_pad_kept_in_training_mode():
    m = DBBBNAndPad(1, 4).train()
    m.bn.momentum = 0.0  # both calls below see the same running statistics
    gm = trace_model(m)
    assert sum(n.target is operator.setitem for n in gm.graph.nodes) == 4
    x = torch.randn(3, 4, 5, 5)
    assert _rel(gm(x), m(x)) < 1e-6


class _WrongBorder(DBBBNAndPad):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = F.pad(self.bn(input), [self.pad_pixels] * 4)
        v = self.bn.bias.detach().view(1, -1, 1, 1)  # not the BN's output for 0
        output[:, :, 0:1, :] = v
        output[:, :, -1:, :] = v
        output[:, :, :, 0:1] = v
        output[:, :, :, -1:] = v
        return output


def test_bn_and_pad_with_other_values_is_declined_with_reason():
    m = _randomized(_WrongBorder(1, 4))
    gm = trace_model(m)
    assert sum(n.target is operator.setitem for n in gm.graph.nodes) == 4
    (reason,) = capture_info(gm).declined
    assert "not the BN's eval output for 0" in reason
    x = torch.randn(2, 4, 6, 6)
    assert _rel(gm(x), m(x)) < 1e-6


@pytest.mark.parametrize("groups", [1, 2])
def test_official_orepa_captures_with_symbolic_weights(groups):
    m = _randomized(OfficialOREPA(8, 8, groups=groups))
    gm = trace_model(m)
    assert any(n.op == "call_module" and n.target == "bn" for n in gm.graph.nodes)
    assert ("", "int() of a parameter-derived value") in capture_info(gm).used
    x = torch.randn(2, 8, 9, 9)
    assert _rel(gm(x), m(x)) < 1e-6
    with torch.no_grad():  # the generated kernel stays a function of the parameters
        m.weight_orepa_origin.mul_(2.0)
    assert _rel(gm(x), m(x)) < 1e-6


class _InputShapeArithmetic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(int(x.shape[0]), -1)


def test_input_shape_arithmetic_is_not_specialised():
    with pytest.raises(TraceError, match="depends on the model's inputs"):
        trace_model(_InputShapeArithmetic())


class _PlainFx(fx.Tracer):
    pass


class _CaptureFx(CaptureTracerMixin, fx.Tracer):
    pass


def _targets(graph: fx.Graph) -> list:
    return [(n.op, n.target) for n in graph.nodes]


def test_same_graph_as_plain_fx_where_plain_fx_traces():
    """Node for node the graph of plain fx, except that ``out += identity`` is the in-place
    ``operator.iadd`` (plain fx records ``out + identity`` and loses the write)."""
    m = torchvision.models.resnet18().eval()
    plain = _targets(_PlainFx().trace(m))
    captured = _targets(_CaptureFx().trace(m))
    assert [(op, operator.add if t is operator.iadd else t) for op, t in captured] == plain
    assert sum(t is operator.iadd for _, t in captured) == 8  # one per BasicBlock


def test_augmented_assignment_keeps_its_write():
    """``y = x; x += 1`` then reading ``y``: eager code sees the write, so must the graph."""

    class Alias(nn.Module):
        def forward(self, x):
            x = x.clone()
            y = x
            x += 1.0
            return y * 2

    m = Alias()
    gm = trace_model(m)
    x = torch.randn(3)
    assert torch.equal(gm(x), m(x))
    assert not torch.equal(fx.symbolic_trace(m)(x), m(x))  # what plain fx records


class _Child(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def test_shared_module_is_named_per_call_site():
    act = nn.SiLU()
    m = nn.Sequential(_Child(act), _Child(act))
    gm = trace_model(m)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["0.conv", "0.act", "1.conv", "1.act"]  # plain fx: "0.act" twice
    alone = [n.target for n in trace_model(m[1]).graph.nodes if n.op == "call_module"]
    assert alone == ["conv", "act"]


def test_identity_based_conv_captures_as_fconv_with_constant_weight():
    m = DBBIdentityConv1x1(6).eval()
    with torch.no_grad():
        m.weight.normal_()
    gm = trace_model(m)
    (conv,) = [n for n in gm.graph.nodes if n.target is F.conv2d]
    assert isinstance(conv.args[1], fx.Node) and conv.args[1].op == "call_function"
    x = torch.randn(2, 6, 5, 5)
    assert _rel(gm(x), m(x)) < 1e-6


# -- crop ------------------------------------------------------------------------------------


@given(st.lists(st.integers(-3, 3), min_size=4, max_size=4), st.integers(1, 3))
def test_crop_folds_to_its_forward(pads, channels):
    c = Crop(channels, 2, ((pads[0], pads[1]), (pads[2], pads[3]))).double()
    x = torch.randn(2, channels, 8, 9, dtype=torch.float64)
    assert torch.allclose(c.fold().apply(x), c(x))
    assert c.exactness().exact


def test_crop_then_zero_padding_conv_is_refused():
    from repcompiler import algebra as A

    conv = A.Conv(torch.randn(4, 4, 3, 3), padding=1)
    assert not (Crop(4, 2, ((-1, -1), (0, 0))) >> conv).exactness().exact
    assert (Crop(4, 2, ((-1, -1), (0, 0))) >> A.Conv(torch.randn(4, 4, 1, 3), padding=(0, 1))).exactness().exact


@pytest.mark.parametrize("key, want", [
    ((slice(None), slice(None), slice(1, -1), slice(None)), ((-1, -1), (0, 0))),
    ((Ellipsis, slice(2, None)), ((0, 0), (-2, 0))),
    ((slice(None), slice(None), slice(None, -3)), ((0, -3), (0, 0))),
    ((slice(None), slice(0, 2)), None),  # channel slice
    ((slice(None), slice(None), slice(1, 5)), None),  # window depends on the input size
    ((slice(None), slice(None), slice(None, None, 2)), None),  # strided
    (0, None),
])
def test_crop_of_index(key, want):
    assert crop_of_index(key, 2) == want


class _CropThenConv(nn.Module):
    def __init__(self, use_pad: bool) -> None:
        super().__init__()
        self.use_pad = use_pad
        self.square = nn.Conv2d(4, 6, 3, bias=False)
        self.hor = nn.Conv2d(4, 6, (1, 3), bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cropped = F.pad(x, [0, 0, -1, -1]) if self.use_pad else x[:, :, 1:-1, :]
        return self.bn(self.square(x) + self.hor(cropped))


@pytest.mark.parametrize("use_pad", [False, True])
def test_crop_branch_folds_into_one_conv(use_pad):
    m = _randomized(_CropThenConv(use_pad))
    x = torch.randn(2, 4, 10, 11)
    f = rc.fold(m, x)
    assert sum(isinstance(a, nn.Conv2d) for a in f.modules()) == 1
    assert _rel(f(x), m(x)) < 1e-5


def test_sync_batch_norm_folds_into_its_conv():
    m = _randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SyncBatchNorm(8), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    f = rc.fold(m, x)
    assert not any(isinstance(a, nn.modules.batchnorm._BatchNorm) for a in f.modules())
    assert _rel(f(x), m(x)) < 1e-5


# -- Linear / BatchNorm1d --------------------------------------------------------------------


class _Head(nn.Module):
    """BN1d -> Linear on flatten(1), and Linear -> BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm1d(12)
        self.fc0 = nn.Linear(12, 10)
        self.fc1 = nn.Linear(10, 7, bias=False)
        self.bn1 = nn.BatchNorm1d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.fc1(torch.relu(self.fc0(self.bn0(x.flatten(1))))))


class _LinearNormTokens(nn.Module):
    """LeViT's LinearNorm: BN1d over flattened tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _AmbiguousBN1d(nn.Module):
    """BN1d on (N, C, L) then a Linear on L == C: not a foldable pair."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def test_linear_bn_pairs_fold_without_shapes():
    m = _randomized(_Head())
    x = torch.randn(5, 3, 2, 2)
    f, done = linear_bn_folds(m)
    assert done == [("fc0", "bn0"), ("fc1", "bn1")]
    assert not any(isinstance(a, nn.BatchNorm1d) for a in f.modules())
    assert _rel(f(x), m(x)) < 1e-5
    assert any(isinstance(a, nn.BatchNorm1d) for a in m.modules())  # not in place


def test_linear_norm_tokens_fold_with_example_inputs_only():
    m = _randomized(_LinearNormTokens())
    x = torch.randn(2, 5, 8)
    assert linear_bn_folds(m)[1] == []  # rank unknown without shapes
    f, done = linear_bn_folds(m, x)
    assert done == [("linear", "bn")]
    assert _rel(f(x), m(x)) < 1e-5


def test_bn1d_on_three_d_input_is_not_folded():
    m = _randomized(_AmbiguousBN1d())
    x = torch.randn(3, 6, 6)
    for args in ((), (x,)):
        f, done = linear_bn_folds(m, *args)
        assert done == []
        assert _rel(f(x), m(x)) < 1e-6


# -- assert statements on input-dependent values ------------------------------------------------


def test_assert_statements_trace_as_torch_assert_and_the_block_folds() -> None:
    """An ``assert`` on an input-dependent value becomes a ``torch._assert`` node (with its
    message) instead of stopping the trace: the block folds to one conv, the outputs are
    equal, and the folded model still raises on an input the assertion rejects."""
    model = randomize_bn(nn.Sequential(AssertingRepVGG())).double().eval()
    gm = trace_model(model)
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert]
    assert [n.args[1] for n in asserts][0] == "expected NCHW" and len(asserts) == 2
    assert ("0", "assert on a value that depends on the inputs (recorded as torch._assert)") in capture_info(gm).used
    folded, report = rc.fold(model, return_report=True)
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 1, report
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-12
    for bad in (torch.randn(4, 7, 6, dtype=torch.float64), torch.randn(2, 3, 7, 6, dtype=torch.float64)):
        with pytest.raises((AssertionError, RuntimeError)):
            model(bad)
        with pytest.raises((AssertionError, RuntimeError)):
            folded(bad)


def test_an_assert_reading_a_value_inside_a_region_keeps_that_value() -> None:
    """The assertion reads the conv's output, which a conv+BN fold would remove: the fold
    is not made (the read is a use outside the region) and the output is unchanged."""
    model = randomize_bn(ShapeCheckBetweenConvAndBN()).double().eval()
    folded, report = rc.fold(model, return_report=True)
    assert isinstance(folded.bn, nn.BatchNorm2d) and not report.by_action("folded"), report
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) == 0.0


class _BranchOnRank(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # control flow on the input, not an assertion: still untraceable
            x = x.unsqueeze(0)
        return self.bn(self.conv(x))


def test_control_flow_on_the_input_still_stops_the_trace() -> None:
    with pytest.raises(TraceError, match="control flow"):
        trace_model(_BranchOnRank())

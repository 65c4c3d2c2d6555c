"""``linearize`` on real re-parameterizable models.

Per family: every multi-branch block becomes one online conv, the linearized model's
eval output with ``init="from_bn"`` equals the original's (randomized BN statistics,
relative 1e-5 in float32), and ``deploy`` of it equals the original too.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

import repcompiler as rc
from fixtures_thirdparty import ACNetBlock, DBBBlock, DBBBNAndPad, YoloConv, YoloRepConv
from repcompiler.capture.python import capture_info
from repcompiler.capture.tracing import trace_units
from repcompiler.online.conv import OnlineConv
from helpers import first_tensor, randomized_eval

pytestmark = pytest.mark.usefixtures("torch_single_thread")


_randomized = randomized_eval
_first = first_tensor


def _rel(got: Any, want: Any) -> float:
    got, want = _first(got), _first(want)
    return float((got - want).norm() / want.norm())


def _online(model: nn.Module) -> int:
    return sum(isinstance(m, OnlineConv) for m in model.modules())


def _linearize_and_deploy(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, rc.TransformReport]:
    """linearize(init="from_bn") (verified on ``x``), its eval output and its deploy
    compared with the original's; returns the linearized model and the report."""
    lin, report = rc.linearize(model, x, init="from_bn", return_report=True)
    with torch.no_grad():
        want = model(x)
        assert _rel(lin.eval()(x), want) < 1e-5
        assert _rel(rc.deploy(lin, x)(x), want) < 1e-5
    return lin, report


FIXTURES: dict[str, tuple[Callable[[], nn.Module], int, type]] = {
    # the official DBB code: BN-and-pad layers (captured as "zero pad, then the BN's
    # affine", exact once the BN is a scale) and the identity-based 1x1 (traced into)
    "dbb": (lambda: nn.Sequential(DBBBlock(8, 8), nn.ReLU(), DBBBlock(8, 16, stride=2)), 8, DBBBlock),
    "dbb_depthwise": (lambda: nn.Sequential(DBBBlock(8, 8, groups=8), nn.ReLU(), DBBBlock(8, 8, groups=8)), 8,
                      DBBBlock),
    "acnet": (lambda: nn.Sequential(ACNetBlock(8, 8), nn.ReLU(), ACNetBlock(8, 8, k=5, padding=2)), 8, ACNetBlock),
    "acnet_cropped": (lambda: nn.Sequential(ACNetBlock(8, 8, padding=0), nn.ReLU(),
                                            ACNetBlock(8, 8, k=5, padding=1)), 8, ACNetBlock),
    "ultralytics_like": (lambda: nn.Sequential(YoloConv(3, 8, 3), YoloRepConv(8, 8), YoloRepConv(8, 8, bn=True),
                                               YoloConv(8, 8, 1)), 3, YoloRepConv),
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixture_family_linearizes_every_block(name):
    make, cin, block = FIXTURES[name]
    torch.manual_seed(0)
    model = _randomized(make())
    lin, report = _linearize_and_deploy(model, torch.randn(2, cin, 16, 16))
    blocks = sum(isinstance(m, block) for m in model.modules())
    assert _online(lin) == blocks == len(report.by_action("linearized"))
    assert not report.by_action("refused")


def _ghostnetv3_block() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return _randomized(timm.create_model("ghostnetv3_050", pretrained=False).blocks[1][0])


def test_ghostnetv3_identity_activation_does_not_crash():
    """Item 6: timm's ``GhostBottleneckV3`` (identity primary activation in its second
    ghost module) crashed with "Argument 'primary_activation' ... was used before it
    has been defined": the maximal region over the depthwise block and the next
    ghost module's primary branches (refused for fold: it would grow the kernel) was
    linearized as well as the sub-regions inside it."""
    model = _ghostnetv3_block()
    lin, report = _linearize_and_deploy(model, torch.randn(2, 8, 16, 16))
    # the depthwise block and both ghost modules' primary and cheap branch sums
    assert _online(lin) == len(report.by_action("linearized")) == 5
    assert not report.by_action("refused")
    kept = report.by_action("kept")  # the maximal regions around the blocks: reason and what was done
    assert kept and all(("bigger" in e.reason or "zero-pads" in e.reason) and "linearized on their own" in e.reason
                        for e in kept), [e.reason for e in kept]


def _timm(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return _randomized(timm.create_model(name, pretrained=False))


# family -> (input size, the author's block class counted as "one block", blocks)
TIMM = {
    "repvgg_a0": (32, "RepVggBlock"),
    "mobileone_s0": (32, "MobileOneBlock"),
    "repvit_m1": (32, "RepVggDw"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_family_linearizes_every_block(name):
    """Item 9 (item 7 for RepViT: the first block's maximal region, which reaches into
    the stem, is refused, the block inside it is linearized on its own)."""
    model = _timm(name)
    size, block = TIMM[name]
    lin, report = _linearize_and_deploy(model, torch.randn(1, 3, size, size))
    blocks = sum(type(m).__name__ == block for m in model.modules())
    assert not report.by_action("refused"), [(e.name, e.reason) for e in report.by_action("refused")]
    assert len(report.by_action("linearized")) == blocks > 0


@pytest.mark.parametrize("groups", [1, 8])
def test_dbb_linearizes_to_one_online_conv_per_block_float64(groups):
    """Every DBB block becomes one online conv; eval output equal to the
    original with ``init="from_bn"`` and ``deploy`` equal to the linearized model
    (float64); in training mode one conv runs per block and the gradient reaches every
    branch parameter, the identity-based 1x1's weight and the BN-and-pad's scale
    included (they stay live in the expression, not snapshots)."""
    torch.manual_seed(0)
    model = _randomized(nn.Sequential(DBBBlock(8, 8, groups=groups), nn.ReLU(),
                                      DBBBlock(8, 8, groups=groups, stride=2)).double())
    x = torch.randn(2, 8, 13, 13, dtype=torch.float64)
    lin, report = rc.linearize(model, x, init="from_bn", return_report=True)
    assert _online(lin) == len(report.by_action("linearized")) == 2 and not report.by_action("refused")
    with torch.no_grad():
        want = model(x)
        got = lin.eval()(x)
        assert _rel(got, want) < 1e-12
        assert _rel(rc.deploy(lin)(x), got) < 1e-12
    lin.train()
    lin(x).square().sum().backward()
    names = [n for n, p in lin.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not names, names
    if groups == 1:  # the identity-based 1x1 is traced into: part of the block, its weight trains
        assert lin[0].dbb_1x1_kxk.idconv1.weight.grad is not None
        convs = {c for e in report.by_action("linearized") for c in e.details["convs"]}
        assert {"0.dbb_1x1_kxk.idconv1", "2.dbb_1x1_kxk.idconv1"} <= convs
        _, rep = rc.orepa_transform(model, return_report=True)
        assert len(rep.by_action("linearized")) == 2 and not rep.by_action("transformed")
        assert not rep.by_action("refused"), [(e.name, e.reason) for e in rep.by_action("refused")]


def test_dbb_bn_and_pad_in_training_mode_only_when_its_bn_becomes_a_scale():
    """The BN-and-pad layer of a training-mode BN is rewritten only when the tracer is
    told the BNs become affines (linearize), checked with the BN in eval mode (its
    running statistics untouched); fold's capture (eval mode) is unchanged."""
    block = DBBBlock(8, 8, groups=8)
    _randomized(block).train()
    stats = {k: v.clone() for k, v in block.state_dict().items()}
    plain = capture_info(trace_units(block).units[0].gm)
    assert plain.rewrites == [] and plain.scaled_bns == []
    scaled = capture_info(trace_units(block, bns_become_scales=True).units[0].gm)
    assert len(scaled.rewrites) == 1 and scaled.scaled_bns == ["dbb_1x1_kxk.bn1.bn"]
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in stats.items())
    block.eval()
    evaluated = capture_info(trace_units(block).units[0].gm)
    assert len(evaluated.rewrites) == 1 and evaluated.scaled_bns == []


class _BlockThenBNAndPad(nn.Module):
    """A RepVGG-like sum and, in the same forward, a BN-and-pad layer outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.pad = DBBBNAndPad(1, 8)

    def forward(self, x):
        return self.pad(torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def test_bn_and_pad_outside_a_block_keeps_its_owner():
    """Rewriting this forward would install the BN-and-pad layer in its affine form
    around a BN that stays a BN (not the original in training mode): the owner is left
    as it is, and the report says why."""
    model = _randomized(_BlockThenBNAndPad())
    lin, report = rc.linearize(model, init="from_bn", return_report=True)
    assert _online(lin) == 0 and not report.by_action("linearized")
    assert any("pad.bn" in n and "stays a BN" not in n and "not in a block linearized here" in n
               for n in report.notes), report.notes
    assert type(lin) is _BlockThenBNAndPad

"""``linearize`` on real re-parameterizable models (issue 15, items 6, 7 and 9).

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
from fixtures_thirdparty import ACNetBlock, YoloConv, YoloRepConv
from repcompiler.online import OnlineConv
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

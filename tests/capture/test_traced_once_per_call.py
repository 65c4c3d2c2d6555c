"""One capture per call: ``orepa_transform`` and ``fold`` trace each unit once.

``trace_units`` and ``find_regions`` are wrapped with counters wherever a library module
holds a reference to them, so a new module that re-traces or re-analyses is caught:
each entry point must call ``trace_units`` once and ``find_regions`` once per traced unit
(each unit's graph analysed once). The outputs and reports are checked too. And the
eligibility of a conv for a block comes from the rule registry (one place decides).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import repcompiler as rc
from fixtures_blocks import RepVGGBlock
from helpers import randomize_bn, rel_err
from repcompiler.online.conv import OnlineConv
from repcompiler.explain.opaque import conv_reason, opaque_reasons

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counters for ``trace_units`` calls and ``find_regions`` calls per graph."""
    seen: dict[str, Any] = {"trace_units": 0, "units": [], "find_regions": Counter()}
    # by sys.modules: ``repcompiler.fold`` the attribute is the function, not the module
    orig_tu = sys.modules["repcompiler.capture.tracing"].trace_units
    orig_fr = sys.modules["repcompiler.passes.find_regions"].find_regions

    def trace_units(*args: Any, **kwargs: Any) -> Any:
        seen["trace_units"] += 1
        res = orig_tu(*args, **kwargs)
        seen["units"] += [u.path for u in res.units]
        return res

    def find_regions(gm: Any, *args: Any, **kwargs: Any) -> Any:
        seen["find_regions"][id(gm)] += 1
        return orig_fr(gm, *args, **kwargs)

    for name, mod in list(sys.modules.items()):
        if name.startswith("repcompiler") and mod is not None:
            if getattr(mod, "trace_units", None) is orig_tu:
                monkeypatch.setattr(mod, "trace_units", trace_units)
            if getattr(mod, "find_regions", None) is orig_fr:
                monkeypatch.setattr(mod, "find_regions", find_regions)
    return seen


def _once_per_unit(seen: dict[str, Any]) -> None:
    assert seen["trace_units"] == 1, seen
    assert len(seen["find_regions"]) == len(seen["units"]) > 0, seen
    assert set(seen["find_regions"].values()) == {1}, seen


def test_transform_resnet18_traces_once(counted: dict[str, Any]) -> None:
    model = torchvision.models.resnet18()
    out, rep = rc.orepa_transform(model, return_report=True)
    _once_per_unit(counted)
    assert counted["units"] == [""]
    # the report as the paper policy gives it: every kxk and bottleneck conv transformed
    # with its existing BN as the post-BN, the 1x1 projections kept
    kept = {e.name for e in rep.by_action("kept")}
    assert kept == {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}
    done = rep.by_action("transformed")
    assert len(done) == 17 and not rep.by_action("refused")
    assert all(e.details["post_bn"] == e.name.replace("conv", "bn") + " (existing)" for e in done)
    assert {e.details["block"] for e in done} == {"orepa", "orepa_large"}
    assert [e.name for e in done if e.details["block"] == "orepa_large"] == ["conv1"]
    with torch.no_grad():
        assert out.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


class _RepVGGWithPlain(nn.Module):
    """A plain conv -> BN stem, two RepVGG blocks, a plain conv -> BN head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2))
        self.head = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.head_bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_bn(self.head(self.blocks(torch.relu(self.stem_bn(self.stem(x))))))


def test_transform_repvgg_blocks_and_plain_convs_trace_once(counted: dict[str, Any]) -> None:
    model = randomize_bn(_RepVGGWithPlain().double()).eval()
    out, rep = rc.orepa_transform(model, init="from_conv", return_report=True)
    _once_per_unit(counted)
    lin = rep.by_action("linearized")
    assert sorted(e.name.split(".rbr")[0] for e in lin) == ["blocks.0", "blocks.1"]
    done = {e.name: e for e in rep.by_action("transformed")}
    assert set(done) == {"stem", "head"}  # the blocks' convs are not wrapped one by one
    assert done["stem"].details["post_bn"] == "stem_bn (existing)"
    assert done["head"].details["post_bn"] == "head_bn (existing)"
    assert sum(isinstance(m, OnlineConv) for m in out.modules()) == 4
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():  # from_conv / from_bn: the eval output is unchanged
        assert rel_err(out.eval()(x), model(x)) < 1e-10


class _HeadNet(nn.Module):
    """conv -> BN (folds), ReLU -> BN (left), pooled, Linear -> BN1d (folded by the pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn_left = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.fc_bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_left(torch.relu(self.bn(self.conv(x))))
        return self.fc_bn(self.fc(torch.flatten(y.mean((2, 3), keepdim=True), 1)))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_fold_traces_once(counted: dict[str, Any], with_inputs: bool) -> None:
    model = randomize_bn(_HeadNet().double()).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded, rep = rc.fold(model, x if with_inputs else None, return_report=True)
    _once_per_unit(counted)
    rows = {e.name: (e.action, e.reason) for e in rep.entries}
    assert rows["fc -> fc_bn"] == ("folded", "BatchNorm1d folded into the Linear")
    assert rows["bn_left"] == ("left", "no exact fold removes it: its input is relu, which has no lowering rule "
                                  "(opaque); its output goes to mean")
    assert isinstance(folded.fc_bn, nn.Identity) and isinstance(folded.bn, nn.Identity)
    assert isinstance(folded.bn_left, nn.BatchNorm2d)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-12


class _Inner(nn.Module):
    """A conv/BN branch sum (folds, in this module's forward) read by a BN that cannot
    join it (the sum is also used elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.after = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_a(self.a(x)) + self.bn_b(self.b(x))
        return self.after(y) + torch.relu(y)


def test_left_bn_reasons_name_the_folded_modules() -> None:
    """A BN after a region folded inside a nested owner (whose forward is rewritten):
    its row names the module that now computes the region, as in the folded model,
    though it is read from the fold's own graphs; a fold of the folded model (traced
    anew) gives the same rows."""
    model = randomize_bn(nn.Sequential(_Inner(), nn.ReLU(), _Inner())).eval()
    folded, rep = rc.fold(model, return_report=True)
    assert len(rep.by_action("folded")) == 2
    left = {e.name: e.reason for e in rep.by_action("left")}
    assert set(left) == {"0.after", "2.after"}
    assert left["0.after"].startswith("no exact fold removes it: its input is 0.a (Conv2d); its output goes to add")
    retraced = rc.fold(folded, return_report=True)[1]
    assert {e.name: e.reason for e in retraced.by_action("left")} == left


class _WSConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_transform_refusals_come_from_the_rule_registry() -> None:
    """The transform refuses a conv with the registry's reason (``conv_reason``), the
    reason fold's opaque rows give for the same conv; block-only reasons on top."""
    hooked = nn.Conv2d(4, 4, 3, padding=1)
    hooked.register_forward_hook(lambda m, i, o: o)
    sn = nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, 3, padding=1))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), _WSConv(4, 4, 3, padding=1),
                          hooked, nn.ConvTranspose2d(4, 4, 1), sn, nn.Conv2d(4, 4, 3, padding=1))
    _, rep = rc.orepa_transform(model, return_report=True)
    refused = {e.name: e.reason for e in rep.by_action("refused")}
    assert set(refused) == {"0", "1", "2", "3", "4"}
    for name, why in refused.items():
        assert why == conv_reason(model[int(name)], block=True)
    opaque = dict(opaque_reasons(model))
    assert {n: opaque[n] for n in ("0", "1", "2")} == {n: conv_reason(model[int(n)]) for n in ("0", "1", "2")}
    assert "reflect" in refused["0"] and "_WSConv overrides forward()" in refused["1"]
    assert "forward hooks" in refused["2"] and "transposed" in refused["3"] and "parametrized weight" in refused["4"]
    assert conv_reason(sn) is None  # fold reads a parametrized weight at its current value
    assert conv_reason(model[5]) is None and conv_reason(model[5], block=True) is None

"""Real re-parameterizable models as their authors wrote them.

Per family: ``rc.fold`` output equals the original (eval mode, randomized BN
statistics, relative 1e-5 in float32) and runs no more convolutions and no more
BatchNorms than the author's own conversion (``switch_to_deploy`` / ``fuse`` /
timm's ``reparameterize_model``). Counts are of ops **executed** in one forward
(``F.conv*d`` and ``F.batch_norm`` calls), so a generated-kernel block such as the
official OREPA one counts as the one conv it runs.

Every family folds as far as its author's conversion: leaves whose rule declines
(DBB's identity-based 1x1, timm's ``BatchNormAct2d``) are traced into, and BN1d heads
are folded by :mod:`repcompiler.passes.fold_linear_bn`, which ``fold`` runs.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import repcompiler as rc
from fixtures_thirdparty import ACNetBlock, DBBBlock, InPlaceParent, OfficialOREPA, YoloConv, YoloRepConv
from helpers import first_tensor, linear_bn_folds, randomized_eval

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_BNS = {F.batch_norm, torch.batch_norm}



class _CountOps(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.convs = 0
        self.bns = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _CONVS:
            self.convs += 1
        elif func in _BNS:
            self.bns += 1
        return func(*args, **(kwargs or {}))


def executed(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """``(convolutions, batch norms)`` run by one forward of ``model`` on ``x``."""
    counter = _CountOps()
    with torch.no_grad(), counter:
        model(x)
    return counter.convs, counter.bns


_randomized = randomized_eval
_first = first_tensor


def _check(model: nn.Module, x: torch.Tensor, folded: nn.Module, author: tuple[int, int]) -> None:
    with torch.no_grad():
        want, got = _first(model(x)), _first(folded(x))
    err = float((got - want).norm() / want.norm())
    assert err < 1e-5, f"fold differs from the original by relative {err:.3g}"
    convs, bns = executed(folded, x)
    assert convs <= author[0] and bns <= author[1], (
        f"fold runs {convs} convs / {bns} BNs, the author's conversion {author[0]} / {author[1]}")


# -- fixtures written as the authors wrote them ----------------------------------------------


def _author_one_conv_per_block(blocks: int) -> Callable[[nn.Module, torch.Tensor], tuple[int, int]]:
    """DBB's and ACNet's ``switch_to_deploy`` leave one conv (with bias) per block and no
    BN (not re-implemented in the fixtures)."""
    return lambda model, x: (blocks, 0)


def _author_switch_to_deploy(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    deployed = copy.deepcopy(model)
    for m in deployed.modules():
        if hasattr(m, "switch_to_deploy"):
            m.switch_to_deploy()
    with torch.no_grad():
        assert float((_first(deployed(x)) - _first(model(x))).norm() / _first(model(x)).norm()) < 1e-5
    return executed(deployed, x)


def _author_yolo_fuse(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """ultralytics' ``fuse``: Conv -> conv with the BN folded in; RepConv -> one conv."""
    n_conv = sum(isinstance(m, YoloConv) for m in model.modules()
                 if not any(m is c for r in model.modules() if isinstance(r, YoloRepConv) for c in r.children()))
    n_rep = sum(isinstance(m, YoloRepConv) for m in model.modules())
    return n_conv + n_rep, 0


FIXTURES: dict[str, tuple[Callable[[], nn.Module], int, Callable[..., tuple[int, int]], Any]] = {
    "dbb": (lambda: nn.Sequential(DBBBlock(8, 8), nn.ReLU(), DBBBlock(8, 16, stride=2)), 8,
            _author_one_conv_per_block(2), None),
    "dbb_depthwise": (lambda: nn.Sequential(DBBBlock(8, 8, groups=8), nn.ReLU(), DBBBlock(8, 8, groups=8)), 8,
                      _author_one_conv_per_block(2), None),
    "acnet": (lambda: nn.Sequential(ACNetBlock(8, 8), nn.ReLU(), ACNetBlock(8, 8, k=5, padding=2)), 8,
              _author_one_conv_per_block(2), None),
    "acnet_cropped": (lambda: nn.Sequential(ACNetBlock(8, 8, padding=0), nn.ReLU(), ACNetBlock(8, 8, k=5, padding=1)),
                      8, _author_one_conv_per_block(2), None),
    "orepa_official": (lambda: nn.Sequential(OfficialOREPA(8, 8), nn.ReLU(), OfficialOREPA(8, 16, groups=2)), 8,
                       _author_switch_to_deploy, None),
    "ultralytics_like": (lambda: nn.Sequential(YoloConv(3, 8, 3), YoloRepConv(8, 8), YoloRepConv(8, 8, bn=True),
                                               YoloConv(8, 8, 1)), 3, _author_yolo_fuse, None),
}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=spec[3]) if spec[3] is not None else n for n, spec in FIXTURES.items()
])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_fixture_family_folds_like_the_author(name, with_inputs):
    make, cin, author, _ = FIXTURES[name]
    torch.manual_seed(0)
    model = _randomized(make())
    x = torch.randn(2, cin, 16, 16)
    folded = rc.fold(model, x if with_inputs else None)
    _check(model, x, folded, author(model, x))


@pytest.mark.parametrize("make", [lambda: InPlaceParent(8), lambda: DBBBlock(8, 8)], ids=["inplace_parent", "dbb"])
def test_no_false_verification_error_on_in_place_accumulation(make):
    """Item 5: a parent's ``out += branch(x)`` must not change what fold compares a
    folded unit against (fold stored the unit's output without copying it)."""
    torch.manual_seed(0)
    model = _randomized(make())
    x = torch.randn(2, 8, 12, 12)
    folded = rc.fold(model, x)  # raised VerificationError (relative ~0.9) before the fix
    with torch.no_grad():
        assert float((folded(x) - model(x)).norm() / model(x).norm()) < 1e-5


def test_shared_activation_does_not_block_owner_rewrite():
    """Item 4: ultralytics' class-level activation sits under every block; RepConv's
    branch sum must still fold (was "traces differently alone")."""
    torch.manual_seed(0)
    inner = nn.Sequential(YoloRepConv(8, 8), YoloRepConv(8, 8), YoloRepConv(8, 8))
    model = _randomized(nn.Sequential(YoloConv(3, 8, 3), inner, YoloConv(8, 8, 1)))
    x = torch.randn(2, 3, 16, 16)
    folded, report = rc.fold(model, x, return_report=True)
    assert not report.by_action("refused"), [e.reason for e in report.by_action("refused")]
    _check(model, x, folded, _author_yolo_fuse(model, x))


# -- timm ---------------------------------------------------------------------------------------


def _timm(name: str) -> tuple[nn.Module, nn.Module]:
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = _randomized(timm.create_model(name, pretrained=False))
    return model, reparameterize_model(copy.deepcopy(model)).eval()


TIMM = {
    "repvgg_a0": (64, None),
    "mobileone_s0": (64, None),
    "fastvit_t8": (64, None),
    "repvit_m1": (64, None),
    "levit_128s": (224, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_family_folds_like_reparameterize_model(name):
    model, author = _timm(name)
    x = torch.randn(1, 3, TIMM[name][0], TIMM[name][0])
    folded = rc.fold(model, x)
    _check(model, x, folded, executed(author, x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["repvit_m1", "levit_128s"])
def test_fold_reports_its_linear_bn_folds(name):
    """fold runs :class:`repcompiler.passes.fold_linear_bn.FoldLinearBN` (BN1d heads and token layers),
    lists each pair in its report, and nothing is left for a second run."""
    model, _ = _timm(name)
    x = torch.randn(1, 3, TIMM[name][0], TIMM[name][0])
    folded, report = rc.fold(model, x, return_report=True)
    assert [e for e in report.entries if e.kind == "linear" and e.action == "folded"]
    assert linear_bn_folds(folded, x)[1] == []


# -- ultralytics (built from the YAML shipped in the package, random weights) ------------------


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolov9t.yaml", "rtdetr-l.yaml"])
def test_ultralytics_folds_like_fuse(cfg):
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    cls = tasks.RTDETRDetectionModel if cfg.startswith("rtdetr") else tasks.DetectionModel
    torch.manual_seed(0)
    model = _randomized(cls(cfg, verbose=False))
    x = torch.randn(1, 3, 64, 64)
    author = copy.deepcopy(model).fuse(verbose=False)
    folded, report = rc.fold(model, x, return_report=True)
    assert not any("traces differently alone" in e.reason for e in report.entries)
    _check(model, x, folded, executed(author, x))


class _Flip(nn.Module):
    def forward(self, x):
        return x.flip(-1)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on data: does not trace
            y = y * 1.0
        return self.bn(y)


def test_every_batch_norm_left_is_reported_with_its_reason():
    """Item 8: a BN no exact fold can remove gets a report row naming why (what is on
    each side of it, or the trace failure of the module holding it)."""
    torch.manual_seed(0)
    traced = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), _Flip(), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    folded, report = rc.fold(traced, torch.randn(1, 3, 8, 8), return_report=True)
    left = {e.name: e.reason for e in report.by_action("left")}
    assert set(left) == {"2"}, report  # the last BN folded into its conv
    assert "input is flip" in left["2"] and "output goes to 3 (ReLU)" in left["2"]
    # BN 4 would put its shift under conv 5's zero padding: the refused region's row says so
    assert any(e.name.startswith("4 -> 5") and "padding" in e.reason for e in report.by_action("refused")), report
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 2

    untraced = _randomized(nn.Sequential(nn.Conv2d(4, 4, 1), _DataDependent()))
    folded, report = rc.fold(untraced, torch.randn(1, 4, 8, 8), return_report=True)
    left = {e.name: e.reason for e in report.by_action("left")}
    assert list(left) == ["1.bn"] and "inside 1, which did not trace" in left["1.bn"], report


_REPORT_ORDER_SCRIPT = """
import torch, timm, repcompiler as rc
m = timm.create_model("repvgg_a0", pretrained=False).eval()
_, rep = rc.fold(m, torch.randn(1, 3, 32, 32), return_report=True, verify=False)
print("\\n".join(f"{e.name}|{e.action}" for e in rep.entries))
"""


def test_fold_report_order_is_deterministic() -> None:
    """The report lists regions in graph order whatever Python's string hashing: owners
    of equal depth (timm's ``stages.0.0``, ``stages.1.0``...) were once ordered as a set."""
    import os
    import subprocess
    import sys

    pytest.importorskip("timm")
    procs = [subprocess.Popen([sys.executable, "-c", _REPORT_ORDER_SCRIPT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONHASHSEED=seed))
             for seed in ("1", "2")]  # both hash seeds at once: the two interpreters run side by side
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        outs.append(stdout)
    assert outs[0] == outs[1] and outs[0].count("\n") > 10

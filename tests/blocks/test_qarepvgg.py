"""The ``qarepvgg`` block (QARepVGG): its topology (BN only on the kxk branch, none on
the 1x1 and identity, one post-BN), every property of ``check_block`` on hypothesis
geometries, and the transform -> train -> deploy path against the unfolded model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler.blocks import BlockConfig, Branch, ConvGeometry, build_block
from repcompiler.errors import RegistrationError
from repcompiler.testing import check_block

from helpers import randomize_bn, rel_err

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _geom(cin: int, cout: int, k: int = 3, s: int = 1) -> ConvGeometry:
    return ConvGeometry(cin, cout, (k, k), (s, s), ((k // 2, k // 2),) * 2, (1, 1))


def _bns(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_topology_bn_only_on_kxk():
    off = build_block("qarepvgg", _geom(8, 8), mode="offline")
    assert list(off.branches) == ["kxk", "pointwise", "identity"]
    assert [b.end for b in off.branches.values()] == ["bn", "none", "none"]
    assert _bns(off) == 1  # repvgg has 3
    assert _bns(build_block("repvgg", _geom(8, 8), mode="offline")) == 3
    on = build_block("qarepvgg", _geom(8, 8))
    assert [b.end for b in on.branches.values()] == ["scale", "none", "none"]
    assert sorted(n for n, _ in on.named_parameters()) == ["kxk.scale", "kxk.weight", "pointwise.weight"]
    # no identity where in != out or strided; a 1x1 conv is not eligible
    assert list(build_block("qarepvgg", _geom(8, 16)).branches) == ["kxk", "pointwise"]
    assert list(build_block("qarepvgg", _geom(8, 8, s=2)).branches) == ["kxk", "pointwise"]
    with pytest.raises(rc.UnsupportedError, match="kernel larger than 1"):
        build_block("qarepvgg", _geom(8, 8, k=1))


def test_check_block_on_qarepvgg():
    res = check_block("qarepvgg", max_examples=20, derandomize=True, deploy_examples=4)
    assert res.accepted >= 10
    for prop in ("exact fold", "online == unfolded (eval)", "deployed conv == unfolded (eval)",
                 "deploy() == block (eval)", "gradients online == unfolded (train)"):
        assert prop in res.properties


def test_branch_end_option_is_checked():
    with pytest.raises(RegistrationError, match="end must be one of"):
        BlockConfig("t_bad_end").branch(Branch.conv(), end="bn")
    cfg = BlockConfig.from_dict({"name": "t_dict_end", "branches": ["kxk", {"branch": "1x1", "end": "none"}]})
    expr = cfg.build(_geom(4, 4), mode="offline")
    assert [b.end for b in expr.branches.values()] == ["bn", "none"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # no BN follows: one is inserted
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_transform_train_deploy(mode):
    torch.manual_seed(0)
    model = _Net().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t, report = rc.orepa_transform(model, block="qarepvgg", mode=mode, return_report=True)
    assert all(v.equal(model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    assert [e.details["block"] for e in report.by_action("transformed")] == ["qarepvgg"] * 3
    assert [e.details["post_bn"] for e in report.by_action("transformed")][1] == "inserted"
    opt = torch.optim.SGD(t.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # a few steps so every branch and BN has moved
        loss = t(torch.randn(8, 3, 12, 12, dtype=torch.float64)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    randomize_bn(t, 1)
    t.eval()
    dep = rc.deploy(t)
    assert sum(isinstance(m, nn.Conv2d) for m in dep.modules()) == 3
    assert _bns(dep) == 0
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(dep(x), t(x)) < 1e-10


def test_from_conv_is_refused_not_silently_reinitialised():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="no eligible conv"):
        _, report = rc.orepa_transform(model, block="qarepvgg", init="from_conv", return_report=True)
    (entry,) = report.entries
    assert entry.action == "refused" and "start at zero" in entry.reason

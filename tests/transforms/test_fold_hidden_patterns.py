"""Patterns real model code uses that could hide exact folds from ``fold``.

* a BN after a Linear applied channels-last (``fc`` on NHWC, ``permute`` back,
  ``BatchNorm2d``; ``fc`` on tokens, ``transpose(1, 2)``, ``BatchNorm1d``): folded into
  the Linear; a permute that does not bring the Linear's features to dim 1, or whose
  value is read elsewhere too, is not;
* a conv subclass whose ``forward`` computes its kernel from a plain tensor attribute
  (DBB's ``IdentityBasedConv1x1``): traced into, folded into its block's conv and
  removed, so a DBB ResNet keeps one conv per block;
* iteration over a traced shape (``for s in x.size()``): the module doing it stays an
  opaque call, its parent traces around it and its children are folded on their own;
* submodules the eval forward never runs (GoogLeNet's auxiliary heads): traced and
  folded on their own, with a report note.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import repcompiler as rc
from fixtures_thirdparty import DBBBlock
from helpers import randomize_bn, rel_err

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_BN = nn.modules.batchnorm._BatchNorm


def _bns(m: nn.Module) -> list[str]:
    return [n for n, x in m.named_modules() if isinstance(x, _BN)]


def _check(model: nn.Module, x: torch.Tensor, with_inputs: bool) -> tuple[nn.Module, rc.FoldReport]:
    folded, report = rc.fold(model, x if with_inputs else None, return_report=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-9, report
    return folded, report


# -- Linear applied channels-last -----------------------------------------------------------


class ChannelsLastMLP(nn.Module):
    """A token-mixer MLP written channels-last: conv stem, Linear on NHWC, permute back, BN2d."""

    def __init__(self, permute=(0, 3, 1, 2), c: int = 6) -> None:
        super().__init__()
        self.permute = permute
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.stem(x).permute(0, 2, 3, 1)).permute(*self.permute)
        return self.bn(y) * torch.sigmoid(x.mean())


class TokenLinearBN1d(nn.Module):
    """``BatchNorm1d`` over tokens after a Linear (LeViT / MLP-Mixer style)."""

    def __init__(self, how: str = "transpose") -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        y = self.fc(t)
        y = y.transpose(1, 2) if self.how == "transpose" else y.permute(0, 2, 1) if self.how == "permute" \
            else y.movedim(-1, 1)
        return torch.relu(self.bn(y)).transpose(1, 2)


class PermutedAlsoReadElsewhere(ChannelsLastMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.bn(y) + y  # the BN input is read twice: folding would change the second read


@pytest.mark.parametrize("with_inputs", [False, True])
@pytest.mark.parametrize("model,shape", [
    (lambda: ChannelsLastMLP(), (2, 3, 6, 5)),
    (lambda: TokenLinearBN1d("transpose"), (2, 7, 8)),
    (lambda: TokenLinearBN1d("permute"), (2, 7, 8)),
    (lambda: TokenLinearBN1d("movedim"), (2, 7, 8)),
], ids=["nhwc-bn2d", "tokens-transpose", "tokens-permute", "tokens-movedim"])
def test_bn_after_a_channels_last_linear_folds_into_it(model, shape, with_inputs: bool) -> None:
    m = randomize_bn(model().double(), 0).eval()
    folded, report = _check(m, torch.randn(*shape, dtype=torch.float64), with_inputs)
    assert not _bns(folded), report
    assert any(e.action == "folded" and e.name == "fc -> bn" for e in report.entries), report


@pytest.mark.parametrize("model", [lambda: ChannelsLastMLP(permute=(0, 2, 1, 3), c=6),
                                   lambda: PermutedAlsoReadElsewhere()], ids=["wrong-permute", "read-twice"])
def test_bn_after_a_linear_that_cannot_fold_stays_with_a_reason(model) -> None:
    m = randomize_bn(model().double(), 0).eval()
    folded, report = _check(m, torch.randn(2, 3, 6, 6, dtype=torch.float64), True)
    assert _bns(folded) == ["bn"]
    assert [e.action for e in report.entries if e.name == "bn"] == ["left"], report


# -- DBB's identity-based 1x1 (a computed kernel from a plain attribute) ---------------------


class DBBBasicBlock(nn.Module):
    """A ResNet basic block built from DBB blocks, as the official DBB ResNet builds it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = DBBBlock(cin, cout, 3, stride, 1)
        self.conv1.nonlinear = nn.ReLU()
        self.conv2 = DBBBlock(cout, cout, 3, 1, 1)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else DBBBlock(cin, cout, 1, stride, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class DBBResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = DBBBlock(3, 8, 3, 2, 1)
        self.stem.nonlinear = nn.ReLU()
        self.layer1 = nn.Sequential(DBBBasicBlock(8, 8, 1), DBBBasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(DBBBasicBlock(8, 16, 2), DBBBasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_dbb_resnet_folds_to_one_conv_per_block(with_inputs: bool) -> None:
    torch.manual_seed(0)
    m = randomize_bn(DBBResNet().double(), 0).eval()
    with torch.no_grad():  # the identity-based 1x1s start at zero: make them count
        for name, p in m.named_parameters():
            if "idconv1" in name:
                p.normal_(0, 0.1)
    blocks = sum(isinstance(x, DBBBlock) for x in m.modules())
    folded, report = _check(m, torch.randn(2, 3, 16, 16, dtype=torch.float64), with_inputs)
    assert rc.explain.count_convs(folded) == blocks, report
    assert not _bns(folded)
    assert not [n for n, x in folded.named_modules() if "idconv1" in n and not isinstance(x, nn.Identity)]
    assert not [e for e in report.entries if e.action not in ("folded",)], report


# -- iteration over a traced shape ------------------------------------------------------------


class IteratesShape(nn.Module):
    """Iterates over its input's shape (no unpacking: plain fx raises) and holds conv -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 1
        for s in x.size():
            n = n * s
        return self.proj(x) * (1.0 + 0.0 * n)


class ShapeLoopNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = IteratesShape()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.block(self.bn(self.conv(x)))))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_iteration_over_a_shape_is_captured_at_the_smallest_failing_module(with_inputs: bool) -> None:
    m = randomize_bn(ShapeLoopNet().double(), 0).eval()
    folded, report = _check(m, torch.randn(2, 3, 8, 8, dtype=torch.float64), with_inputs)
    assert not _bns(folded), report
    skipped = dict(report.skipped)
    assert list(skipped) == ["block"] and "iterated" in skipped["block"] and "opaque" in skipped["block"]
    folded_names = {e.name for e in report.entries if e.action == "folded"}
    assert {"conv -> bn", "conv2 -> bn2", "block.proj.0 -> block.proj.1"} <= folded_names, report


# -- modules the eval forward does not run ----------------------------------------------------


def test_googlenet_aux_heads_are_folded_on_their_own() -> None:
    torch.manual_seed(0)
    m = randomize_bn(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False), 0).eval()
    folded, report = rc.fold(m, return_report=True)
    assert not _bns(folded), report  # no conv -> BN pair left, explained or not
    assert {n.split(":")[0] for n in report.notes} >= {"aux1", "aux2"}
    assert all("not executed" in n for n in report.notes if n.startswith("aux"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(folded(x), m(x)) < 1e-5
        feats = torch.randn(2, 512, 14, 14)
        assert rel_err(folded.aux1(feats), m.aux1(feats)) < 1e-5


def test_googlenet_aux_convs_keep_their_bn_in_orepa_transform() -> None:
    """The aux heads' convs are not called by the eval forward: their BN is found by
    module order, so no second BN is inserted, and deploy leaves none."""
    m = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    online, report = rc.orepa_transform(m, return_report=True)
    aux = {e.name: e.details.get("post_bn") for e in report.entries if e.name.startswith("aux")}
    assert aux == {"aux1.conv.conv": "aux1.conv.bn (existing)", "aux2.conv.conv": "aux2.conv.bn (existing)"}
    assert not _bns(rc.deploy(online.eval()))

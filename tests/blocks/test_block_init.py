"""Block init from the conv it replaces (repcompiler.blocks.init), checked directly.

``init="from_conv"`` promises that a built block's equivalent kernel is exactly the
conv's (float64); ``init="from_bn"`` (existing multi-branch blocks) that the linearized
block computes what the BN-per-branch block did in eval mode; the default ``"fresh"``
that the conv's weights are not used. Also: blocks that cannot start as the conv raise
without being edited, a frozen conv gives a frozen block, and ``branch_kernels`` hands
out copies.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler.blocks import ConvGeometry, build_block
from repcompiler.blocks.init import copy_frozen, identity_bn_, init_from_conv
from repcompiler.errors import UnsupportedError
from repcompiler.online.conv import OfflineBlock, OnlineConv
from repcompiler.tools.similarity import branch_kernels

pytestmark = pytest.mark.usefixtures("torch_single_thread")

F64 = torch.float64


def _conv(k: int = 3, *, cin: int = 8, cout: int = 8, groups: int = 1, stride: int = 1, bias: bool = True,
          seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias).to(F64)
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    return conv


def _built(name: str, conv: nn.Conv2d, *, mode: str = "online", scaling: str = "vector") -> nn.Module:
    geom = ConvGeometry.from_module(conv, bias=conv.bias is not None)
    return build_block(name, geom, mode=mode, scaling=scaling).to(F64)


def _kernel(expr: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    expr.eval()  # offline branch BNs fold with their running statistics
    k = expr.fold()
    return k.weight.detach(), None if k.bias is None else k.bias.detach()


def _state(expr: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in expr.state_dict().items()}


# -- init="from_conv": the equivalent kernel is the conv's ------------------------------------


CASES = [
    ("orepa", dict(k=3)),
    ("orepa", dict(k=3, groups=2, stride=2)),
    ("orepa", dict(k=5, bias=False)),
    ("orepa_1x1", dict(k=1)),
    ("repvgg", dict(k=3)),
    ("dbb", dict(k=3)),
    ("acnet", dict(k=3)),
]


@pytest.mark.parametrize("scaling", ["vector", "scalar"])
@pytest.mark.parametrize("name,geometry", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_from_conv_block_kernel_equals_the_conv(name: str, geometry: dict, scaling: str) -> None:
    conv = _conv(**geometry)
    expr = _built(name, conv, scaling=scaling)
    origin = init_from_conv(expr, conv)
    weight, bias = _kernel(expr)
    assert torch.equal(weight, conv.weight.detach()), origin
    if conv.bias is not None:
        assert torch.equal(bias, conv.bias.detach())
    else:
        assert bias is None or not bias.any()


@pytest.mark.parametrize("name", ["orepa", "repvgg", "dbb"])
def test_from_conv_offline_block_kernel_equals_the_conv(name: str) -> None:
    conv = _conv(3)
    expr = _built(name, conv, mode="offline")
    init_from_conv(expr, conv)
    weight, bias = _kernel(expr)
    torch.testing.assert_close(weight, conv.weight.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(bias, conv.bias.detach(), rtol=0, atol=1e-12)


def test_from_conv_other_branches_start_at_zero_and_can_learn() -> None:
    conv = _conv(3)
    expr = _built("orepa", conv)
    origin = init_from_conv(expr, conv)
    assert origin == "origin"
    for name, branch in expr.branches.items():
        if name != origin:
            assert not branch.scale.any(), name
            assert isinstance(branch.scale, nn.Parameter) and branch.scale.requires_grad, name


def test_from_conv_through_the_transform_computes_what_the_model_did() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, bias=False)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    out, report = rc.orepa_transform(model, init="from_conv", insert_bn=True, return_report=True)
    entries = report.by_action("transformed")
    assert len(entries) == 3 and all(e.details["init"].startswith("from_conv") for e in entries)
    assert {e.name: e.details["post_bn"] for e in entries} == {"0": "1 (existing)", "3": "inserted", "4": "inserted"}
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), model(x), rtol=0, atol=1e-10)


def test_inserted_bn_is_the_identity_in_eval_mode() -> None:
    bn = nn.BatchNorm2d(4).to(F64)
    with torch.no_grad():
        bn.weight.normal_()
        bn.running_mean.normal_()
    identity_bn_(bn)
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    torch.testing.assert_close(bn.eval()(x), x, rtol=0, atol=1e-12)


# -- blocks that cannot start as the conv: refused, not edited ---------------------------------


@pytest.mark.parametrize("name,scaling,reason", [
    ("orepa", "fixed", "fixed scale"),
    ("orepa", "none", "no scale"),
    ("orepa_large", "vector", "not a sum of branches"),
])
def test_from_conv_refuses_blocks_that_cannot_start_as_the_conv(name: str, scaling: str, reason: str) -> None:
    conv = _conv(7 if name == "orepa_large" else 3)
    expr = _built(name, conv, scaling=scaling)
    before = _state(expr)
    with pytest.raises(UnsupportedError, match=reason):
        init_from_conv(expr, conv)
    after = expr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fixed_scaling_with_from_conv_is_refused_by_the_transform() -> None:
    # fixed scales started at zero would never move: the block would train as the plain conv
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    with pytest.warns(UserWarning, match="no eligible conv"):
        out, report = rc.orepa_transform(model, init="from_conv", scaling="fixed", return_report=True)
    (entry,) = report.entries
    assert entry.action == "refused" and "init='from_conv'" in entry.reason and "fixed scale" in entry.reason
    assert type(out[0]) is nn.Conv2d


def test_fixed_scaling_fresh_keeps_the_declared_scales() -> None:
    out = rc.orepa_transform(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), scaling="fixed")
    block = out[0]
    assert isinstance(block, OnlineConv)
    assert not any("scale" in n for n, _ in block.named_parameters())


# -- init="fresh" (the default) and init="from_bn" ----------------------------------------------


def test_fresh_does_not_use_the_conv_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).to(F64)
    out, report = rc.orepa_transform(model, init="fresh", return_report=True)
    (entry,) = report.by_action("transformed")
    assert entry.details["init"].startswith("fresh")
    weight, _ = _kernel(out[0].expr)
    assert weight.shape == model[0].weight.shape
    assert not torch.allclose(weight, model[0].weight.detach())


class _RepVGGLike(nn.Module):
    """3x3+BN, 1x1+BN and an identity BN, summed: an existing multi-branch block."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(x) + self.one(x) + self.identity(x))


def test_from_bn_linearized_block_computes_what_the_branches_did() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_RepVGGLike(), _RepVGGLike()).to(F64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    # init="from_conv" linearizes existing multi-branch blocks with init="from_bn"
    out, report = rc.orepa_transform(model, init="from_conv", return_report=True)
    assert len(report.by_action("linearized")) == 2, str(report)
    assert sum(isinstance(m, OnlineConv) for m in out.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), model(x), rtol=0, atol=1e-10)


# -- requires_grad flags ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_frozen_conv_gives_a_frozen_block_with_its_bias_flag(mode: str) -> None:
    conv = _conv(3)
    conv.weight.requires_grad_(False)
    expr = _built("orepa", conv, mode=mode)
    block = (OnlineConv if mode == "online" else OfflineBlock)(expr, None, block="orepa")
    copy_frozen(block, conv)
    own_bias = block.branches.bias
    assert own_bias is not None and own_bias.requires_grad
    assert not any(p.requires_grad for p in block.parameters() if p is not own_bias)


def test_trainable_conv_leaves_the_block_as_built() -> None:
    conv = _conv(3)
    block = OnlineConv(_built("orepa", conv), None, block="orepa")
    copy_frozen(block, conv)
    assert all(p.requires_grad for p in block.parameters())


# -- branch_kernels hands out copies -------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["none", "vector"])
def test_branch_kernels_share_no_memory_with_the_block(scaling: str) -> None:
    conv = _conv(3)
    expr = _built("orepa", conv, scaling=scaling)
    storages = {t.untyped_storage().data_ptr() for t in [*expr.parameters(), *expr.buffers()]}
    kernels = branch_kernels(expr)
    assert not any(k.untyped_storage().data_ptr() in storages for k in kernels)
    before = _state(expr)
    for k in kernels:
        k.add_(1.0)
    after = expr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and they still add up to the block's kernel
    torch.testing.assert_close(sum(branch_kernels(expr)), _kernel(expr)[0], rtol=0, atol=1e-12)

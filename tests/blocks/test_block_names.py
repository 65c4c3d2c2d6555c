"""Readable parameter names of declared blocks, and kernel accelerators attached to
declarations (matched by structure, checked against the generic fold)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import repcompiler as rc
from repcompiler.blocks import (
    BlockConfig,
    Branch,
    ConvGeometry,
    KernelAccelerator,
    OrepaAccelerator,
    build_block,
    frequency_prior,
)
from repcompiler.errors import RegistrationError
from repcompiler.online.conv import OnlineConv
from tests.helpers import assert_kernel_matches_fold, rel_err


def _geom(cin=6, cout=8, k=3, groups=1, p=1, bias=False):
    return ConvGeometry(cin, cout, (k, k), (1, 1), ((p, p), (p, p)), (1, 1), groups, 2, bias)


def _perturb(expr, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expr.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return expr


ORIGIN_BRANCHES = ["origin", "avg", "prior", "pw_kxk", "pointwise", "dw_pw"]


def test_resnet18_block_state_dict_keys_and_a_weight_decay_rule():
    model = rc.orepa_transform(torchvision.models.resnet18(), policy="all")  # "all": the downsample 1x1 too
    keys = [k for k in model.state_dict() if k.startswith("layer1.0.")]
    conv = {
        "branches.origin.weight", "branches.origin.scale",
        "branches.avg.pointwise.weight", "branches.avg.scale",
        "branches.prior.pointwise.weight", "branches.prior.pattern.weight", "branches.prior.scale",
        "branches.pw_kxk.pointwise.weight", "branches.pw_kxk.weight", "branches.pw_kxk.scale",
        "branches.pointwise.weight", "branches.pointwise.scale",
        "branches.dw_pw.depthwise.weight", "branches.dw_pw.pointwise.weight", "branches.dw_pw.scale",
    }
    bn = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    want = {f"layer1.0.conv{i}.{k}" for i in (1, 2) for k in conv} | {f"layer1.0.bn{i}.{k}" for i in (1, 2) for k in bn}
    assert set(keys) == want
    # a weight-decay rule "every parameter whose name ends in .scale" selects exactly the branch scales
    scales = {n for n, _ in model.named_parameters() if n.endswith(".scale")}
    blocks = [n for n, m in model.named_modules() if isinstance(m, OnlineConv)]
    assert blocks
    expected = set()
    for name in blocks:
        expr = model.get_submodule(name).branches
        stages = expr.terms if hasattr(expr, "stage0") else [expr]
        for j, stage in enumerate(stages):
            prefix = f"{name}.branches." + (f"stage{j}." if stage is not expr else "")
            expected |= {prefix + b + ".scale" for b in stage.branches}
    assert scales == expected
    assert {n.rsplit(".", 2)[-2] for n in scales} == set(ORIGIN_BRANCHES) | {"pw_pw"}  # + orepa_1x1 (downsample)
    # the prior pattern is fixed (a buffer), never a parameter
    assert not any(n.endswith("pattern.weight") for n, _ in model.named_parameters())


def test_deploy_reads_the_expression_not_the_names():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, bias=True))
    t = rc.orepa_transform(m, block="dbb").double()
    rc.testing.randomize_module(t, torch.Generator().manual_seed(2))
    t.eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert "0.branches.pw_kxk.pointwise.weight" in t.state_dict()
    d = rc.deploy(t)
    assert rel_err(d(x), t(x)) < 1e-10


def test_user_block_names_explicit_default_and_deduplicated():
    cfg = (BlockConfig("t_names")
           .branch(Branch.conv(), name="square")
           .branch(Branch.conv((1, 3)))
           .branch(Branch.conv((1, 3)))
           .branch(Branch.pointwise(init="residual") >> Branch.conv())
           .branch(Branch.depthwise(2) >> Branch.pointwise())
           .branch("identity", optional=True)
           .branch(Branch.pointwise(lambda g: g.out_channels) >> Branch.avg()))
    expr = cfg.build(_geom(8, 8))
    assert list(expr.branches) == ["square", "conv1x3", "conv1x3_2", "pointwise_conv3x3", "depthwise_pointwise",
                                   "identity", "pointwise_avg"]
    names = {n for n, _ in expr.named_parameters()}
    assert {"square.weight", "square.scale", "conv1x3.weight", "pointwise_conv3x3.pointwise.weight",
            "pointwise_conv3x3.weight", "depthwise_pointwise.depthwise.weight",
            "depthwise_pointwise.pointwise.weight", "identity.scale"} <= names
    # offline: a BN per branch, named bn
    off = cfg.build(_geom(8, 8), mode="offline")
    assert "square.bn.weight" in off.state_dict()
    with pytest.raises(RegistrationError):
        BlockConfig("t_bad").branch(Branch.conv(), name="not a name")
    with pytest.raises(RegistrationError):
        BlockConfig("t_bad").branch(Branch.conv(), name="bias")


def _reordered_orepa() -> BlockConfig:
    """OREPA's branches declared in another order (and the origin last)."""
    return (BlockConfig("t_reordered")
            .branch(Branch.depthwise(8) >> Branch.pointwise(), name="dw_pw", init=0.5)
            .branch(Branch.pointwise(), name="pointwise", init=1.0)
            .branch(Branch.pointwise(init="residual") >> Branch.conv(), name="pw_kxk", init=0.5)
            .branch(Branch.pointwise(lambda g: g.out_channels)
                    >> Branch.fixed(lambda g: frequency_prior(g.in_channels, g.kernel_size)), name="prior", init=0.0)
            .branch(Branch.pointwise(lambda g: g.out_channels) >> Branch.avg(), name="avg", init=0.25)
            .branch(Branch.conv(), name="origin", init=0.25)
            .accelerate(OrepaAccelerator()))


def _compare_to_fold(expr):
    assert_kernel_matches_fold(expr, expr.accelerator.generate(expr))


@pytest.mark.parametrize("geom", [_geom(), _geom(8, 8, groups=2, bias=True), _geom(6, 8, p=0)],
                         ids=lambda g: g.describe())
def test_reordered_declaration_gets_the_right_kernel(geom):
    expr = _reordered_orepa().build(geom)
    assert isinstance(expr.accelerator, OrepaAccelerator)
    assert list(expr.branches)[0] == "dw_pw"
    _compare_to_fold(_perturb(expr.double()))
    # and the online conv uses it
    online = OnlineConv(expr)
    assert online.accelerator is expr.accelerator
    x = torch.randn(2, geom.in_channels, 7, 7, dtype=torch.float64)
    assert rel_err(online(x), expr.fold().apply(x)) < 1e-12


def test_non_matching_structure_falls_back_to_the_generic_fold():
    geom = _geom()
    # an extra branch, a renamed branch, a different multiplier shape: none is OREPA's structure
    extra = _reordered_orepa().branch(Branch.conv(1), name="extra").build(geom)
    assert extra.accelerator is None
    renamed = (BlockConfig("t_renamed").branch(Branch.conv(), name="kxk").accelerate(OrepaAccelerator()).build(geom))
    assert renamed.accelerator is None
    built = build_block("orepa", geom)
    assert isinstance(built.accelerator, OrepaAccelerator)
    # an accelerator passed explicitly but not matching is dropped by the online conv
    online = OnlineConv(_perturb(renamed.double()), accelerator=OrepaAccelerator())
    assert online.accelerator is None
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    assert rel_err(online(x), renamed.fold().apply(x)) < 1e-12
    # offline blocks never get one (their branches end with BNs)
    assert build_block("orepa", geom, mode="offline").accelerator is None


def test_online_conv_generates_with_the_accelerator():
    calls = []

    class Counting(KernelAccelerator):
        def matches(self, expr):
            return True

        def generate(self, expr):
            calls.append(1)
            return expr.fold(check=False)

    expr = BlockConfig("t_counting").branch(Branch.conv()).branch(Branch.pointwise()).accelerate(Counting()).build(_geom())
    online = OnlineConv(expr)
    online(torch.randn(1, 6, 5, 5)).sum().backward()
    assert calls == [1]
    with pytest.raises(RegistrationError):
        BlockConfig("t_bad").accelerate(lambda e: e)

"""Tests of ``repcompiler.linearize``: OREPA's block linearization and
squeezing applied to multi-branch models written by someone else.

Checked on the paper-faithful fixtures (RepVGG, DBB with four branches, ACNet,
MobileOne with k branches) and on timm's ``repvgg_a0`` / ``mobileone_s0`` in training
form:

* a training forward of the linearized model runs exactly one feature-map conv per
  block (counted at the ATen level with a ``TorchDispatchMode``);
* it trains (loss falls on a fixed batch);
* ``deploy`` gives one plain conv per block with eval outputs equal to the
  linearized model's;
* with ``init="from_bn"`` the eval output equals the original model's before any
  training step;
* the paper's ablation as behaviour: without the post-BN a deep RepVGG-style net
  blows up at a normal learning rate, with it it trains;
* blocks that cannot be linearized are left as they were and reported.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import repcompiler as rc
from repcompiler import algebra as A
from repcompiler.transforms.linearize import find_linearizable, linearize, linearize_regions
from repcompiler.online.conv import OnlineConv
from repcompiler.rules import LowerInfo, default_rules

import fixtures_blocks as fb
from helpers import rel_err

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BATCH = 7  # no channel count below is 7: a conv whose input has batch 7 runs on a feature map
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FeatureMapConvs(TorchDispatchMode):
    """Counts ``aten.convolution`` calls on feature maps (batch dim == ``batch``);
    kernel generation convs (if any) have another leading dim."""

    def __init__(self, batch: int = BATCH) -> None:
        super().__init__()
        self.batch = batch
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and args[0].shape[0] == self.batch:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_feature_convs(model: nn.Module, x: torch.Tensor) -> int:
    with FeatureMapConvs(x.shape[0]) as mode:
        model(x)
    return mode.count


def n_online(model: nn.Module) -> int:
    return sum(isinstance(m, OnlineConv) for m in model.modules())


def n_convs(model: nn.Module) -> int:
    return sum(isinstance(m, _CONVS) for m in model.modules())


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x)
    model.train(was)
    return y


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- fixtures: small networks of paper-faithful blocks --------------------------------------


def _lower_idconv_trainable(m: nn.Module, info: LowerInfo) -> A.Expr:
    # ``weight + identity`` over the module's own nn.Parameter (trainable online)
    return A.Conv(m.weight, None, groups=m.groups, name=info.name) + A.Identity(m.in_channels, 2)


def dbb_rules():
    rules = default_rules().copy()
    rules.register(fb.IdentityBasedConv1x1, _lower_idconv_trainable, override=True)
    return rules


class Head(nn.Module):
    def __init__(self, c: int, classes: int = 5) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class BlockNet(nn.Module):
    """``blocks`` of one kind, a ReLU after blocks without their own, a linear head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        cls = fb.ALL_BLOCKS[kind]
        specs = [(3, 8, 2), (8, 8, 1), (8, 16, 2), (16, 16, 1)]
        layers = []
        for cin, cout, s in specs:
            kw = {"num_branches": 3} if kind == "mobileone" else {}
            layers.append(cls(cin, cout, 3, s, **kw))
            if kind in ("acnet", "dbb"):
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.head = Head(16)
        self.num_blocks = len(specs)

    def forward(self, x):
        return self.head(self.body(x))


KINDS = ["repvgg", "dbb", "acnet", "mobileone"]


def _rules_for(kind: str):
    return dbb_rules() if kind == "dbb" else None


def _data(seed: int = 0, size: int = 16, classes: int = 5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, size, size, generator=g).to(dtype)
    y = torch.randint(0, classes, (BATCH,), generator=g)
    return x, y


# -- fixture blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_from_bn_equal_and_one_conv_per_block(kind):
    torch.manual_seed(0)
    net = fb.randomize_bn(BlockNet(kind), seed=1).double()
    x, _ = _data(dtype=torch.float64)
    before = eval_out(net, x)
    lin, report = linearize(net, x, init="from_bn", rules=_rules_for(kind), return_report=True)
    assert len(report.by_action("linearized")) == net.num_blocks, str(report)
    assert not report.refused, str(report)
    # the original is untouched, the linearized model equals it in eval mode
    assert n_online(net) == 0 and n_convs(net) > net.num_blocks
    assert rel_err(eval_out(lin, x), before) < 1e-9
    # one conv on the feature map per block, in training mode
    assert n_online(lin) == net.num_blocks and n_convs(lin) == 0
    lin.train()
    assert count_feature_convs(lin, x) == net.num_blocks
    # while the original runs every branch
    net.train()
    assert count_feature_convs(net, x) >= 2 * net.num_blocks
    # root class, head names and parameters kept
    assert type(lin) is BlockNet
    assert lin.head.fc.weight.data_ptr() != net.head.fc.weight.data_ptr()
    torch.testing.assert_close(lin.state_dict()["head.fc.weight"], net.state_dict()["head.fc.weight"])


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_trains_and_deploys(kind):
    torch.manual_seed(0)
    net = BlockNet(kind)
    lin = linearize(net, rules=_rules_for(kind))
    x, y = _data(seed=2)
    losses = train_steps(lin, x, y, steps=8, lr=0.1)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    plain = rc.deploy(lin)
    assert n_convs(plain) == net.num_blocks
    assert n_online(plain) == 0
    assert rel_err(eval_out(plain, x), eval_out(lin, x)) < 1e-5


def test_dbb_four_branches_in_one_online_conv():
    block = fb.randomize_bn(fb.DBBBlock(8, 8), seed=3)
    net = nn.Sequential(block, nn.ReLU())
    lin, report = linearize(net, init="from_bn", rules=dbb_rules(), return_report=True)
    (entry,) = report.by_action("linearized")
    # origin kxk, 1x1, 1x1 -> BN-pad -> avg -> BN, idconv -> BN-pad -> kxk -> BN
    assert len(entry.details["bns"]) == 6
    # origin, 1x1, the avg branch's 1x1, the idconv and the kxk after it
    assert len(entry.details["convs"]) == 5
    online = [m for m in lin.modules() if isinstance(m, OnlineConv)]
    assert len(online) == 1 and online[0].expr.spec.kernel_size == (3, 3)


def test_dbb_snapshot_rule_is_refused_with_reason():
    # the fixture's own IdentityBasedConv1x1 rule lowers to a computed tensor (fine for
    # deploy, but it would not train online): the block is left as is and reported
    net = nn.Sequential(fb.randomize_bn(fb.DBBBlock(8, 8), seed=3), nn.ReLU())
    lin, report = linearize(net, return_report=True)
    assert n_online(lin) == 0
    assert report.refused and "computed copy of its parameters" in report.refused[0].reason
    x = torch.randn(2, 8, 9, 9)
    assert rel_err(eval_out(lin, x), eval_out(net, x)) == 0.0


@pytest.mark.parametrize("scaling", ["vector", "scalar", "none"])
def test_scaling_options(scaling):
    torch.manual_seed(0)
    net = fb.randomize_bn(nn.Sequential(fb.RepVGGBlock(8, 8), fb.RepVGGBlock(8, 8)), seed=5).double()
    x = torch.randn(3, 8, 10, 10, dtype=torch.float64)
    lin = linearize(net, x, scaling=scaling, init="from_bn")
    assert rel_err(eval_out(lin, x), eval_out(net, x)) < 1e-9
    online = [m for m in lin.modules() if isinstance(m, OnlineConv)]
    assert len(online) == 2
    affines = [m for m in online[0].expr.modules() if isinstance(m, A.Affine)]
    learnable = [m.scale for m in affines if isinstance(m.scale, nn.Parameter)]
    if scaling == "vector":
        assert len(learnable) == 3 and all(s.shape == (8,) for s in learnable)
    elif scaling == "scalar":
        assert len(learnable) == 3 and all(s.shape == () for s in learnable)
    else:
        assert learnable == []
    # every branch keeps a learnable bias (the BN's shift)
    assert sum(isinstance(m.shift, nn.Parameter) for m in affines) == 3
    # default init: scales 1, biases 0, a fresh post-BN
    lin_d = linearize(net, scaling=scaling)
    online = [m for m in lin_d.modules() if isinstance(m, OnlineConv)][0]
    for m in online.expr.modules():
        if isinstance(m, A.Affine):
            assert m.scale is None or bool((m.scale == 1).all())
            assert bool((m.shift == 0).all())
    assert isinstance(online.post_bn, nn.BatchNorm2d)
    assert bool((online.post_bn.running_var == 1).all())


def test_from_bn_post_bn_is_identity_in_eval_and_normalizes_in_training():
    torch.manual_seed(0)
    net = fb.randomize_bn(nn.Sequential(fb.RepVGGBlock(8, 8)), seed=2)
    lin = linearize(net, init="from_bn")
    online = next(m for m in lin.modules() if isinstance(m, OnlineConv))
    bn = online.post_bn
    assert bool((bn.running_mean == 0).all()) and torch.allclose(bn.running_var + bn.eps, torch.ones(8))
    x = torch.randn(BATCH, 8, 6, 6) * 3 + 1
    lin.train()
    with torch.no_grad():
        pre = online.kernel().apply(x)
        out = online(x)
    # training mode: batch statistics of the sum (zero mean, unit variance per channel)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert rel_err(out, pre) > 1e-2
    # and the running statistics moved towards the sum's
    assert not bool((bn.running_mean == 0).all())


def test_existing_bn_after_the_sum_is_the_post_bn():
    class ACPost(nn.Module):  # ACNet variant with a BN after the add
        def __init__(self):
            super().__init__()
            self.sq = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.ver = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), bias=False)
            self.hor = nn.Conv2d(8, 8, (1, 3), padding=(0, 1), bias=False)
            self.sq_bn, self.ver_bn, self.hor_bn = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.sq_bn(self.sq(x)) + self.ver_bn(self.ver(x)) + self.hor_bn(self.hor(x))))

    net = fb.randomize_bn(nn.Sequential(ACPost()), seed=4).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    lin, report = linearize(net, x, init="from_bn", return_report=True)
    online = next(m for m in lin.modules() if isinstance(m, OnlineConv))
    # the user's BN (its statistics included) is the block's post-BN, none inserted
    assert online.post_bn is not None
    torch.testing.assert_close(online.post_bn.running_mean, net[0].bn.running_mean)
    assert "existing" in report.by_action("linearized")[0].reason
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in lin.modules()) == 1
    assert rel_err(eval_out(lin, x), eval_out(net, x)) < 1e-9


def test_post_bn_false_inserts_none():
    net = nn.Sequential(fb.RepVGGBlock(8, 8))
    lin = linearize(net, post_bn=False)
    online = next(m for m in lin.modules() if isinstance(m, OnlineConv))
    assert online.post_bn is None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in lin.modules())


# -- refusals ---------------------------------------------------------------------------------


class ReluBranches(nn.Module):
    """Branches whose BN is followed by a ReLU before the add: not linear."""

    def __init__(self):
        super().__init__()
        self.a = fb.conv_bn(8, 8, 3, 1, 1)
        self.b = fb.conv_bn(8, 8, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.a(x)) + torch.relu(self.b(x))


class NoStatsIdentity(fb.RepVGGBlock):
    """A RepVGG block whose identity BN does not track running statistics."""

    def __init__(self):
        super().__init__(8, 8)
        self.rbr_identity = nn.BatchNorm2d(8, track_running_stats=False)


def test_nonlinear_branch_and_untracked_bn_are_left_and_reported():
    net = fb.randomize_bn(nn.Sequential(ReluBranches(), NoStatsIdentity(), fb.RepVGGBlock(8, 8)), seed=6)
    x = torch.randn(2, 8, 8, 8)
    lin, report = linearize(net, x, init="from_bn", return_report=True)
    reasons = " | ".join(e.reason for e in report.refused)
    assert len(report.refused) == 2, str(report)
    assert "followed by" in reasons and "ReLU" in reasons or "relu" in reasons
    assert "track_running_stats=False" in reasons
    # only the good block became an online conv; the others are untouched modules
    assert n_online(lin) == 1
    assert isinstance(lin[0], ReluBranches) and isinstance(lin[1], NoStatsIdentity)
    assert isinstance(lin[1].rbr_1x1.bn, nn.BatchNorm2d)
    assert rel_err(eval_out(lin, x), eval_out(net, x)) < 1e-5
    # the analysis alone says the same
    cands, skipped = find_linearizable(net)
    assert sum(c.ok for c in cands) == 1 and sum(not c.ok for c in cands) == 2 and not skipped


def test_inplace_and_copy():
    net = nn.Sequential(fb.RepVGGBlock(8, 8), nn.Flatten(), nn.LazyLinear(3) if False else nn.Identity())
    keys = set(net.state_dict())
    lin = linearize(net)
    assert set(net.state_dict()) == keys and n_online(net) == 0 and n_online(lin) == 1
    same = linearize(net, inplace=True)
    assert same is net and n_online(net) == 1


def test_save_load_and_deepcopy_roundtrip():
    torch.manual_seed(0)
    lin = linearize(fb.RepVGGNet(widths=(8, 8, 8), blocks=(1, 1, 1)))
    x = torch.randn(2, 3, 16, 16)
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert rel_err(eval_out(loaded, x), eval_out(lin, x)) == 0.0
    fresh = linearize(fb.RepVGGNet(widths=(8, 8, 8), blocks=(1, 1, 1)))
    fresh.load_state_dict(lin.state_dict(), strict=True)
    assert rel_err(eval_out(fresh, x), eval_out(lin, x)) == 0.0
    assert rel_err(eval_out(copy.deepcopy(lin), x), eval_out(lin, x)) == 0.0


def test_bad_options():
    net = nn.Sequential(fb.RepVGGBlock(8, 8))
    with pytest.raises(rc.UnsupportedError):
        linearize(net, scaling="matrix")
    with pytest.raises(rc.UnsupportedError):
        linearize(net, init="zeros")
    with pytest.raises(rc.UnsupportedError):
        linearize_regions(net, mode="sideways")


def test_no_blocks_returns_equivalent_copy():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    lin, report = linearize(net, return_report=True)
    assert not report.by_action("linearized") and not report.refused
    assert n_online(lin) == 0 and lin is not net


def test_linearize_regions_hook_offline_mode_reports_without_change():
    net = fb.RepVGGNet(widths=(8, 8, 8), blocks=(1, 1, 1))
    model, handled = linearize_regions(net, mode="offline")
    assert model is net and n_online(net) == 0
    assert handled == {f"stages.{i}.{b}.conv" for i in range(4) for b in ("rbr_dense", "rbr_1x1")}
    model, handled_online = linearize_regions(net)
    assert handled_online == handled and n_online(net) == 4


# -- the paper's ablation, as behaviour ------------------------------------------------------


def _deep_repvgg(post_bn: bool) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    net = fb.RepVGGNet(widths=(16, 16, 16), blocks=(1, 6, 6)).double()
    for m in net.modules():  # the He init RepVGG / timm use
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    lin = linearize(net, post_bn=post_bn)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=g)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    lin.train()
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y)
        loss.backward()
        grads.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in lin.parameters() if p.grad is not None)))
        losses.append(loss.item())
        opt.step()
    return losses, grads


def test_ablation_post_bn_is_what_makes_a_deep_linearized_net_trainable():
    with_bn, g_bn = _deep_repvgg(post_bn=True)
    without, g_no = _deep_repvgg(post_bn=False)
    # with the post-BN: finite, falling loss, moderate gradients
    assert all(math.isfinite(v) for v in with_bn) and with_bn[-1] < 0.9 * with_bn[0], with_bn
    assert max(g_bn) < 50, g_bn
    # without: the gradients explode at once and the loss diverges
    assert g_no[0] > 100 * g_bn[0], (g_no, g_bn)
    assert not all(math.isfinite(v) and v < 10 * with_bn[0] for v in without), without


# -- timm models in training form -----------------------------------------------------------


@pytest.mark.parametrize("name,blocks", [("repvgg_a0", 22), ("mobileone_s0", 43)])
def test_timm_training_form(name, blocks):
    timm = pytest.importorskip("timm")
    from timm.models import byobnet

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    block_cls = byobnet.RepVggBlock if name.startswith("repvgg") else byobnet.MobileOneBlock
    assert sum(isinstance(m, block_cls) for m in model.modules()) == blocks
    fb.randomize_bn(model, seed=3)
    model64 = copy.deepcopy(model).double()
    x64 = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    want = eval_out(model64, x64)
    lin64, report = linearize(model64, init="from_bn", inplace=True, return_report=True)
    assert len(report.by_action("linearized")) == blocks and not report.refused, str(report)
    assert rel_err(eval_out(lin64, x64), want) < 1e-9
    assert type(lin64) is type(model)

    lin = lin64.float()  # the same linearized model, trained in float32
    del lin64, model64
    assert n_online(lin) == blocks and n_convs(lin) == 0
    x, y = _data(seed=4, size=32)
    lin.train()
    assert count_feature_convs(lin, x) == blocks
    losses = train_steps(lin, x, y, steps=3, lr=0.02)
    assert losses[-1] < losses[0], losses
    plain = rc.deploy(lin)
    assert n_convs(plain) == blocks
    assert rel_err(eval_out(plain, x), eval_out(lin, x)) < 1e-5


def test_region_owned_by_the_root_keeps_class_pickles_and_deploys():
    block = fb.randomize_bn(fb.ACBlock(8, 8), seed=7)
    lin = linearize(block, init="from_bn")
    assert isinstance(lin, fb.ACBlock) and type(lin).__name__ == "ACBlock" and n_online(lin) == 1
    assert isinstance(lin.square_conv, OnlineConv)  # installed at the largest conv's name
    x = torch.randn(2, 8, 9, 9)
    assert rel_err(eval_out(lin, x), eval_out(block, x)) < 1e-5
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, fb.ACBlock) and n_online(loaded) == 1
    assert rel_err(eval_out(loaded, x), eval_out(lin, x)) == 0.0
    plain = rc.deploy(lin)
    assert n_convs(plain) == 1
    assert rel_err(eval_out(plain, x), eval_out(lin, x)) < 1e-5


class DropPathBlock(fb.RepVGGBlock):
    """timm-style: drop-path on the conv branches' sum, then the identity BN added."""

    def __init__(self):
        super().__init__(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.nonlinearity(self.drop(self.rbr_dense(x) + self.rbr_1x1(x)) + self.rbr_identity(x))


def test_drop_path_between_sums_linearizes_the_conv_branches_only():
    net = fb.randomize_bn(nn.Sequential(DropPathBlock()), seed=8)
    x = torch.randn(BATCH, 8, 8, 8)
    lin = linearize(net, x, init="from_bn")
    assert n_online(lin) == 1
    # the identity BN stays a BN (drop-path applies to the conv branches only)
    assert isinstance(lin[0].rbr_identity, nn.BatchNorm2d)
    lin.train()
    assert count_feature_convs(lin, x) == 1


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d_blocks(dims):
    net = fb.randomize_bn(nn.Sequential(fb.RepVGGBlock(4, 4, dims=dims), fb.RepVGGBlock(4, 6, stride=2, dims=dims)),
                          seed=9).double()
    x = torch.randn(2, 4, *([7] * dims), dtype=torch.float64)
    lin = linearize(net, x, init="from_bn")
    assert n_online(lin) == 2 and n_convs(lin) == 0
    assert rel_err(eval_out(lin, x), eval_out(net, x)) < 1e-9
    online = next(m for m in lin.modules() if isinstance(m, OnlineConv))
    assert isinstance(online.post_bn, {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims])
    plain = rc.deploy(lin)
    assert n_convs(plain) == 2 and rel_err(eval_out(plain, x), eval_out(lin, x)) < 1e-9


@pytest.mark.parametrize("kind", KINDS + ["mobileone_dw", "repvgg_grouped"])
def test_fast_fold_equals_generic_fold_with_gradients(kind):
    from repcompiler.algebra import LinearizedSum

    torch.manual_seed(11)
    if kind == "mobileone_dw":
        block = fb.MobileOneBlock(8, 8, groups=8, num_branches=3)
    elif kind == "repvgg_grouped":
        block = fb.RepVGGBlock(8, 8, groups=2)
    else:
        block = fb.ALL_BLOCKS[kind](8, 8)
    lin = linearize(nn.Sequential(block), rules=_rules_for(kind)).double()
    online = next(m for m in lin.modules() if isinstance(m, OnlineConv))
    assert isinstance(online.expr, LinearizedSum)
    params = list(online.expr.parameters())
    with torch.no_grad():
        for p in params:  # non-trivial scales and biases
            p.add_(torch.randn_like(p) * 0.3)
    fast, ref = online.expr.fast_fold(), A.Sum.fold(online.expr, check=False)
    assert fast.spec == ref.spec
    torch.testing.assert_close(fast.weight, ref.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.bias, ref.bias, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref.weight)
    gb = torch.randn_like(ref.bias)
    d_fast = torch.autograd.grad((fast.weight * g).sum() + (fast.bias * gb).sum(), params, allow_unused=True)
    d_ref = torch.autograd.grad((ref.weight * g).sum() + (ref.bias * gb).sum(), params, allow_unused=True)
    for a, b in zip(d_fast, d_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the parameters themselves were not edited in place by the fast path
    again = A.Sum.fold(online.expr, check=False)
    torch.testing.assert_close(again.weight, ref.weight, rtol=0, atol=0)


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = fb.conv_bn(8, 8, 3, 1, 1)
        self.b = fb.conv_bn(8, 8, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _OuterUntracked(nn.Module):
    """The branches are summed in a child module, the untracked identity BN is added by
    the parent: the child alone looks linearizable, the block as a whole is not."""

    def __init__(self):
        super().__init__()
        self.inner = _TwoBranch()
        self.id = nn.BatchNorm2d(8, track_running_stats=False)

    def forward(self, x):
        return torch.relu(self.inner(x) + self.id(x))


def test_block_split_across_modules_is_judged_as_a_whole():
    net = nn.Sequential(_OuterUntracked(), fb.RepVGGBlock(8, 8))
    lin, report = linearize(net, return_report=True)
    assert n_online(lin) == 1 and isinstance(lin[0].inner, _TwoBranch)
    assert len(report.refused) == 1 and "track_running_stats=False" in report.refused[0].reason


def test_orepa_transform_linearizes_existing_blocks_instead_of_wrapping_their_convs():
    # one online conv per multi-branch block, not one OREPA block per conv
    net = fb.RepVGGNet(widths=(8, 16, 16), blocks=(1, 1, 1))
    out, report = rc.orepa_transform(net, return_report=True)
    assert n_online(out) == net.num_blocks and n_convs(out) == 0
    assert len(report.by_action("linearized")) == net.num_blocks
    assert not report.by_action("transformed")
    x = torch.randn(BATCH, 3, 16, 16)
    out.train()
    assert count_feature_convs(out, x) == net.num_blocks
    # a plain conv next to the blocks still gets its OREPA block
    mixed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), fb.RepVGGBlock(8, 8))
    out, report = rc.orepa_transform(mixed, return_report=True)
    assert len(report.by_action("transformed")) == 1 and len(report.by_action("linearized")) == 1
    assert n_online(out) == 2
    # offline mode leaves the blocks in their own BN-per-branch form
    with pytest.warns(UserWarning, match="no eligible conv"):
        out, report = rc.orepa_transform(net, mode="offline", return_report=True)
    assert n_online(out) == 0 and len(report.by_action("kept")) == net.num_blocks


def test_linearize_then_fold_the_root_subclasses_the_users_class_once():
    """One rewrite engine, one marker: folding a root that linearize already rewrote
    subclasses the user's class again, never the generated class."""
    block = fb.randomize_bn(fb.ACBlock(8, 8), seed=7)
    lin = linearize(block, init="from_bn")
    assert type(lin).__mro__[1] is fb.ACBlock
    folded = rc.fold(lin)
    assert type(folded).__mro__[1] is fb.ACBlock and isinstance(folded, fb.ACBlock)
    x = torch.randn(2, 8, 9, 9)
    assert n_convs(folded) == 1 and rel_err(eval_out(folded, x), eval_out(block, x)) < 1e-5
    clone = copy.deepcopy(folded)
    assert type(clone) is type(folded) and rel_err(eval_out(clone, x), eval_out(folded, x)) == 0.0

"""``repcompiler.testing.check_block`` / ``check_rule``: they pass on correct
registrations and catch broken ones, naming the property and the geometry; and
``randomize_bn``'s settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

import repcompiler as rc
import repcompiler.algebra as A
from repcompiler.blocks import ConvGeometry, register_block, unregister_block
from repcompiler.config import BlockConfig, Branch, RuleConfig
from repcompiler.errors import RegistrationError, VerificationError
from repcompiler.rules import register_rule, unregister_rule
from repcompiler.testing import CheckFailure, check_block, check_rule, conv_geometries

# fast, reproducible defaults for the failure tests (no shrinking: first failure)
FAST = dict(derandomize=True, shrink=False)


@pytest.fixture
def blocks():
    names: list[str] = []
    yield names
    for n in names:
        unregister_block(n)


def _conv_like(geom: ConvGeometry, **over) -> A.Conv:
    kw = dict(stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=geom.groups)
    kw.update(over)
    w = nn.Parameter(torch.randn(geom.out_channels, geom.in_channels // kw["groups"], *geom.kernel_size) * 0.3)
    return A.Conv(w, **kw)


# -- check_block: passes ------------------------------------------------------------------------


def test_check_block_passes_on_a_good_custom_block(blocks):
    blocks.append("t_good")
    (BlockConfig("t_good")
        .branch("kxk")
        .branch(Branch.conv(lambda g: (1,) * (g.dims - 1) + (g.kernel_size[-1],)))
        .branch("1x1>kxk", init=0.5)
        .branch("identity", optional=True)
        .register())
    res = check_block("t_good", max_examples=20, derandomize=True)
    assert res.accepted == res.examples == 20
    for prop in ("geometry", "exact fold", "online == unfolded (eval)", "deployed conv == unfolded (eval)",
                 "gradients online == unfolded (train)", "fresh parameters", "deploy() == block (eval)"):
        assert prop in res.properties
    assert "all properties held" in str(res)


@pytest.mark.parametrize("name", ["repvgg", "acnet", "orepa_1x1"])
def test_check_block_passes_on_builtin_blocks(name):
    res = check_block(name, max_examples=8, derandomize=True, use_deploy=False)
    assert res.accepted > 0


def test_check_block_on_orepa():
    # the library's flagship block gets the same proof (2-d here: torch's avg_pool3d
    # refuses inputs smaller than the kernel even when padded, so the unfolded 3-d
    # orepa/dbb blocks fail on 1-pixel inputs where the conv works)
    check_block("orepa", max_examples=10, derandomize=True, use_deploy=False, dims=(2,))
    check_block("orepa_large", max_examples=5, derandomize=True, use_deploy=False, kernel_size=5, dims=(2,))


def test_check_block_accepts_a_custom_strategy(blocks):
    blocks.append("t_strat")
    BlockConfig("t_strat").branch("kxk").branch("1x1").requires(lambda g: g.kernel_size == (3, 3), "3x3").register()
    res = check_block("t_strat", max_examples=6, geometries=conv_geometries((2,), kernel_size=3), **FAST)
    assert res.accepted == 6
    res = check_block("t_strat", max_examples=6, dims=(2,), kernel_size=(3, 3), **FAST)
    assert res.accepted == 6


# -- check_block: catches broken blocks ----------------------------------------------------------------


def _expect(match_prop: str, fn, *args, **kwargs) -> CheckFailure:
    with pytest.raises(CheckFailure) as info:
        fn(*args, **kwargs)
    err = info.value
    assert isinstance(err, AssertionError) and isinstance(err, VerificationError)
    assert err.prop == match_prop, str(err)
    msg = str(err)
    assert f"property '{match_prop}' failed" in msg
    return err


def test_check_block_catches_wrong_geometry(blocks):
    blocks.append("t_stride")
    # ignores the conv's stride: output size differs for strided convs
    register_block("t_stride", lambda geom: _conv_like(geom, stride=1))
    err = _expect("geometry", check_block, "t_stride", max_examples=30, **FAST)
    assert "geometry conv(" in str(err) and "s=" in err.case and "stride" in err.detail


def test_check_block_catches_a_nonexact_topology(blocks):
    blocks.append("t_inexact")

    def build(geom):  # 3x3 then 3x3, both zero-padded: not one 5x5 conv at the borders
        if geom.dims != 2 or geom.kernel_size != (5, 5) or geom.padding != ((2, 2), (2, 2)) or geom.stride != (1, 1) \
                or geom.dilation != (1, 1):
            raise rc.UnsupportedError("5x5 'same' only")
        c, o = geom.in_channels, geom.out_channels
        a = A.Conv(nn.Parameter(torch.randn(c, c, 3, 3)), padding=1)
        b = A.Conv(nn.Parameter(torch.randn(o, c, 3, 3)), padding=1)
        return a >> b

    register_block("t_inexact", build)
    geoms = st.builds(ConvGeometry, st.integers(1, 3), st.integers(1, 3), st.just((5, 5)), st.just((1, 1)),
                      st.just(((2, 2), (2, 2))), st.just((1, 1)), st.just(1), st.just(2), st.just(False))
    err = _expect("exact fold", check_block, "t_inexact", max_examples=5, geometries=geoms, **FAST)
    assert "k=5" in err.case and "not exact" in err.detail


class _NonlinearConv(A.Conv):
    """An Expr leaf whose unfolded form is not what it folds to (a ReLU sneaked in)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_check_block_catches_an_expression_whose_fold_differs(blocks):
    blocks.append("t_relu")

    def build(geom):
        w = nn.Parameter(torch.randn(geom.out_channels, geom.in_channels // geom.groups, *geom.kernel_size))
        leaf = _NonlinearConv(w, stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=geom.groups)
        return leaf + _conv_like(geom)

    register_block("t_relu", build)
    err = _expect("online == unfolded (eval)", check_block, "t_relu", max_examples=10, **FAST)
    assert "geometry conv(" in err.case and "input (2," in err.case and "relative error" in err.detail


def test_check_block_catches_shared_parameters(blocks):
    blocks.append("t_shared")
    cache: dict = {}

    def build(geom):
        key = geom
        if key not in cache:
            cache[key] = _conv_like(geom)
        return cache[key]

    register_block("t_shared", build)
    _expect("fresh parameters", check_block, "t_shared", max_examples=5, **FAST)


def test_check_block_catches_a_block_with_bn_inside_in_online_mode(blocks):
    # a BN inside the branches is not linear while training: online (folded with
    # running stats) and unfolded (batch stats) differ in train mode
    blocks.append("t_bn_online")

    def build(geom):
        bn = nn.BatchNorm2d(geom.out_channels) if geom.dims == 2 else nn.BatchNorm1d(geom.out_channels)
        return _conv_like(geom) >> A.BatchNorm(bn, dims=geom.dims)

    register_block("t_bn_online", build)
    err = _expect("online == unfolded (train)", check_block, "t_bn_online", max_examples=10, dims=(1, 2),
                  modes=("online",), **FAST)
    assert "train" in err.case


def test_check_block_reports_a_block_that_rejects_everything(blocks):
    blocks.append("t_never")
    BlockConfig("t_never").branch("kxk").requires(lambda g: False, "never").register()
    err = _expect("applies to some geometry", check_block, "t_never", max_examples=4, **FAST)
    assert "never" in err.detail


def test_check_block_unknown_name():
    with pytest.raises(RegistrationError):
        check_block("t_no_such_block")


def test_check_block_shrinks_to_a_small_failing_geometry(blocks):
    blocks.append("t_stride2")
    register_block("t_stride2", lambda geom: _conv_like(geom, stride=1))
    with pytest.raises(CheckFailure) as info:
        check_block("t_stride2", max_examples=30, derandomize=True, dims=(1,))
    # shrunk: a 1-d stride-2 conv with small channels
    assert "1d 1->1" in info.value.case and "s=2" in info.value.case


# -- check_rule ----------------------------------------------------------------------------------


class ScaleLayer(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.gamma.view(shape) + self.beta.view(shape)


class SquaredGain(ScaleLayer):
    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.gamma.square().view(shape) + self.beta.view(shape)


class ConvReLU(nn.Module):
    """Not linear: conv then ReLU."""

    def __init__(self, channels: int, dims: int) -> None:
        super().__init__()
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


@pytest.fixture
def rules():
    targets: list = []
    yield targets
    for t in targets:
        unregister_rule(t)


def test_check_rule_passes_on_a_correct_rule(rules):
    rules.append(ScaleLayer)
    RuleConfig(ScaleLayer).affine(scale="gamma", shift="beta").example(ScaleLayer).register()
    res = RuleConfig(ScaleLayer).affine(scale="gamma", shift="beta").example(ScaleLayer).check(
        max_examples=10, derandomize=True)
    assert res.accepted == 10
    for prop in ("module is affine", "unfolded expr == module", "folded kernel == module", "exact fold",
                 "fold(model) == model", "fold absorbs the layer"):
        assert prop in res.properties


def test_check_rule_catches_a_linear_rule_for_a_nonlinear_layer(rules):
    rules.append(ConvReLU)
    register_rule(ConvReLU, lambda m, info: A.Conv.from_module(m.conv))
    err = _expect("module is affine", check_rule, ConvReLU, make_module=ConvReLU, max_examples=10, **FAST)
    assert "ConvReLU with" in err.case and "input channels" in err.case and "-d" in err.case


def test_check_rule_catches_a_wrong_lowering(rules):
    # the subclass inherits the base rule, but computes something else
    rules += [ScaleLayer]
    RuleConfig(ScaleLayer).affine(scale="gamma", shift="beta").register()
    err = _expect("unfolded expr == module", check_rule, SquaredGain, make_module=SquaredGain, max_examples=10,
                  **FAST)
    assert "SquaredGain" in err.case
    # registering its own correct rule fixes it
    rules.append(SquaredGain)
    RuleConfig(SquaredGain).affine(scale=lambda m: m.gamma.square(), shift="beta").register()
    assert check_rule(SquaredGain, make_module=SquaredGain, max_examples=5, **FAST).accepted == 5


def test_check_rule_catches_an_inexact_lowering(rules):
    class PadLayer(nn.Module):
        def forward(self, x):
            return nn.functional.pad(x, [1, 1] * (x.dim() - 2))

    rules.append(PadLayer)
    # claims a biased 1x1 then a padded identity: bias + zero-padding is not exact at borders
    register_rule(PadLayer, lambda m, info: A.Bias(info.in_channels, info.dims, init=1.0)
                  >> A.ZeroPad(info.in_channels, info.dims, 1))
    _expect("exact fold", check_rule, PadLayer, make_module=PadLayer, max_examples=5, **FAST)


def test_check_rule_requires_a_rule_and_some_lowering(rules):
    class Lonely(nn.Module):
        def forward(self, x):
            return x

    _expect("has a rule", check_rule, Lonely, make_module=Lonely, max_examples=2, **FAST)
    rules.append(Lonely)
    register_rule(Lonely, lambda m, info: None)  # always opaque
    _expect("lowers to an Expr", check_rule, Lonely, make_module=Lonely, max_examples=3, **FAST)


def test_blockconfig_check_and_failure_pickles(blocks):
    import pickle

    blocks.append("t_cfgcheck")
    cfg = BlockConfig("t_cfgcheck").branch("kxk").branch("1x1>avg", init=0.5).register()
    res = cfg.check(max_examples=5, use_deploy=False, **FAST)
    assert res.accepted == 5 and "t_cfgcheck" in res.subject
    err = CheckFailure("block 'b'", "geometry", "geometry conv(2d 1->1, k=1)", "stride")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.prop == "geometry"


_C = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_P = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _frozen_bn(channels):
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d(channels)


@pytest.mark.parametrize("target,make,dims", [
    (nn.Conv2d, lambda channels, dims: _C[dims](channels, 5, 3, padding=1, stride=2), (1, 2)),
    (nn.BatchNorm2d, lambda channels, dims: _BN[dims](channels), (1, 2, 3)),
    (nn.AvgPool2d, lambda dims: _P[dims](3, 1, 1), (1, 2)),
    (nn.ConstantPad2d, lambda: nn.ConstantPad2d((1, 0, 2, 1), 0.0), (2,)),
    (nn.Identity, nn.Identity, (1, 2, 3)),
    ("FrozenBatchNorm2d", _frozen_bn, (2,)),
], ids=["conv", "bn", "avgpool", "pad", "identity", "frozen_bn"])
def test_check_rule_passes_on_builtin_rules(target, make, dims):
    if target == "FrozenBatchNorm2d":
        target = type(_frozen_bn(1))
    res = check_rule(target, make_module=make, dims=dims, max_examples=5, derandomize=True)
    assert res.accepted == 5 and "fold(model) == model" in res.properties


# -- randomize_bn -------------------------------------------------------------------------------


def test_randomize_bn_settings():
    def net():
        return nn.Sequential(nn.BatchNorm2d(64), nn.BatchNorm1d(64, track_running_stats=False)).double()

    a, b = net(), rc.testing.randomize_bn(net(), torch.Generator().manual_seed(0))  # positional generator
    rc.testing.randomize_bn(a)  # default: a generator seeded with 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (a[0].weight < 0).any() and (a[1].weight < 0).any()  # signs flipped; untracked BN randomized

    m = rc.testing.randomize_bn(net(), mean_std=0.0, var_range=(2.0, 3.0), bias_std=0.0, flip_prob=0.0,
                                skip_untracked=True, draw_dtype=torch.float32)
    assert not m[0].running_mean.any() and not m[0].bias.any()
    assert ((m[0].running_var >= 2.0) & (m[0].running_var <= 3.0)).all()
    assert ((m[0].weight >= 0.5) & (m[0].weight <= 1.5)).all()
    assert torch.equal(m[1].weight, torch.ones(64, dtype=torch.float64))  # skipped
    for bad in (dict(var_range=(0.0, 1.0)), dict(flip_prob=1.5), dict(draw_dtype=torch.int64)):
        with pytest.raises(rc.UnsupportedError, match="randomize_bn"):
            rc.testing.randomize_bn(net(), **bad)


def test_randomize_bn_takes_an_int_seed_and_refuses_junk() -> None:
    import pytest
    from torch import nn

    from repcompiler.errors import UnsupportedError
    from repcompiler.testing import randomize_bn

    a, b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    randomize_bn(a, 3)
    randomize_bn(b, torch.Generator().manual_seed(3))
    assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.weight, b.weight)
    with pytest.raises(UnsupportedError, match="generator must be"):
        randomize_bn(a, "3")

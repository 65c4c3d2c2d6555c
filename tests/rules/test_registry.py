"""The open registries: rules and blocks, their fluent/declarative forms
(:mod:`repcompiler.config`), and that a user's registration works end to end in
``fold``, ``orepa_transform`` (whole-model and per-layer policies, online and
offline) and ``deploy`` with no extra code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repcompiler as rc
import repcompiler.algebra as A
from repcompiler.blocks import ConvGeometry, available_blocks, build_block, get_block, register_block, unregister_block
from repcompiler.config import BlockConfig, Branch, RuleConfig, block, rule
from repcompiler.errors import RegistrationError, UnsupportedError
from repcompiler.online.conv import OfflineBlock, OnlineConv
from repcompiler.rules import LowerInfo, lookup_rule, register_rule, unregister_rule

from helpers import randomize_bn, rel_err

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


pytestmark = pytest.mark.usefixtures("torch_single_thread")  # conftest: tiny tensors, one intra-op thread


# -- user layers ----------------------------------------------------------------------------


class ScaleLayer(nn.Module):
    """Per-channel ``x * weight + bias`` with an op fold has no rule for (addcmul)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))


class SubScale(ScaleLayer):
    """Same computation: matches the base's rule."""


class DoubledScale(ScaleLayer):
    """Computes ``2 * (x * weight + bias)``: needs (and gets) its own rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class Roll(nn.Module):
    """Linear but unknown to repcompiler (no rule): must stay opaque."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=1)


def _randomize_scale(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, ScaleLayer):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    return m


@pytest.fixture
def scale_rule():
    RuleConfig(ScaleLayer).affine(scale="weight", shift="bias").register(override=True)
    yield
    for t in (ScaleLayer, SubScale, DoubledScale):
        unregister_rule(t)


@pytest.fixture
def cleanup_blocks():
    names: list[str] = []
    yield names
    for n in names:
        unregister_block(n)


def geom(cin, cout, k, *, s=1, p=None, d=1, g=1, dims=2, bias=False) -> ConvGeometry:
    ks = (k,) * dims if isinstance(k, int) else tuple(k)
    if p is None:
        pads = tuple((d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2) for kk in ks)
    elif isinstance(p, int):
        pads = ((p, p),) * dims
    else:
        pads = tuple(p)
    return ConvGeometry(cin, cout, ks, (s,) * dims, pads, (d,) * dims, g, dims, bias)


# -- duplicate names / override -------------------------------------------------------------------


def test_block_registry_duplicate_raises_unless_override(cleanup_blocks):
    cleanup_blocks.append("t_dup")
    build = BlockConfig("t_dup").branch("kxk").build
    register_block("t_dup", build)
    with pytest.raises(RegistrationError, match="already registered"):
        register_block("t_dup", build)
    with pytest.raises(RegistrationError, match="already registered"):
        BlockConfig("t_dup").branch("kxk").register()
    other = BlockConfig("t_dup").branch("kxk").branch("1x1").register(override=True)
    assert get_block("t_dup") == other.build
    # the built-ins are protected the same way
    with pytest.raises(RegistrationError):
        BlockConfig("repvgg").branch("kxk").register()
    assert "repvgg" in available_blocks()


def test_rule_registry_duplicate_raises_unless_override(scale_rule):
    with pytest.raises(RegistrationError, match="already registered"):
        register_rule(ScaleLayer, lambda m, info: None)
    with pytest.raises(RegistrationError, match="already registered"):
        RuleConfig(ScaleLayer).affine(scale="weight").register()
    with pytest.raises(RegistrationError, match="already registered"):
        rule(ScaleLayer)(lambda m, info: None)
    new = RuleConfig(ScaleLayer).affine(scale="weight").register(override=True)
    assert lookup_rule(ScaleLayer) is not None and new.target is ScaleLayer
    # a built-in rule too
    with pytest.raises(RegistrationError):
        register_rule(nn.Conv2d, lambda m, info: None)


def test_registration_validates_its_input():
    with pytest.raises(RegistrationError):
        BlockConfig("")
    with pytest.raises(RegistrationError, match="no branches"):
        BlockConfig("t_empty").register()
    with pytest.raises(RegistrationError, match="unknown branch"):
        BlockConfig("t_bad").branch("5x5")
    with pytest.raises(RegistrationError, match="pointwise"):
        Branch.conv() >> Branch.conv()
    with pytest.raises(RegistrationError):
        BlockConfig("t_bad").scaling("matrix")
    with pytest.raises(RegistrationError):
        RuleConfig(ScaleLayer).register()  # no lowering
    with pytest.raises(RegistrationError):
        RuleConfig(42)  # neither a type nor a function
    with pytest.raises(RegistrationError, match="not an nn.Module"):
        RuleConfig(int).lower(lambda m, i: None).register()
    with pytest.raises(RegistrationError):
        RuleConfig(ScaleLayer).affine()
    with pytest.raises(RegistrationError, match="no block named"):
        get_block("t_never_registered")


# -- rules: MRO, opaque, fluent forms -----------------------------------------------------------


def test_subclass_matches_base_rule_unless_it_registers_its_own(scale_rule):
    base_rule = lookup_rule(ScaleLayer)
    assert lookup_rule(SubScale) is base_rule
    assert lookup_rule(SubScale(3)) is base_rule
    assert lookup_rule(DoubledScale) is base_rule  # until it registers its own

    RuleConfig(DoubledScale).lower(
        lambda m, info: A.Affine(info.in_channels, info.dims, scale=2 * m.weight.detach(), shift=2 * m.bias.detach())
    ).register()
    assert lookup_rule(DoubledScale) is not base_rule
    assert lookup_rule(SubScale) is base_rule
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for cls in (ScaleLayer, SubScale, DoubledScale):
        m = _randomize_scale(cls(4)).double()
        expr = lookup_rule(m)(m, LowerInfo(4, 2))
        assert rel_err(expr(x), m(x)) < 1e-12, cls.__name__
        assert rel_err(expr.fold().apply(x), m(x)) < 1e-12, cls.__name__


def test_affine_rule_shares_parameters_and_when_makes_instances_opaque(scale_rule):
    m = ScaleLayer(3)
    expr = lookup_rule(m)(m, LowerInfo(3, 2))
    assert expr.scale is m.weight and expr.shift is m.bias  # trains through the expression
    # wrong channel count -> opaque (None), not an exception
    assert lookup_rule(m)(m, LowerInfo(5, 2)) is None

    RuleConfig(ScaleLayer).affine(scale="weight", shift="bias").when(
        lambda mod: bool((mod.weight != 0).all()), "a zero gain"
    ).register(override=True)
    with torch.no_grad():
        m.weight[0] = 0.0
    assert lookup_rule(m)(m, LowerInfo(3, 2)) is None
    m2 = ScaleLayer(3)
    assert isinstance(lookup_rule(m2)(m2, LowerInfo(3, 2)), A.Affine)


def test_decorator_forms(cleanup_blocks):
    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.tensor(3.0))

        def forward(self, x):
            return x * self.g

    @rule(Gain)
    def lower_gain(m, info):
        return A.Affine(info.in_channels, info.dims, scale=m.g)

    try:
        assert lookup_rule(Gain) is lower_gain
        x = torch.randn(1, 2, 4)
        assert rel_err(lower_gain(Gain(), LowerInfo(2, 1))(x), 3 * x) < 1e-6
    finally:
        unregister_rule(Gain)

    cleanup_blocks.append("t_deco")

    @block("t_deco")
    def build(geom, *, mode="online", scaling="vector"):
        return A.Conv(torch.nn.Parameter(torch.randn(geom.out_channels, geom.in_channels // geom.groups,
                                                     *geom.kernel_size)),
                      stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=geom.groups)

    assert get_block("t_deco") is build
    e = build_block("t_deco", geom(4, 4, 3))
    assert isinstance(e, A.Conv)


def test_function_rule_via_ruleconfig():
    def channel_gain(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return x * gain.view(1, -1, *([1] * (x.dim() - 2)))

    def lower(call, info):
        gain = call.arg(1, "gain")
        if call.arg(0, "x") is not rc.rules.INPUT or not isinstance(gain, torch.Tensor):
            return None
        return A.Affine(info.in_channels, info.dims, scale=gain.detach().reshape(-1))

    RuleConfig(channel_gain).lower(lower).register()
    try:
        assert lookup_rule(channel_gain) is not None
        res = rc.testing.check_rule(
            channel_gain,
            make_call=lambda channels: ((rc.rules.INPUT, torch.rand(channels) + 0.5), {}),
            max_examples=6, derandomize=True,
        )
        assert res.accepted == 6 and "folded kernel == module" in res.properties
    finally:
        unregister_rule(channel_gain)


# -- BlockConfig semantics ----------------------------------------------------------------------------

GEOMS = [
    geom(4, 4, 3),
    geom(4, 6, 3, s=2),
    geom(4, 4, 3, p=0),  # 'valid': branches smaller than the window need a placement conv
    geom(4, 8, 3, g=2, p=((0, 2), (1, 1))),
    geom(3, 3, 5, d=2),
    geom(4, 4, (3, 3, 3), dims=3),
    geom(2, 4, 5, dims=1, bias=True),
    geom(4, 4, 4),  # even kernel: torch's 'same' puts the extra pixel right
    geom(4, 12, 3, g=4),  # depthwise multiplier 3
]


def _cfg(name: str) -> BlockConfig:
    return (
        BlockConfig(name)
        .branch("kxk")
        .branch(Branch.conv(lambda g: tuple(1 if i else k for i, k in enumerate(g.kernel_size))))
        .branch("1x1", init=0.5)
        .branch(Branch.conv(dilation=2), init=0.25)
        .branch("1x1>kxk")
        .branch("1x1>avg")
        .branch("identity", optional=True)
    )


@pytest.mark.parametrize("g", GEOMS, ids=lambda g: g.describe())
@pytest.mark.parametrize("mode", ["online", "offline"])
def test_blockconfig_builds_exact_blocks_with_the_conv_geometry(g, mode):
    cfg = _cfg("t_unregistered")
    expr = cfg.build(g, mode=mode).double()
    assert expr.exactness().exact, expr.exactness()
    rc.testing.randomize_module(expr, torch.Generator().manual_seed(1))
    expr.eval()
    size = (9, 8, 7)[: g.dims]
    x = torch.randn(2, g.in_channels, *size, dtype=torch.float64)
    ref_conv = _CONV[g.dims](g.in_channels, g.out_channels, g.kernel_size, stride=g.stride,
                             dilation=g.dilation, groups=g.groups).double()
    pads = [p for pair in reversed(g.padding) for p in pair]
    want_shape = ref_conv(torch.nn.functional.pad(x, pads)).shape
    with torch.no_grad():
        y = expr(x)
        assert y.shape == want_shape
        assert rel_err(expr.fold().apply(x), y) < 1e-10
        assert rel_err(OnlineConv(expr).eval()(x), y) < 1e-10
    bns = [m for m in expr.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # the branch scales are the branches' own ``scale`` parameters (branches.<name>.scale)
    scales = [p for n, p in expr.named_parameters() if n.split('.')[-1] == 'scale']
    if mode == "offline":
        assert bns and not scales
    else:
        assert scales and not bns


def test_blockconfig_options_requires_optional_scaling_bias():
    cfg = BlockConfig("t_opts").branch("kxk").branch("identity", optional=True)
    with_id = cfg.build(geom(4, 4, 3))
    without = cfg.build(geom(4, 6, 3, s=2))  # identity impossible: dropped, not an error
    assert any(isinstance(m, A.Identity) for m in with_id.modules())
    assert not any(isinstance(m, A.Identity) for m in without.modules())
    strict = BlockConfig("t_opts2").branch("kxk").branch("identity")
    with pytest.raises(UnsupportedError, match="identity"):
        strict.build(geom(4, 6, 3, s=2))
    only2d = BlockConfig("t_opts3").branch("kxk").requires(lambda g: g.dims == 2, "2-d only")
    with pytest.raises(UnsupportedError, match="2-d only"):
        only2d.build(geom(2, 2, 3, dims=1))

    g = geom(4, 6, 3)
    n_vec = sum(p.numel() for p in cfg.build(g, scaling="vector").parameters())
    n_sca = sum(p.numel() for p in cfg.build(g, scaling="scalar").parameters())
    n_none = sum(p.numel() for p in cfg.build(g, scaling="none").parameters())
    assert n_vec == n_none + 6 and n_sca == n_none + 1
    fixed = BlockConfig("t_opts4").branch("kxk").scaling("none")
    assert sum(p.numel() for p in fixed.build(g, scaling="vector").parameters()) == 6 * 4 * 9
    assert fixed.build(geom(4, 6, 3, bias=True)).spec.has_bias  # conv bias kept (Bias leaf)
    assert not BlockConfig("t_opts5").branch("kxk").bias(False).build(geom(4, 6, 3, bias=True)).spec.has_bias
    with pytest.raises(UnsupportedError, match="mode"):
        cfg.build(g, mode="sideways")


def test_blockconfig_creates_fresh_parameters():
    cfg = _cfg("t_fresh")
    a, b = cfg.build(geom(4, 4, 3)), cfg.build(geom(4, 4, 3))
    assert not ({id(p) for p in a.parameters()} & {id(p) for p in b.parameters()})
    assert "conv(k=own)" in repr(cfg) and "optional" in repr(cfg)


# -- end to end: orepa_transform / policies / deploy / fold ------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
        self.bn2 = nn.BatchNorm2d(16)
        self.proj = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        return self.proj(torch.relu(self.bn2(self.body(x))))


def _transform(model, **kw):
    return rc.orepa_transform(model, **kw)


def _blocks(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (OnlineConv, OfflineBlock))}


def _train_some(model, x, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_registered_block_in_orepa_transform_and_deploy(mode, cleanup_blocks):
    cleanup_blocks.append("t_e2e")
    _cfg("t_e2e").requires(lambda g: not g.is_pointwise_kernel, "kxk only").register()
    torch.manual_seed(0)
    model = Net()
    t, report = _transform(model, block="t_e2e", mode=mode, return_report=True)
    blocks = _blocks(t)
    assert set(blocks) == {"stem", "body.0", "body.2"}, report
    assert all(b.block == "t_e2e" for b in blocks.values())
    assert all(isinstance(b, OnlineConv if mode == "online" else OfflineBlock) for b in blocks.values())
    assert "proj" in str(report)  # the 1x1 conv is reported, left as it is
    assert isinstance(t.proj, nn.Conv2d) and not _blocks(model)  # the user's model is untouched
    x = torch.randn(4, 3, 12, 12)
    _train_some(t, x)
    randomize_bn(t)
    with torch.no_grad():
        ref = t(x)
    d = rc.deploy(t, x)
    assert not _blocks(d)
    assert sum(isinstance(m, nn.Conv2d) for m in d.modules()) == 4
    with torch.no_grad():
        assert rel_err(d(x), ref) < 1e-5


def test_registered_block_in_per_layer_policies(cleanup_blocks):
    cleanup_blocks.append("t_pol")
    BlockConfig("t_pol").branch("kxk").branch("1x1").branch(Branch.conv((1, 3))).register()
    torch.manual_seed(0)
    model = Net()
    policy = {"stem": "t_pol", "body.0": "repvgg", "body.2": None, "proj": None}
    t = _transform(model, policy=policy)
    blocks = _blocks(t)
    assert blocks["stem"].block == "t_pol" and blocks["body.0"].block == "repvgg"
    assert "body.2" not in blocks and isinstance(t.body[2], nn.Conv2d)

    def by_callable(name, conv):
        return "t_pol" if conv.kernel_size == (3, 3) and conv.stride == (2, 2) else None

    t2 = _transform(model, policy=by_callable)
    assert {n: b.block for n, b in _blocks(t2).items()} == {"body.2": "t_pol"}
    x = torch.randn(2, 3, 10, 10)
    for tm in (t, t2):
        _train_some(tm, x, steps=1)
        randomize_bn(tm)
        with torch.no_grad():
            assert rel_err(rc.deploy(tm)(x), tm(x)) < 1e-5


def test_fold_uses_user_rules_subclass_rules_and_leaves_unregistered_layers(scale_rule):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), ScaleLayer(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), SubScale(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), Roll(), nn.Conv2d(8, 4, 1),
    )
    _randomize_scale(model)
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    folded, report = rc.fold(model, x, return_report=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
    kinds = [type(m).__name__ for m in folded]
    assert "ScaleLayer" not in kinds and "SubScale" not in kinds, report  # folded into the convs
    assert isinstance(folded[7], Roll)  # no rule: opaque
    # the convs around the opaque layer were not merged across it
    assert isinstance(folded[6], nn.Conv2d) and isinstance(folded[8], nn.Conv2d)
    assert isinstance(model[1], ScaleLayer)  # the user's model untouched


def test_unregistered_user_layer_stays_opaque_in_fold():
    # the same layer without a rule: fold cannot see through addcmul, leaves it
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _randomize_scale(ScaleLayer(8)), nn.ReLU()).eval()
    assert lookup_rule(ScaleLayer) is None
    x = torch.randn(2, 3, 7, 7)
    folded = rc.fold(model, x)
    assert isinstance(folded[1], ScaleLayer)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-6


def test_rule_declining_an_instance_keeps_it_opaque(scale_rule):
    RuleConfig(ScaleLayer).affine(scale="weight", shift="bias").when(
        lambda m: m.weight.numel() != 5, "five channels are special"
    ).register(override=True)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), _randomize_scale(ScaleLayer(5)), nn.ReLU(),
        nn.Conv2d(5, 6, 3, padding=1), _randomize_scale(ScaleLayer(6), 1),
    ).eval()
    x = torch.randn(2, 3, 7, 7)
    folded = rc.fold(model, x)
    assert isinstance(folded[1], ScaleLayer)  # declined -> opaque
    assert not isinstance(folded[4], ScaleLayer)  # lowered -> folded
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5


def test_declarative_from_dict_equals_fluent(cleanup_blocks):
    spec = {
        "name": "t_dict",
        "description": "kxk + 1x3 + 3x1 + dilated 3x3",
        "branches": [
            "kxk",
            {"kernel_size": (1, 3)},
            {"kernel_size": (3, 1)},
            {"kernel_size": 3, "dilation": 2, "init": 0.5},
            {"branch": "identity", "optional": True},
        ],
        "requires": [(lambda g: g.dims == 2, "2-d")],
    }
    cfg = BlockConfig.from_dict(spec)
    fluent = (BlockConfig("t_fluent").branch("kxk").branch(Branch.conv((1, 3))).branch(Branch.conv((3, 1)))
              .branch(Branch.conv(3, dilation=2), init=0.5).branch("identity", optional=True))
    g = geom(4, 4, 3)
    torch.manual_seed(0)
    a = cfg.build(g)
    torch.manual_seed(0)
    b = fluent.build(g)
    assert a.spec == b.spec and a.spec.kernel_size == (5, 5)
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        assert rel_err(a(x), b(x)) < 1e-6
    with pytest.raises(UnsupportedError, match="2-d"):
        cfg.build(geom(4, 4, 3, dims=1))
    cleanup_blocks.append("t_dict")
    cfg.register()
    assert get_block("t_dict") == cfg.build
    with pytest.raises(RegistrationError, match="unknown keys"):
        BlockConfig.from_dict({"name": "x", "branches": ["kxk"], "colour": "red"})
    with pytest.raises(RegistrationError, match="unknown branch keys"):
        BlockConfig.from_dict({"name": "x", "branches": [{"kernel": 3}]})


def test_register_validates_the_block_on_common_convs(cleanup_blocks):
    def bad_kernel(g):
        return {3: (1, 3)}[g.kernel_size[0]]  # KeyError for other kernels

    with pytest.raises(RegistrationError, match="failed to build.*KeyError"):
        BlockConfig("t_badlambda").branch("kxk").branch(Branch.conv(bad_kernel)).register()

    def inexact(geom):  # a biased conv before a zero-padded one: not exact at the borders
        c = geom.in_channels
        return A.Conv(nn.Parameter(torch.randn(c, c, *(1,) * geom.dims)), nn.Parameter(torch.ones(c))) >> \
            A.Conv(nn.Parameter(torch.randn(geom.out_channels, c // geom.groups, *geom.kernel_size)),
                   padding=geom.padding, stride=geom.stride, groups=geom.groups)

    with pytest.raises(RegistrationError, match="does not fold exactly"):
        BlockConfig("t_inexact").branch(Branch.custom(inexact)).register()
    assert "t_badlambda" not in available_blocks() and "t_inexact" not in available_blocks()
    cleanup_blocks.append("t_novalidate")
    BlockConfig("t_novalidate").branch(Branch.custom(inexact)).register(validate=False)  # the user's call
    assert "t_novalidate" in available_blocks()

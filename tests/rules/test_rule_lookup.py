"""The rule registry: lookup by MRO, duplicates refused, opaque instances."""

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler import algebra as A
from repcompiler.errors import RegistrationError
from repcompiler.rules import LowerInfo, RuleRegistry, default_rules


class MyConv(nn.Conv2d):
    pass


def test_subclass_uses_base_rule_until_it_registers_its_own():
    reg = default_rules().copy()
    m = MyConv(3, 4, 3)
    expr = reg.lower_module(m, LowerInfo(3, 2, "c"))
    assert isinstance(expr, A.Conv) and expr.spec.out_channels == 4
    reg.register(MyConv, lambda mod, info: None)
    assert reg.lower_module(m, LowerInfo(3, 2, "c")) is None
    assert isinstance(reg.lower_module(nn.Conv2d(3, 4, 3), LowerInfo(3, 2)), A.Conv)


def test_duplicate_registration_needs_override():
    reg = RuleRegistry()
    reg.register(nn.Conv2d, lambda m, i: None)
    with pytest.raises(RegistrationError, match="already registered"):
        reg.register(nn.Conv2d, lambda m, i: None)
    reg.register(nn.Conv2d, lambda m, i: None, override=True)


def test_non_module_class_is_refused():
    with pytest.raises(RegistrationError, match="not an nn.Module"):
        RuleRegistry().register(int, lambda m, i: None)


def test_builtin_rules_are_opaque_where_not_linear():
    reflect = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
    assert default_rules().lower_module(reflect, LowerInfo(3, 2)) is None
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    assert default_rules().lower_module(bn, LowerInfo(3, 2)) is None
    pad = nn.ConstantPad2d(1, 2.0)
    assert default_rules().lower_module(pad, LowerInfo(3, 2)) is None


def test_zero_pad_rule_matches_module():
    pad = nn.ZeroPad2d((1, 2, 0, 3))
    expr = default_rules().lower_module(pad, LowerInfo(3, 2))
    x = torch.randn(1, 3, 5, 6)
    assert torch.equal(expr(x), pad(x))
    assert torch.allclose(expr.fold().apply(x), pad(x))


def test_third_party_rule_takes_effect_once_its_module_is_imported():
    import sys
    import types

    reg = RuleRegistry()
    rule = lambda m, info: None  # noqa: E731
    reg.register_third_party("rc_test_fake_pkg.layers", "FakeNorm", rule)
    assert reg.lookup(nn.BatchNorm2d) is None  # nothing imported yet, nothing registered
    mod = types.ModuleType("rc_test_fake_pkg.layers")

    class FakeNorm(nn.BatchNorm2d):
        pass

    mod.FakeNorm = FakeNorm
    sys.modules[mod.__name__] = mod
    try:
        assert reg.lookup(FakeNorm(3)) is rule and reg.copy().lookup(FakeNorm) is rule
    finally:
        del sys.modules[mod.__name__]


def test_timm_bn_act_rule_is_in_the_global_registry():
    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    from repcompiler.rules.third_party import lower_timm_bn_act

    plain = timm_norm_act.BatchNormAct2d(4, apply_act=False)
    with_act = timm_norm_act.BatchNormAct2d(4)
    assert default_rules().lookup(plain) is lower_timm_bn_act
    assert isinstance(default_rules().lower_module(plain, LowerInfo(4, 2, "bn")), A.BatchNorm)
    assert not default_rules().declines(plain) and default_rules().declines(with_act)


def test_declines_asks_the_rule_for_the_instance():
    reg = default_rules().copy()
    assert not reg.declines(nn.Conv2d(2, 3, 3)) and reg.declines(nn.Conv2d(2, 3, 3, padding_mode="reflect"))
    assert not reg.declines(nn.ReLU())  # no rule: nothing to decline


class _Norm2d(nn.BatchNorm2d):
    pass


def test_a_buggy_rule_surfaces_as_a_rule_error():
    reg = default_rules().copy()
    reg.register(_Norm2d, lambda m, info: {}["missing"])
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _Norm2d(4)).eval()
    with pytest.raises(rc.RuleError, match=r"_Norm2d.*KeyError"):
        rc.fold(m, rules=reg)
    with pytest.raises(rc.RuleError, match="KeyError"):
        reg.lower_module(m[1], LowerInfo(4, 2, "1"))


def test_a_rule_refusing_with_a_library_error_keeps_the_module_opaque():
    def refuse(m, info):
        raise rc.UnsupportedError("not this one")

    reg = default_rules().copy()
    reg.register(_Norm2d, refuse)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _Norm2d(4)).eval()
    assert reg.probe(m[1], LowerInfo(4, 2)) is None and not reg.declines(m[1])
    folded = rc.fold(m, rules=reg)
    assert isinstance(folded[1], _Norm2d)

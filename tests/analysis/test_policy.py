"""Which block each conv gets (repcompiler.analysis.policy), checked directly.

The default policies (``"paper"``, ``"all"``) per conv geometry and per position in the
model (the first conv, a basic block's residual shortcut), user policies as a dict, a
callable or a list, and the errors for bad policies and ``block_options``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler.analysis.policy import (POLICIES, check_policy_and_options, default_block_for, policy_choice,
                                         shortcut_convs)
from repcompiler.blocks import ConvGeometry
from repcompiler.errors import RegistrationError, RepCompilerError, UnsupportedError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _geom(conv: nn.Module) -> ConvGeometry:
    return ConvGeometry.from_module(conv)


# -- the default policies per conv geometry -----------------------------------------------------


KXK = {
    "3x3": nn.Conv2d(8, 8, 3, padding=1),
    "grouped": nn.Conv2d(8, 8, 3, padding=1, groups=2),
    "depthwise": nn.Conv2d(8, 8, 3, padding=1, groups=8),
    "strided": nn.Conv2d(8, 16, 3, stride=2, padding=1),
    "dilated": nn.Conv2d(8, 8, 3, padding=2, dilation=2),
    "asymmetric": nn.Conv2d(8, 8, (1, 3), padding=(0, 1)),
    "1d": nn.Conv1d(8, 8, 3, padding=1),
    "3d": nn.Conv3d(8, 8, 3, padding=1),
    "5x5": nn.Conv2d(8, 8, 5, padding=2),
    "even": nn.Conv2d(8, 8, 8),
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", list(KXK))
def test_kxk_conv_gets_orepa(kind: str, policy: str) -> None:
    assert default_block_for(_geom(KXK[kind]), policy=policy) == "orepa"


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 16, 1), nn.Conv1d(8, 8, 1), nn.Conv2d(8, 8, 1, stride=2)])
def test_pointwise_conv_gets_orepa_1x1(conv: nn.Module) -> None:
    assert default_block_for(_geom(conv)) == "orepa_1x1"
    assert default_block_for(_geom(conv), policy="all") == "orepa_1x1"


def test_large_odd_kernel_gets_the_deep_stem() -> None:
    seven, five = _geom(nn.Conv2d(3, 8, 7, padding=3)), _geom(nn.Conv2d(3, 8, 5, padding=2))
    # paper: every odd kernel from 7, the first conv already from 5
    assert default_block_for(seven) == "orepa_large"
    assert default_block_for(five, first=True) == "orepa_large"
    assert default_block_for(five) == "orepa"
    # all: only the first conv
    assert default_block_for(seven, policy="all") == "orepa"
    assert default_block_for(five, first=True, policy="all") == "orepa_large"
    # an even large kernel is not a stem
    assert default_block_for(_geom(nn.Conv2d(3, 8, 8)), first=True) == "orepa"


def test_shortcut_1x1_stays_plain_under_the_paper_policy_only() -> None:
    g = _geom(nn.Conv2d(8, 16, 1, stride=2))
    assert default_block_for(g, shortcut=True) is None
    assert default_block_for(g, shortcut=True, policy="all") == "orepa_1x1"
    assert default_block_for(_geom(KXK["3x3"]), shortcut=True) == "orepa"  # only 1x1s stay plain


def test_reparam_1x1_false_leaves_every_1x1_plain() -> None:
    assert default_block_for(_geom(nn.Conv2d(8, 8, 1)), reparam_1x1=False) is None
    assert default_block_for(_geom(nn.Conv2d(8, 8, 1)), reparam_1x1=False, policy="all") is None
    assert default_block_for(_geom(KXK["3x3"]), reparam_1x1=False) == "orepa"


def test_another_block_goes_to_every_conv() -> None:
    for conv in (nn.Conv2d(8, 8, 1), nn.Conv2d(3, 8, 7), KXK["3x3"]):
        assert default_block_for(_geom(conv), block="dbb", first=True, shortcut=True) == "dbb"


def test_unknown_default_policy_raises() -> None:
    with pytest.raises(RepCompilerError, match="policy"):
        default_block_for(_geom(KXK["3x3"]), policy="papers")


# -- per model position: the residual shortcut analysis -------------------------------------------


class _Basic(nn.Module):
    """A basic residual block (two 3x3s) with a 1x1 projection shortcut."""

    def __init__(self, cin: int = 4, cout: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.downsample(x))


class _Bottleneck(_Basic):
    """A bottleneck (1x1, 3x3, 1x1) with a 1x1 projection shortcut."""

    def __init__(self, cin: int = 4, cout: int = 8) -> None:
        super().__init__(cin, cout)
        self.conv1 = nn.Conv2d(cin, cout, 1, stride=2, bias=False)


def test_basic_block_projection_is_a_shortcut() -> None:
    assert shortcut_convs(nn.Sequential(_Basic())) == {"0.downsample.0"}


def test_bottleneck_projection_is_not() -> None:
    assert shortcut_convs(nn.Sequential(_Bottleneck())) == set()


class _UntracedBasic(_Basic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: does not trace
            x = x + 0
        return super().forward(x)


def test_untraced_shortcut_is_found_by_name() -> None:
    assert shortcut_convs(nn.Sequential(_UntracedBasic())) == {"0.downsample.0"}


def test_transform_keeps_basic_shortcut_and_uses_the_stem_for_the_first_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4), _Basic(), _Bottleneck(8, 8),
                          nn.Conv2d(8, 8, 5, padding=2))
    _, report = rc.orepa_transform(model, return_report=True)
    blocks = {e.name: e.details["block"] for e in report.by_action("transformed")}
    assert blocks == {"0": "orepa_large", "2.conv1": "orepa", "2.conv2": "orepa", "3.conv1": "orepa_1x1",
                      "3.conv2": "orepa", "3.downsample.0": "orepa_1x1", "4": "orepa"}
    assert [e.name for e in report.by_action("kept")] == ["2.downsample.0"]
    _, report = rc.orepa_transform(model, policy="all", return_report=True)
    assert not report.by_action("kept")


# -- user policies ---------------------------------------------------------------------------


def test_dict_policy_first_matching_pattern_decides() -> None:
    conv = nn.Conv2d(8, 8, 3)
    policy = {"layer1.*": "dbb", "layer*": None, "head": "default"}
    assert policy_choice(policy, "layer1.conv", conv) == ("dbb", True)
    assert policy_choice(policy, "layer2.conv", conv) == (None, True)
    assert policy_choice(policy, "head", conv) == ("default", True)
    assert policy_choice(policy, "stem", conv) == ("default", False)


def test_callable_policy_answers_per_conv() -> None:
    def policy(name: str, conv: nn.Module) -> object:
        return {1: None, 5: True}.get(conv.kernel_size[0], "repvgg")

    assert policy_choice(policy, "a", nn.Conv2d(8, 8, 1)) == (None, True)
    assert policy_choice(policy, "b", nn.Conv2d(8, 8, 5)) == ("default", True)
    assert policy_choice(policy, "c", nn.Conv2d(8, 8, 3)) == ("repvgg", True)
    assert policy_choice(lambda n, c: False, "d", nn.Conv2d(8, 8, 3)) == (None, True)


def test_list_policy_skips_matching_names() -> None:
    conv = nn.Conv2d(8, 8, 3)
    assert policy_choice(["fc*", "head"], "head", conv) == (None, True)
    assert policy_choice(("fc*",), "body", conv) == ("default", False)


@pytest.mark.parametrize("policy", [None, "paper", "all"])
def test_default_policies_leave_the_choice_to_the_default_rule(policy: str | None) -> None:
    assert policy_choice(policy, "x", nn.Conv2d(8, 8, 3)) == ("default", False)


def test_user_policy_through_the_transform() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 1))
    _, report = rc.orepa_transform(model, policy={"0": "repvgg", "2": None}, return_report=True)
    assert {e.name: e.details["block"] for e in report.by_action("transformed")} == {"0": "repvgg",
                                                                                   "4": "orepa_1x1"}
    assert [(e.name, e.reason) for e in report.by_action("kept")] == [("2", "policy")]


# -- bad policies and options ---------------------------------------------------------------------


@pytest.mark.parametrize("answer,error,match", [
    ("no_such_block", RegistrationError, "policy for conv 'x'"),
    (3, UnsupportedError, "expected a block name"),
])
def test_bad_policy_answer_raises(answer: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        policy_choice({"*": answer}, "x", nn.Conv2d(8, 8, 3))
    with pytest.raises(error, match=match):
        policy_choice(lambda n, c: answer, "x", nn.Conv2d(8, 8, 3))


def test_policy_of_a_wrong_type_raises() -> None:
    with pytest.raises(UnsupportedError, match="policy must be"):
        policy_choice(3, "x", nn.Conv2d(8, 8, 3))  # type: ignore[arg-type]


def test_unknown_policy_name_raises_through_the_transform() -> None:
    with pytest.raises(RepCompilerError, match="policy"):
        rc.orepa_transform(nn.Sequential(nn.Conv2d(3, 8, 3)), policy="fastest")


def test_policy_and_options_are_checked() -> None:
    assert check_policy_and_options(None, "orepa", None) == ("paper", {})
    assert check_policy_and_options("all", "orepa", {"reparam_1x1": False}) == ("all", {"reparam_1x1": False})
    with pytest.raises(UnsupportedError, match="own arguments"):
        check_policy_and_options(None, "orepa", {"mode": "offline"})
    with pytest.raises(UnsupportedError, match="not accepted"):
        check_policy_and_options(None, "orepa", {"no_such_option": 1})
    with pytest.raises(UnsupportedError, match="not accepted"):
        check_policy_and_options(None, "dbb", {"reparam_1x1": False})  # read by the orepa policy only
    with pytest.raises(UnsupportedError, match="True or False"):
        check_policy_and_options(None, "orepa", {"depthwise_separable": "no"})
    with pytest.raises(UnsupportedError, match="must be a dict"):
        check_policy_and_options(None, "orepa", ["prior"])  # type: ignore[arg-type]

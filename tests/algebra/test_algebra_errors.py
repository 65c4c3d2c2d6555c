"""Bad input raises the library's own exceptions, naming the operands and the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repcompiler.algebra as A
from repcompiler.errors import (
    IncompatibleError,
    InexactFoldError,
    RegistrationError,
    RepCompilerError,
    UnsupportedError,
    check_choice,
)


def w(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_channel_mismatch_in_sequence_names_operands():
    a = A.Conv(w(4, 2, 3, 3), name="stem")
    b = A.Conv(w(5, 3, 1, 1), name="head")
    with pytest.raises(IncompatibleError) as err:
        a >> b  # raised where the composition is written
    msg = str(err.value)
    assert "stem" in msg and "head" in msg and "4 output channels feed 3 input channels" in msg


def test_dims_mismatch():
    with pytest.raises(IncompatibleError, match=r"1-d.*2-d.*dims differ"):
        A.Conv(w(2, 2, 3)) >> A.Conv(w(2, 2, 3, 3))
    with pytest.raises(IncompatibleError, match=r"differ in dims"):
        A.Conv(w(2, 2, 3)) + A.Conv(w(2, 2, 3, 3))
    with pytest.raises(IncompatibleError):
        A.Concat(A.Identity(2, 1), A.Identity(2, 3))


def test_sum_channel_mismatch():
    with pytest.raises(IncompatibleError, match=r"cannot sum branches .* 4 vs 3 output channels"):
        A.Conv(w(4, 2, 3, 3), name="a") + A.Conv(w(3, 2, 1, 1), name="b")
    with pytest.raises(IncompatibleError, match=r"read different channel counts \(2 vs 3\)"):
        A.Concat(A.Conv(w(4, 2, 3, 3)), A.Conv(w(4, 3, 1, 1)))
    with pytest.raises(IncompatibleError, match="Identity"):
        A.Identity(3, 2) + A.Conv(w(4, 3, 1, 1))


def test_unsupported_padding_mode():
    m = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(UnsupportedError, match=r"padding_mode='reflect'"):
        A.Conv.from_module(m, name="layer1.conv")
    with pytest.raises(UnsupportedError, match="layer1.conv"):
        A.Conv.from_module(m, name="layer1.conv")
    with pytest.raises(UnsupportedError, match="unknown padding"):
        A.Conv(w(2, 2, 3, 3), padding="full")
    with pytest.raises(UnsupportedError, match="stride 1"):
        A.Conv(w(2, 2, 3, 3), padding="same", stride=2, name="c")


def test_negative_padding():
    with pytest.raises(IncompatibleError, match=r"myconv: negative padding"):
        A.Conv(w(2, 2, 3, 3), padding=-1, name="myconv")
    with pytest.raises(UnsupportedError, match="negative padding"):
        A.ZeroPad(2, 2, ((0, -1), (0, 0)))
    with pytest.raises(UnsupportedError, match="padding must be between 0 and half"):
        A.AvgPool(2, 2, 3, 1, -1)
    with pytest.raises(UnsupportedError, match="padding must be between 0 and half"):
        A.AvgPool(2, 2, 3, 1, 2)


def test_bad_groups():
    with pytest.raises(IncompatibleError, match=r"g3conv: groups=3 must divide"):
        A.Conv(w(4, 2, 3, 3), groups=3, name="g3conv")
    with pytest.raises(IncompatibleError, match="groups=0"):
        A.Conv(w(4, 2, 3, 3), groups=0)


def test_bad_shapes_and_values():
    with pytest.raises(IncompatibleError, match="3-, 4- or 5-d"):
        A.Conv(w(2, 2))
    with pytest.raises(IncompatibleError, match="bias shape"):
        A.Conv(w(4, 2, 3, 3), w(3), name="c")
    with pytest.raises(IncompatibleError, match="stride"):
        A.Conv(w(4, 2, 3, 3), stride=(1, 1, 1))
    with pytest.raises(IncompatibleError, match="positive"):
        A.Conv(w(4, 2, 3, 3), stride=0)
    with pytest.raises(IncompatibleError, match="scale of shape"):
        A.Affine(3, 2, scale=w(4))
    with pytest.raises(IncompatibleError, match="shift of shape"):
        A.Affine(3, 2, shift=w(2))
    with pytest.raises(IncompatibleError, match="positive channel"):
        A.Identity(0, 2)
    with pytest.raises(IncompatibleError, match="dims must be 1, 2 or 3"):
        A.Identity(2, 4)
    with pytest.raises(UnsupportedError, match="scale kind"):
        A.Scale(3, 2, kind="matrix")
    with pytest.raises(UnsupportedError, match="AvgPool1d has no divisor_override"):
        A.AvgPool(2, 1, 3, divisor_override=2)
    with pytest.raises(UnsupportedError, match="only the 2 spatial dims"):
        A.ZeroPad.from_fpad(2, 2, (1, 1, 1, 1, 1, 1))


def test_wrong_modules():
    with pytest.raises(UnsupportedError, match="not a Conv1d/2d/3d"):
        A.Conv.from_module(nn.Linear(2, 2))
    with pytest.raises(UnsupportedError, match="not a BatchNorm"):
        A.BatchNorm(nn.LayerNorm(2))
    with pytest.raises(UnsupportedError, match="track_running_stats=False"):
        A.BatchNorm(nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(UnsupportedError, match="not an AvgPool"):
        A.AvgPool.from_module(nn.MaxPool2d(2), 3)
    with pytest.raises(UnsupportedError, match="not an Expr"):
        A.Seq(A.Identity(2, 2), nn.Identity())
    with pytest.raises(IncompatibleError, match="at least one operand"):
        A.Sum()


def test_inexact_fold_refused_with_reason():
    e = A.Conv(w(2, 2, 3, 3), padding=1, name="c1") >> A.Conv(w(2, 2, 3, 3), padding=1, name="c2")
    with pytest.raises(InexactFoldError, match=r"c2.*zero-pads the output of c1"):
        e.fold()
    with pytest.raises(InexactFoldError):
        e.to_conv()
    # strides differ: there is no folded geometry at all
    s = A.Conv(w(2, 2, 3, 3), padding=1) + A.Conv(w(2, 2, 3, 3), padding=1, stride=2)
    assert s.plan()[0] is None
    with pytest.raises(InexactFoldError, match="no folded form"):
        s.spec
    with pytest.raises(InexactFoldError, match="strides differ"):
        s.fold(check=False)


def test_misaligned_branch_outputs_raise_instead_of_broadcasting():
    # branch 1 produces a 1x1 map on a 3x3 input; a plain `+` would broadcast silently
    e = A.Identity(2, 2) + A.Conv(w(2, 2, 3, 3))
    with pytest.raises(IncompatibleError, match="spatial sizes"):
        e(torch.randn(1, 2, 3, 3, dtype=torch.float64))


def test_all_errors_are_repcompiler_errors():
    for exc in (IncompatibleError, UnsupportedError, InexactFoldError):
        assert issubclass(exc, RepCompilerError)


def test_check_choice_names_owner_option_choices_and_value():
    modes = ("online", "offline")
    check_choice("mode", "online", modes)  # a good value passes
    check_choice("mode", None, modes, allow_none=True)
    with pytest.raises(UnsupportedError) as err:
        check_choice("mode", "eager", modes, owner="block 'orepa'")
    assert str(err.value) == "block 'orepa': mode must be one of ('online', 'offline'), got 'eager'"
    with pytest.raises(UnsupportedError, match=r"^mode must be one of \('online', 'offline'\), got None$"):
        check_choice("mode", None, modes)  # None is a bad value unless allowed
    with pytest.raises(RegistrationError) as err:
        check_choice("scaling", "matrix", ("vector", "scalar"), allow_none=True, error=RegistrationError)
    assert str(err.value) == "scaling must be one of ('vector', 'scalar') or None, got 'matrix'"
    assert not isinstance(err.value, UnsupportedError)


def test_reason_messages_are_concise():
    """One message per offending pair, naming the dims, each label at most twice."""
    a = A.Conv(w(2, 2, 3, 3, 3), w(2), padding=1, name="first")
    b = A.Conv(w(2, 2, 3, 3, 3), padding=1, name="second")
    reasons = (a >> b).exactness().reasons
    assert len(reasons) == 1
    r = reasons[0]
    assert r.count("first") == 1 and r.count("second") == 1
    assert "left in dims 0, 1, 2" in r and "right in dims 0, 1, 2" in r and "bias" in r
    assert len(r) < 300
    s = A.Conv(w(2, 2, 3, 3), name="k3") + A.Conv(w(2, 2, 1, 1), name="k1")
    reasons = s.exactness().reasons
    assert len(reasons) == 1 and "dims 0, 1" in reasons[0]
    assert reasons[0].count("k3") == 1 and reasons[0].count("k1") == 1
    # in a longer chain, the prefix is named as such, not blamed on its last term only
    c = A.Conv(w(2, 2, 1, 1), w(2), name="biased") >> A.Identity(2, 2) >> A.Conv(w(2, 2, 3, 3), padding=1, name="pad")
    (r,) = c.exactness().reasons
    assert "(... >> Identity(2))" in r and "pad" in r

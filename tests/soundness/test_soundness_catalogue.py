"""Catalogue of code patterns where a transform could silently compute something else.

Each case is a small model written the way user code does it (a parameter or buffer read
outside the module that consumes it, an in-place write between two reads of one tensor,
a conv subclass overriding a method its ``forward`` calls, global hooks, tied weights,
...), and each entry point is called on it: ``fold`` (without inputs, with inputs,
``verify=False``), ``deploy``, ``linearize(init="from_bn")``,
``orepa_transform(init="from_conv")`` and that model deployed. Every call must either
return a model equal to the original (float64, eval mode, relative 1e-9), leaving the
user's model, its state, hooks and training flag as they were, or raise a
``RepCompilerError`` (never a ``VerificationError``: the structural checks must have
seen the cause) whose message names the cause. No raw exception.

Where a case's cause is something the fold report must explain (a module kept because
something else reads it, a region refused because of an in-place write), the ``fold``
report is checked for a row whose reason names it.

The table is ``CASES`` (name -> (factory, cause regex, reported)); add a row to extend it.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repcompiler as rc
from repcompiler.errors import RepCompilerError, VerificationError

C, S = 3, 6


def _bn(c: int) -> nn.BatchNorm2d:
    b = nn.BatchNorm2d(c)
    with torch.no_grad():
        b.running_mean.uniform_(-1, 1)
        b.running_var.uniform_(0.5, 2)
        b.weight.uniform_(0.5, 2)
        b.bias.uniform_(-1, 1)
    return b


class _Branches(nn.Module):
    """Two conv/BN branches on one input (RepVGG-like)."""

    def __init__(self, conv: type = nn.Conv2d) -> None:
        super().__init__()
        self.c1, self.b1 = conv(C, 4, 3, padding=1), _bn(4)
        self.c2, self.b2 = nn.Conv2d(C, 4, 1), _bn(4)


class ConvWeightRead(nn.Module):
    """``conv -> bn`` whose conv weight also scales the (nonlinear) output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.conv.weight.abs().mean()


class ConvWeightTiedLinear(nn.Module):
    """The conv's weight is also used, flattened, as a Linear's (a tied head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        z = F.adaptive_avg_pool2d(x, 3).flatten(1)
        return y + F.linear(z, self.conv.weight.flatten(1))


class BNBufferRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + self.bn.running_var.view(1, -1, 1, 1)


class BNRegularizer(nn.Module):
    """A regularizer of the BN's statistics and affine computed in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        reg = self.bn.running_var.log().sum() + self.bn.weight.abs().sum() + getattr(self.bn, "running_mean").sum()
        return torch.relu(self.bn(self.conv(x))) * reg


class BranchWeightRead(_Branches):
    """A branch conv's weight is used again on another input."""

    def forward(self, x):
        y = self.b1(self.c1(x)) + self.b2(self.c2(x))
        return torch.relu(y) + F.conv2d(torch.relu(x), self.c2.weight)


class BranchBufferRead(_Branches):
    def forward(self, x):
        y = self.b1(self.c1(x)) + self.b2(self.c2(x))
        return torch.relu(y) * self.b2.running_var.view(1, -1, 1, 1)


class TiedInBlock(nn.Module):
    """Two 3x3 branches of one block share one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(C, C, 3, padding=1), _bn(C)
        self.c2, self.b2 = nn.Conv2d(C, C, 3, padding=1, bias=False), _bn(C)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return torch.relu(self.b1(self.c1(x)) + self.b2(self.c2(x)))


class TiedChain(nn.Module):
    """Two convs in sequence share one weight Parameter (item 8: a block would untie them)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(C, C, 3, padding=1), _bn(C)
        self.c2, self.b2 = nn.Conv2d(C, C, 3, padding=1), _bn(C)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), _bn(C)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(self.conv(torch.relu(x)))


class SubmoduleCalledAlone(nn.Module):
    """A leaf block is called, and so is a conv inside it (the block reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), _bn(C))
        self.bn = _bn(C)

    def forward(self, x):
        return self.seq(x) + self.bn(self.seq[0](torch.relu(x)))


def _between(write: Callable[[torch.Tensor], Any]) -> type:
    class InPlaceBetweenBranches(_Branches):
        def forward(self, x):
            x = x.clone()
            a = self.b1(self.c1(x))
            write(x)
            return a + self.b2(self.c2(x))

    return InPlaceBetweenBranches


def _mul_(x):
    x.mul_(3.0)


def _out(x):
    torch.mul(x, 3.0, out=x)


def _setitem(x):
    x[:, :1] = 0.5


def _view(x):
    x.view(-1).add_(1.0)


def _iadd(x):
    x += 1.0


class InPlaceModule(_Branches):
    """An ``nn.ReLU(inplace=True)`` applied to the block's input between its branches."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x.clone()
        a = self.b1(self.c1(x))
        r = self.act(x)
        return a + self.b2(self.c2(x)) + r.mean(1, keepdim=True)


class BufferUpdatedInPlace(nn.Module):
    """A scale buffer updated in place (``mul_``) after it is first used: not a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 4, 3, padding=1), _bn(4)
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x):
        y = self.bn(self.conv(x)) * self.scale
        self.scale.mul_(1.0)  # an in-place update that keeps the value (the check stays deterministic)
        return y


class DoubledConv(nn.Conv2d):
    def _conv_forward(self, x, w, b):
        return F.conv2d(x, 2 * w, b, self.stride, self.padding, self.dilation, self.groups)


class ConvForwardOverride(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = DoubledConv(C, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvForwardOverrideInBlock(_Branches):
    def __init__(self) -> None:
        super().__init__(DoubledConv)

    def forward(self, x):
        return self.b1(self.c1(x)) + self.b2(self.c2(x))


class ShiftedBN(nn.BatchNorm2d):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) + 1.0


class BNCallOverride(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 4, 3, padding=1), ShiftedBN(4)
        self.bn.load_state_dict(_bn(4).state_dict())

    def forward(self, x):
        return self.bn(self.conv(x))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class UntracedOwner(nn.Module):
    """The root does not trace (control flow on the input); its forward reads a weight of
    a module inside the traced part."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Plain()

    def forward(self, x):
        y = self.body(x)
        if float(x.sum()) > -1e9:
            y = y * self.body.conv.weight.abs().mean()
        return y


class RootHookReads(Plain):
    """A forward hook of the model reads the conv's weight (outside every graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_hook(lambda m, a, out: out + m.conv.weight.sum())


class ModuleHook(Plain):
    def __init__(self) -> None:
        super().__init__()
        self.conv.register_forward_hook(lambda m, a, out: out * 2.0)


class BackwardHook(Plain):
    """A conv with a gradient hook: a block replacing it would drop the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv.register_full_backward_hook(lambda m, gin, gout: None)


def _global_forward_hook() -> Any:
    return torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: out * 1.5 if isinstance(m, nn.Conv2d) else None)


def _global_pre_hook() -> Any:
    return torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: (a[0] + 1.0,) if isinstance(m, nn.Conv2d) else None)


USE = r"read directly|called on its own|not traced|tied|same tensor|shared"
# name -> (factory, cause regex, the fold report must name it, global hook factory)
CASES: dict[str, tuple[Callable[[], nn.Module], str, bool, Callable[[], Any] | None]] = {
    "conv_weight_read": (ConvWeightRead, USE, True, None),
    "conv_weight_tied_linear": (ConvWeightTiedLinear, USE, True, None),
    "bn_buffer_read": (BNBufferRead, USE, True, None),
    "bn_regularizer": (BNRegularizer, USE, True, None),
    "branch_weight_read": (BranchWeightRead, USE, True, None),
    "branch_buffer_read": (BranchBufferRead, USE, True, None),
    "tied_in_block": (TiedInBlock, USE, False, None),
    "tied_chain": (TiedChain, USE, False, None),
    "called_twice": (CalledTwice, r"shared|more than once", True, None),
    "submodule_called_alone": (SubmoduleCalledAlone, USE, True, None),
    "mul_between_branches": (_between(_mul_), r"modified in place", True, None),
    "out_between_branches": (_between(_out), r"modified in place", True, None),
    "setitem_between_branches": (_between(_setitem), r"modified in place", True, None),
    "view_write_between_branches": (_between(_view), r"modified in place", True, None),
    "iadd_between_branches": (_between(_iadd), r"modified in place", True, None),
    "inplace_module_between_branches": (InPlaceModule, r"modified in place", True, None),
    "buffer_updated_in_place": (BufferUpdatedInPlace, r"in place", False, None),
    "conv_forward_override": (ConvForwardOverride, r"_conv_forward", False, None),
    "conv_forward_override_in_block": (ConvForwardOverrideInBlock, r"_conv_forward", False, None),
    "bn_call_override": (BNCallOverride, r"__call__", False, None),
    "untraced_owner_reads": (UntracedOwner, USE, True, None),
    "root_hook_reads": (RootHookReads, USE, True, None),
    "module_hook": (ModuleHook, r"hook", False, None),
    "backward_hook": (BackwardHook, r"hook", False, None),
    "global_forward_hook": (Plain, r"global module hooks", False, _global_forward_hook),
    "global_pre_hook": (Plain, r"global module hooks", False, _global_pre_hook),
}


# multi-branch blocks whose linearize report must say why they were not linearized
BLOCKS = {"branch_weight_read", "branch_buffer_read", "mul_between_branches", "out_between_branches",
          "setitem_between_branches", "view_write_between_branches", "iadd_between_branches",
          "inplace_module_between_branches"}


def _x() -> torch.Tensor:
    return torch.randn(2, C, S, S, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _fold(m, x):
    return rc.fold(m, return_report=True)


def _fold_x(m, x):
    return rc.fold(m, x, return_report=True)


def _fold_noverify(m, x):
    return rc.fold(m, verify=False, return_report=True)


def _deploy(m, x):
    return rc.deploy(m, return_report=True)


def _linearize(m, x):
    return rc.linearize(m, init="from_bn", return_report=True)


def _orepa(m, x):
    return rc.orepa_transform(m, init="from_conv", return_report=True)


def _orepa_deploy(m, x):
    online = rc.orepa_transform(m, init="from_conv")
    return rc.deploy(online.eval(), return_report=True)


ENTRIES: dict[str, Callable[[nn.Module, torch.Tensor], Any]] = {
    "fold": _fold, "fold_inputs": _fold_x, "fold_noverify": _fold_noverify, "deploy": _deploy,
    "linearize_from_bn": _linearize, "orepa_from_conv": _orepa, "orepa_from_conv_deploy": _orepa_deploy,
}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}


def _hooks(m: nn.Module) -> list[int]:
    return [len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules()]


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("case", list(CASES))
def test_catalogue(case: str, entry: str) -> None:
    factory, cause, reported, global_hook = CASES[case]
    torch.manual_seed(0)
    model = factory().double().eval()
    x = _x()
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
    before, flags, hooks = _state(model), [m.training for m in model.modules()], _hooks(model)
    handle = global_hook() if global_hook is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out, report = ENTRIES[entry](model, x)
            except VerificationError as exc:  # the structural checks missed the cause
                pytest.fail(f"{case}/{entry}: false or late VerificationError: {exc}")
            except RepCompilerError as exc:
                assert re.search(cause, str(exc)), f"{case}/{entry}: the error does not name the cause: {exc}"
                out = None
    finally:
        if handle is not None:
            handle.remove()
    # the user's model is untouched
    after = _state(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{case}/{entry}: the user's {k} changed"
    assert [m.training for m in model.modules()] == flags
    assert _hooks(model) == hooks
    if out is None:
        return
    out.eval()
    with torch.no_grad():
        got = out(x)
    err = _relative(got, want)
    assert err < 1e-9, f"{case}/{entry}: the returned model differs by relative {err:.3g}\n{report}"
    if (reported and entry in ("fold", "fold_inputs", "fold_noverify", "deploy")) or (
            case in BLOCKS and entry == "linearize_from_bn"):
        reasons = " | ".join(f"{e.name}: {e.reason}" for e in report.entries)
        assert re.search(cause, reasons), f"{case}/{entry}: the report does not say why:\n{report}"


def test_catalogue_cases_reach_the_patterns() -> None:
    """Each in-place case does write between the branch reads, each read case does read
    (the catalogue would pass vacuously if a factory computed nothing of the kind)."""
    x = _x()
    for name in ("mul_between_branches", "setitem_between_branches", "view_write_between_branches",
                 "out_between_branches", "iadd_between_branches", "inplace_module_between_branches"):
        m = CASES[name][0]().double().eval()
        with torch.no_grad():
            wrong = m.b1(m.c1(x)) + m.b2(m.c2(x))
            if name == "inplace_module_between_branches":
                wrong = wrong + torch.relu(x).mean(1, keepdim=True)
            assert _relative(m(x), wrong) > 1e-3, name

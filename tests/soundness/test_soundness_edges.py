"""Analysis and verification never change what a model computes.

Every entry point runs the user's code to analyse a model (traces that evaluate
parameter-only values, shape propagation, reference runs, region and whole-model
checks). Models whose code has effects: a conv under ``spectral_norm`` (the power
iteration updates ``_u``/``_v`` whenever the weight is read in training mode), an EMA
buffer updated in ``forward``, a Python counter, a forward pre-hook on the root, a head
that overwrites its input list in place (as YOLO-family heads do), BatchNorms in
training mode. For each model and each call (``fold`` with and without inputs and with
``verify=False``, ``deploy``, ``linearize(init="from_bn")``,
``orepa_transform(init="from_conv")``): the call returns a model whose eval output
equals the original's (float64, relative 1e-9), and the caller's model keeps its state
(every parameter and buffer, including the parametrization's), its Python attributes,
its hooks and its training flags. No check raises a false ``VerificationError``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils._pytree import tree_leaves

import repcompiler as rc
from repcompiler.analysis.isolation import fresh_inputs, isolated_call, preserved_state

X = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _stats(m: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, float64."""
    g = torch.Generator().manual_seed(1)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            with torch.no_grad():
                b.running_mean.copy_(torch.rand(b.num_features, generator=g) - 0.5)
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.weight.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.bias.copy_(torch.rand(b.num_features, generator=g) - 0.5)
    return m.double()


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class SpectralNet(nn.Module):
    """A spectrally normalized conv (torch.nn.utils.parametrizations) next to a plain
    conv -> BN and a RepVGG-like two-branch block; in training mode, as a user has it
    while training."""

    def __init__(self) -> None:
        super().__init__()
        self.sn = spectral_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.bn = nn.BatchNorm2d(4)
        self.a, self.b = conv_bn(4, 4), nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.sn(x)))
        return torch.relu(self.a(y) + self.b(y))


class EMANet(nn.Module):
    """Updates a buffer (an exponential moving average of its features) and a Python
    call counter in every forward, in eval mode too, and adds the EMA to its output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)
        self.register_buffer("ema", torch.zeros(1, 4, 1, 1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        self.ema.mul_(0.5).add_(0.5 * y.mean((0, 2, 3), keepdim=True))
        self.calls += 1
        return y + self.ema


class PreHooked(nn.Module):
    """A forward pre-hook on the root that rescales the input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 4), nn.ReLU(), conv_bn(4, 4))
        self.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0 + 1.0,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def hooked_both_ways() -> nn.Module:
    """A pre-hook and a forward hook on the root, each changing the values."""
    m = PreHooked()
    m.register_forward_hook(lambda mod, args, out: out * 0.5 - 1.0)
    return m


class ListHead(nn.Module):
    """Overwrites its input list in place, as a YOLO-family detection head does."""

    def __init__(self) -> None:
        super().__init__()
        self.stems = nn.ModuleList([conv_bn(3, 3), conv_bn(3, 3)])
        self.cv = conv_bn(3, 4)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        xs[0] = self.stems[0](xs[0])
        xs[1] = self.stems[1](xs[1])
        return self.cv(xs[0]) + self.cv(xs[1])


class HeadNet(nn.Module):
    """Its own forward does not trace (data-dependent control flow): the head is a
    traced unit of its own, called with a list."""

    def __init__(self) -> None:
        super().__init__()
        self.head = ListHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 1e9):
            return x
        return self.head([x, x * 2.0])


class InPlaceInput(nn.Module):
    """A traced unit that writes into its input after reading it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        x.mul_(3.0)
        return y


class InPlaceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = InPlaceInput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 1e9):
            return x
        return self.inner(x.clone())


MODELS: dict[str, Callable[[], nn.Module]] = {
    "spectral-norm-training": lambda: _stats(SpectralNet()).train(),
    "spectral-norm-eval": lambda: _stats(SpectralNet()).eval(),
    "ema-buffer": lambda: _stats(EMANet()).eval(),
    "root-pre-hook": lambda: _stats(PreHooked()).eval(),
    "root-pre-and-forward-hook": lambda: _stats(hooked_both_ways()).eval(),
    "head-overwrites-input-list": lambda: _stats(HeadNet()).eval(),
    "unit-writes-its-input": lambda: _stats(InPlaceNet()).eval(),
    "bn-training-mode": lambda: _stats(nn.Sequential(conv_bn(3, 4), nn.ReLU(), conv_bn(4, 4))).train(),
}

CALLS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "fold": lambda m: rc.fold(m),
    "fold-inputs": lambda m: rc.fold(m, X),
    "fold-no-verify": lambda m: rc.fold(m, X, verify=False),
    "deploy": lambda m: rc.deploy(m),
    "deploy-inputs": lambda m: rc.deploy(m, X),
    "linearize-from-bn": lambda m: rc.linearize(m, X, init="from_bn"),
    "transform-from-conv": lambda m: rc.orepa_transform(m, init="from_conv"),
}


def _user_state(m: nn.Module) -> Any:
    """Everything of the caller's model a call must leave as it is."""
    tensors = {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}
    attrs = [(n, {k: v for k, v in vars(mod).items() if type(v) in (bool, int, float)}) for n, mod in
             m.named_modules()]
    hooks = [(n, list(mod._forward_pre_hooks), list(mod._forward_hooks)) for n, mod in m.named_modules()]
    ids = [(k, id(v)) for k, v in m.state_dict(keep_vars=True).items()]
    return tensors, attrs, hooks, ids


def _assert_same_state(before: Any, after: Any) -> None:
    (tb, ab, hb, ib), (ta, aa, ha, ia) = before, after
    assert tb.keys() == ta.keys()
    changed = [k for k in tb if not torch.equal(tb[k], ta[k])]
    assert not changed, f"the caller's tensors changed: {changed}"
    assert ab == aa, "the caller's Python attributes (training flags, counters) changed"
    assert hb == ha and ib == ia, "the caller's hooks or tensor objects changed"


def _relative(a: Any, b: Any) -> float:
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    worst = 0.0
    for x, y in zip(la, lb):
        scale = float(y.abs().max())
        worst = max(worst, float((x - y).abs().max()) / (scale if scale > 0 else 1.0))
    return worst


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("model", list(MODELS))
def test_call_returns_the_original_and_leaves_the_caller_alone(model: str, call: str) -> None:
    m = MODELS[model]()
    reference = copy.deepcopy(m)  # taken before the call: what the returned model must compute
    before = _user_state(m)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no eligible conv ... returned unchanged", "left as it is"
            out = CALLS[call](m)
    except rc.VerificationError as exc:  # every fold here is right: a VerificationError is a false alarm
        pytest.fail(f"false VerificationError: {exc}")
    except rc.RepCompilerError as exc:  # a refusal must name its cause
        assert str(exc).strip()
        out = None
    _assert_same_state(before, _user_state(m))
    if out is not None:
        reference.eval()
        out.eval()
        with torch.no_grad():
            want, got = reference(X.clone()), out(X.clone())
        assert _relative(got, want) <= 1e-9, f"{call} changed what {model} computes"


def test_refused_spectral_norm_conv_keeps_its_power_iteration_state() -> None:
    """The transforms refuse the parametrized conv; reading its weight during analysis
    (training mode: a power-iteration step) must not leave ``_u``/``_v`` changed in the
    returned model."""
    m = MODELS["spectral-norm-training"]()
    keys = [k for k in m.state_dict() if k.startswith("sn.parametrizations")]
    for call in (lambda: rc.orepa_transform(m, init="from_conv"), lambda: rc.linearize(m),
                 lambda: rc.orepa_transform(m)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call()
        assert out.training
        for k in keys:
            assert torch.equal(out.state_dict()[k], m.state_dict()[k]), k


# ------------------------------------------------------------------ the helper itself
def test_preserved_state_restores_values_objects_and_flags() -> None:
    m = _stats(SpectralNet()).train()
    ema = _stats(EMANet()).train()
    before, before_ema = _user_state(m), _user_state(ema)
    u = m.sn.parametrizations.weight[0]._u
    with preserved_state(m, ema):
        m(X)  # power iteration, BN running stats, num_batches_tracked
        ema(X)
        ema.eval()
        with torch.no_grad():
            ema.body[0].weight.data = torch.zeros_like(ema.body[0].weight)  # .data replaced
            ema.body[1].running_var.mul_(3.0)
        ema.ema = torch.ones(1)  # a buffer rebound to another tensor
    _assert_same_state(before, _user_state(m))
    _assert_same_state(before_ema, _user_state(ema))
    assert m.sn.parametrizations.weight[0]._u is u


def test_preserved_state_restores_on_error_and_nests() -> None:
    m = _stats(EMANet()).eval()
    before = _user_state(m)
    with pytest.raises(RuntimeError):
        with preserved_state(m):
            m(X)
            with preserved_state(m.body):  # already preserved: no second snapshot
                m(X)
            raise RuntimeError("boom")
    _assert_same_state(before, _user_state(m))


def test_fresh_inputs_and_isolated_call() -> None:
    head = _stats(ListHead()).eval()
    xs = [X.clone(), X.clone() * 2]
    kept = [t.clone() for t in xs]
    first = isolated_call(head, (xs,))
    second = isolated_call(head, (xs,))
    assert torch.equal(first, second)  # the head overwrote its copy of the list, not xs
    assert all(torch.equal(a, b) for a, b in zip(xs, kept))
    copied = fresh_inputs((xs, {"k": X}, 3))
    assert copied[0] is not xs and copied[0][0] is not xs[0] and torch.equal(copied[0][0], xs[0])
    assert copied[2] == 3 and copied[1]["k"] is not X
    ema = _stats(EMANet()).eval()
    assert torch.equal(isolated_call(ema, (X,)), isolated_call(ema, (X,)))  # same state for both runs
    assert ema.calls == 0 and not ema.ema.any()

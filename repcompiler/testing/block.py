"""``check_block``: the equivalence properties of a registered block, on hypothesis-
generated conv geometries (listed in :mod:`repcompiler.testing`).

Owns :func:`check_block` and its per-case helpers.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import algebra as A
from ..blocks import MODES
from ..blocks.registry import ConvGeometry, build_block, get_block
from ..transforms.deploy import deploy
from ..errors import IncompatibleError, RegistrationError, RepCompilerError, UnsupportedError, check_choice
from ..online.conv import OfflineBlock, OnlineConv
from .common import CheckFailure, CheckResult, assert_close, case_text
from .randomize import randomize_bn, randomize_module
from .strategies import conv_geometries, hypothesis_module, run_examples

__all__ = ["check_block"]

log = logging.getLogger(__name__)

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _min_size(geom: ConvGeometry) -> tuple[int, ...]:
    spec = geom.spec
    return tuple(max(1, e + 1 - l - r) for e, (l, r) in zip(spec.extent, spec.padding))


def _out_size(geom: ConvGeometry, size: Sequence[int]) -> tuple[int, ...]:
    spec = geom.spec
    return tuple(
        (L + l + r - e - 1) // s + 1 for L, e, (l, r), s in zip(size, spec.extent, spec.padding, spec.stride)
    )


def _param_ids(expr: nn.Module) -> set[int]:
    return {id(p) for p in expr.parameters()}


def check_block(
    name: str,
    *,
    max_examples: int = 25,
    dims: Sequence[int] = (1, 2, 3),
    modes: Sequence[str] = ("online", "offline"),
    scaling: str = "vector",
    kernel_size: int | Sequence[int] | None = None,
    geometries: Any = None,
    options: dict[str, Any] | None = None,
    check_gradients: bool = True,
    use_deploy: bool = True,
    deploy_examples: int = 8,
    derandomize: bool = False,
    shrink: bool = True,
    tol: float = 1e-9,
) -> CheckResult:
    """Check the registered block ``name`` on hypothesis-generated conv geometries
    (see the module docstring for the properties).

    Args:
        name: a registered block name.
        max_examples: geometries to try (25 keeps a test fast; use hundreds for a sweep).
        dims: spatial dimensionalities to draw from (ignored with ``geometries``).
        modes: the block modes to check.
        scaling: the ``scaling`` option passed to the builder.
        kernel_size: fix the conv kernel (e.g. ``3`` for a block made for 3x3 convs).
        geometries: a hypothesis strategy of ``ConvGeometry`` (default
            :func:`conv_geometries`).
        options: extra options for the builder (only those it accepts are passed).
        check_gradients: compare online and unfolded gradients (online mode).
        use_deploy: also run :func:`repcompiler.deploy` on a model holding the block.
        deploy_examples: run ``deploy`` on at most this many examples (it traces a
            model each time; the algebra-level properties run on every example).
        derandomize: reproducible example generation.
        shrink: shrink a failure to a minimal geometry before reporting.
        tol: relative tolerance of the float64 comparisons.

    Returns:
        a :class:`CheckResult`. Raises :class:`CheckFailure` when a property fails.
    """
    get_block(name)  # RegistrationError for an unknown name
    for m in modes:
        check_choice("modes", m, MODES, owner="check_block")
    subject = f"block {name!r}"
    result = CheckResult(subject)
    strategy = geometries if geometries is not None else conv_geometries(dims, kernel_size=kernel_size)
    deploy_fn = deploy if use_deploy else None
    st = hypothesis_module().strategies
    extra = dict(options or {})

    def body(data: Any) -> None:
        geom: ConvGeometry = data.draw(strategy, label="geometry")
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        with_post_bn = data.draw(st.booleans(), label="post_bn")
        mins = _min_size(geom)
        size = tuple(data.draw(st.integers(m, m + (4 if geom.dims < 3 else 2)), label="size") for m in mins)
        result.examples += 1
        accepted_any = False
        dep = deploy_fn if result.accepted < deploy_examples else None
        for mode in modes:
            accepted_any |= _check_blockcase_text(
                name, subject, geom, mode, scaling, extra, seed, with_post_bn, size, check_gradients, dep,
                tol, result,
            )
        if accepted_any:
            result.accepted += 1
        else:
            result.rejected += 1

    run_examples(body, max_examples, derandomize, shrink)
    if result.accepted == 0:
        raise CheckFailure(
            subject, "applies to some geometry", f"all {result.examples} generated geometries",
            "the builder rejected every one; e.g. " + "; ".join(result.reasons[:3]),
        )
    log.info("%s", result)
    return result


def _build(name: str, subject: str, geom: ConvGeometry, mode: str, scaling: str, extra: dict[str, Any],
           result: CheckResult) -> A.Expr | None:
    case = case_text(geom, mode)
    try:
        return build_block(name, geom, mode=mode, scaling=scaling, **extra)
    except UnsupportedError as exc:
        result.reject(f"{geom.describe()} ({mode}): {exc}")
        return None
    except IncompatibleError as exc:
        raise CheckFailure(subject, "geometry", case, str(exc)) from None
    except RegistrationError as exc:
        raise CheckFailure(subject, "builds", case, str(exc)) from None
    except Exception as exc:  # broad on purpose: the checked block's builder is user code; report, not crash
        raise CheckFailure(subject, "builds", case, f"the builder raised {type(exc).__name__}: {exc}") from exc


def _check_blockcase_text(
    name: str, subject: str, geom: ConvGeometry, mode: str, scaling: str, extra: dict[str, Any], seed: int,
    with_post_bn: bool, size: tuple[int, ...], check_gradients: bool, deploy_fn: Callable[..., Any] | None,
    tol: float, result: CheckResult,
) -> bool:
    case = case_text(geom, mode)
    torch.manual_seed(seed)
    expr = _build(name, subject, geom, mode, scaling, extra, result)
    if expr is None:
        return False
    result.record("builds")
    result.record("geometry")
    other = _build(name, subject, geom, mode, scaling, extra, result)
    if other is not None:
        shared = _param_ids(expr) & _param_ids(other)
        if shared:
            raise CheckFailure(subject, "fresh parameters", case,
                               f"two builds share {len(shared)} parameter(s); a block must create new ones")
        result.record("fresh parameters")
    ex = expr.exactness()
    if not ex.exact:
        raise CheckFailure(subject, "exact fold", case, str(ex))
    result.record("exact fold")

    g = torch.Generator().manual_seed(seed)
    expr = expr.double()
    randomize_module(expr, g, buffers=False)
    post = randomize_bn(_BN[geom.dims](geom.out_channels).double(), g) if with_post_bn else None
    try:
        online = OnlineConv(expr, post, block=name)
    except RepCompilerError as exc:
        raise CheckFailure(subject, "exact fold", case, f"OnlineConv refused the block: {exc}") from None
    offline = OfflineBlock(expr, post, block=name)
    online.eval()
    offline.eval()
    c = geom.in_channels
    sizes = [size, tuple(s + 1 for s in size)]
    xs = [torch.randn(2, c, *s, generator=g, dtype=torch.float64) for s in sizes]
    conv = None
    for x, s in zip(xs, sizes):
        xcase = case_text(geom, mode, f"input {tuple(x.shape)}" + (", post-BN" if post is not None else ""))
        with torch.no_grad():
            try:
                ref = offline(x)
            except Exception as exc:  # broad on purpose: the checked block's forward is user code
                raise CheckFailure(subject, "output shape", xcase,
                                   f"the unfolded block raised {type(exc).__name__}: {exc}") from None
            want = (2, geom.out_channels, *_out_size(geom, s))
            if tuple(ref.shape) != want:
                raise CheckFailure(subject, "output shape", xcase,
                                   f"unfolded output {tuple(ref.shape)} != the conv's {want}")
            result.record("output shape")
            assert_close(subject, "online == unfolded (eval)", xcase, online(x), ref, tol)
            result.record("online == unfolded (eval)")
            if conv is None:
                try:
                    conv = online.to_conv()
                except RepCompilerError as exc:
                    raise CheckFailure(subject, "deployed conv == unfolded (eval)", xcase, str(exc)) from None
            assert_close(subject, "deployed conv == unfolded (eval)", xcase, conv(x), ref, tol)
            result.record("deployed conv == unfolded (eval)")
    if deploy_fn is not None:
        _check_deploy(deploy_fn, subject, geom, mode, online if mode == "online" else offline, xs[0], tol, result)
    if check_gradients and mode == "online":
        _check_gradients(subject, geom, mode, online, offline, xs[1], seed, tol, result)
    return True


def _check_deploy(deploy_fn: Callable[..., Any], subject: str, geom: ConvGeometry, mode: str, block: nn.Module,
                  x: Tensor, tol: float, result: CheckResult) -> None:
    case = case_text(geom, mode, f"input {tuple(x.shape)}")
    model = nn.Sequential(copy.deepcopy(block)).eval()
    with torch.no_grad():
        ref = model(x)
    try:
        deployed = deploy_fn(model, verify=False)
    except RepCompilerError as exc:
        raise CheckFailure(subject, "deploy() == block (eval)", case, f"deploy raised {type(exc).__name__}: {exc}") from None
    left = [type(m).__name__ for m in deployed.modules() if isinstance(m, (OnlineConv, OfflineBlock))]
    convs = [m for m in deployed.modules() if isinstance(m, A.CONV_TYPES)]
    if left or len(convs) != 1:
        raise CheckFailure(subject, "deploy() == block (eval)", case,
                           f"expected one plain conv, got {len(convs)} conv(s) and {left or 'no'} blocks left")
    with torch.no_grad():
        assert_close(subject, "deploy() == block (eval)", case, deployed(x), ref, tol)
    result.record("deploy() == block (eval)")


def _check_gradients(subject: str, geom: ConvGeometry, mode: str, online: OnlineConv, offline: OfflineBlock,
                     x: Tensor, seed: int, tol: float, result: CheckResult) -> None:
    case = case_text(geom, mode, f"input {tuple(x.shape)}, train mode" + (", post-BN" if online.post_bn is not None else ""))
    online.train()
    offline.train()
    params = [p for p in online.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed + 1)
    outs, grads = [], []
    state = {k: v.clone() for k, v in online.state_dict().items()}
    for block in (online, offline):
        online.load_state_dict(state)  # same BN running stats before each forward
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        w = torch.randn(y.shape, generator=g, dtype=y.dtype) if not outs else outs[0][1]
        gr = torch.autograd.grad((y * w).sum(), [xi, *params], allow_unused=True)
        outs.append((y.detach(), w))
        grads.append([torch.zeros_like(t) if gg is None else gg for gg, t in zip(gr, [xi, *params])])
    online.load_state_dict(state)
    online.eval()
    offline.eval()
    assert_close(subject, "online == unfolded (train)", case, outs[0][0], outs[1][0], tol)
    result.record("online == unfolded (train)")
    names = ["input"] + [n for n, p in online.named_parameters() if p.requires_grad]
    # a gradient that is analytically zero (e.g. a bias before a train-mode BN) is
    # rounding noise: compare against at least 1e-6 of the largest gradient
    top = max((max(a.abs().max().item(), b.abs().max().item()) for a, b in zip(*grads) if a.numel()), default=0.0)
    for n, a, b in zip(names, grads[0], grads[1]):
        scale = max(b.abs().max().item(), a.abs().max().item(), 1e-6 * top)
        if scale == 0.0:
            continue
        err = (a - b).abs().max().item() / scale
        if not err <= max(tol, 1e-8):
            raise CheckFailure(subject, "gradients online == unfolded (train)", case,
                               f"gradient of {n}: max relative error {err:.3g}")
    result.record("gradients online == unfolded (train)")

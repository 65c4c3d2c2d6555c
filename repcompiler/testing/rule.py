"""``check_rule``: the equivalence properties of a lowering rule, on hypothesis-
generated channel counts, dimensionalities and input sizes (listed in
:mod:`repcompiler.testing`).

Owns :func:`check_rule` and its per-case helpers.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import algebra as A
from ..blocks.registry import accepted_options
from ..errors import RepCompilerError, UnsupportedError
from ..transforms.fold import fold
from ..rules.base import INPUT, FunctionCall, LowerInfo
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry
from .common import CheckFailure, CheckResult, assert_close
from .randomize import randomize_module
from .strategies import hypothesis_module, run_examples

__all__ = ["check_rule"]

log = logging.getLogger(__name__)

from ..algebra import CONV_MODULES as _CONV


def check_rule(
    target: Any,
    make_module: Callable[..., nn.Module] | None = None,
    *,
    make_call: Callable[..., tuple[tuple, dict]] | None = None,
    rule: Callable[..., Any] | None = None,
    max_examples: int = 25,
    dims: Sequence[int] = (1, 2, 3),
    channels: Sequence[int] | int = tuple(range(1, 7)),
    randomize: bool = True,
    use_fold: bool = True,
    derandomize: bool = False,
    shrink: bool = True,
    tol: float = 1e-9,
    rules: RuleRegistry | None = None,
) -> CheckResult:
    """Check the lowering rule of ``target`` (a module type or a function) on
    hypothesis-generated channel counts, dimensionalities and input sizes (see the
    module docstring for the properties).

    Args:
        target: the module type (or function) the rule is registered for.
        make_module: builds an instance; called with the keywords it accepts among
            ``channels`` (input channels), ``dims`` (spatial dims) and ``seed``.
            Required for module targets; for function targets optional (a module
            calling the function, used for the ``fold`` check).
        make_call: function targets: ``make_call(channels=..., dims=...) -> (args,
            kwargs)`` with :data:`repcompiler.rules.registry.INPUT` marking the data input.
        rule: check this rule instead of the registered one.
        channels: the input channel counts to draw from (an int fixes it).
        randomize: perturb the module's parameters and buffers
            (:func:`randomize_module`) so defaults cannot hide a mistake.
        use_fold: also check :func:`repcompiler.fold` of ``Sequential(1x1 conv, layer)``.
        rules: the registry holding the rule and used by the ``fold`` check (default:
            the default registry).
        (other arguments as :func:`check_block`)

    Returns:
        a :class:`CheckResult`. Raises :class:`CheckFailure` when a property fails.
    """
    is_module = isinstance(target, type)
    name = getattr(target, "__qualname__", None) or repr(target)
    subject = f"rule for {name}"
    registry = rules if rules is not None else default_rules()
    lower = rule if rule is not None else registry.lookup(target)
    if lower is None:
        raise CheckFailure(subject, "has a rule", "lookup", f"no rule is registered for {name} (nor a base class)")
    if is_module and make_module is None:
        raise UnsupportedError(f"check_rule({name}): pass make_module=... to build instances")
    if not is_module and make_call is None:
        raise UnsupportedError(f"check_rule({name}): a function target needs make_call=... (see the docstring)")
    result = CheckResult(subject)
    result.record("has a rule")
    fold_fn = (lambda model, **kw: fold(model, rules=registry, **kw)) if use_fold else None
    st = hypothesis_module().strategies
    chans = (int(channels),) if isinstance(channels, int) else tuple(channels)
    dims = tuple(dims)

    def body(data: Any) -> None:
        c = data.draw(st.sampled_from(chans), label="channels")
        d = data.draw(st.sampled_from(dims), label="dims")
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        size = tuple(data.draw(st.integers(3, 7 if d < 3 else 4), label="size") for _ in range(d))
        result.examples += 1
        if _check_case(target, is_module, subject, lower, registry, make_module, make_call, c, d, seed, size,
                       randomize, fold_fn, tol, result):
            result.accepted += 1
        else:
            result.rejected += 1

    run_examples(body, max_examples, derandomize, shrink)
    if result.accepted == 0:
        raise CheckFailure(subject, "lowers to an Expr", f"all {result.examples} generated cases",
                           "the rule returned None (opaque) for every instance; e.g. " + "; ".join(result.reasons[:3]))
    log.info("%s", result)
    return result


def _call(fn: Callable[..., Any], **kw: Any) -> Any:
    """``fn`` with the keywords it accepts (a module class without its own
    ``__init__`` takes none)."""
    if isinstance(fn, type) and issubclass(fn, nn.Module) and fn.__init__ is nn.Module.__init__:
        return fn()
    return fn(**accepted_options(fn, kw))


def _subst(value: Any, x: Tensor) -> Any:
    if value is INPUT:
        return x
    if isinstance(value, (list, tuple)):
        return type(value)(_subst(v, x) for v in value)
    if isinstance(value, dict):
        return {k: _subst(v, x) for k, v in value.items()}
    return value


def _to64(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, (list, tuple)):
        return type(value)(_to64(v) for v in value)
    if isinstance(value, dict):
        return {k: _to64(v) for k, v in value.items()}
    return value


def _check_case(
    target: Any, is_module: bool, subject: str, lower: Callable[..., Any], registry: RuleRegistry,
    make_module: Callable[..., nn.Module] | None,
    make_call: Callable[..., Any] | None, c: int, d: int, seed: int, size: tuple[int, ...], randomize: bool,
    fold_fn: Callable[..., Any] | None, tol: float, result: CheckResult,
) -> bool:
    """Check the rule on one generated case; ``False`` where the rule declines it
    (returns ``None``), :class:`CheckFailure` where a property fails."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, *size, generator=g, dtype=torch.float64)
    case = f"{c} input channels, {d}-d, input {tuple(x.shape)}"
    info = LowerInfo(c, d, "layer")
    torch.manual_seed(seed)
    module = _make_module(make_module, subject, case, c, d, seed, g, randomize) if make_module is not None else None
    if is_module:
        assert module is not None
        case = f"{type(module).__name__} with " + case
        if registry.lookup(type(module)) is None and lower is registry.lookup(target):
            raise CheckFailure(subject, "has a rule", case, f"no rule applies to {type(module).__name__}")
        f, lowered = module, module
    else:
        args, kwargs = _to64(_call(make_call, channels=c, dims=d, seed=seed))  # type: ignore[arg-type]
        lowered = FunctionCall(target, tuple(args), dict(kwargs))

        def f(inp: Tensor) -> Tensor:
            return target(*_subst(tuple(args), inp), **_subst(dict(kwargs), inp))

    try:
        expr = lower(lowered, info)
    except Exception as exc:  # the rule under test is user code: any error it raises is the failure reported
        raise CheckFailure(subject, "lowers to an Expr", case, f"the rule raised {type(exc).__name__}: {exc}") from exc
    if expr is None:
        result.reject(f"{case}: the rule returned None")
        return False
    expr = _check_expr(expr, subject, case, c, d, result)
    _check_values(f, expr, x, g, subject, case, tol, result)
    if fold_fn is not None and module is not None:
        _check_fold(fold_fn, subject, module, c, d, x, seed, tol, case, result)
    return True


def _make_module(make_module: Callable[..., nn.Module], subject: str, case: str, c: int, d: int, seed: int,
                 g: torch.Generator, randomize: bool) -> nn.Module:
    """The case's module (float64, eval mode, its tensors perturbed with ``randomize``)."""
    try:
        module = _call(make_module, channels=c, dims=d, seed=seed)
    except Exception as exc:  # make_module is user code: any error it raises is the failure reported
        raise CheckFailure(subject, "make_module", case, f"make_module raised {type(exc).__name__}: {exc}") from exc
    module = module.double()
    if randomize:
        randomize_module(module, g)
    return module.eval()


def _check_expr(expr: Any, subject: str, case: str, c: int, d: int, result: CheckResult) -> A.Expr:
    """The rule's answer is an expression that folds exactly, with the case's input
    channels and dims; returns it in float64."""
    if not isinstance(expr, A.Expr):
        raise CheckFailure(subject, "lowers to an Expr", case, f"the rule returned {type(expr).__name__}")
    result.record("lowers to an Expr")
    expr = expr.double()
    try:
        spec, reasons = expr.plan()
    except RepCompilerError as exc:
        raise CheckFailure(subject, "exact fold", case, str(exc)) from None
    if spec is None or reasons:
        raise CheckFailure(subject, "exact fold", case, "not exact: " + "; ".join(reasons))
    if spec.in_channels != c or spec.dims != d:
        raise CheckFailure(subject, "input channels and dims", case,
                           f"the expression takes {spec.in_channels} channels, {spec.dims}-d")
    result.record("input channels and dims")
    result.record("exact fold")
    return expr


def _check_values(f: Callable[[Tensor], Tensor], expr: A.Expr, x: Tensor, g: torch.Generator, subject: str,
                  case: str, tol: float, result: CheckResult) -> None:
    """The layer ``f`` is affine, and the expression, unfolded and folded, computes it."""
    with torch.no_grad():
        try:
            want = f(x)
        except Exception as exc:  # the layer is user code: any error it raises is the failure reported
            raise CheckFailure(subject, "module runs", case,
                               f"the layer raised {type(exc).__name__}: {exc} (restrict dims=/channels=?)") from exc
        y = torch.randn(x.shape, generator=g, dtype=x.dtype)
        a = 0.3
        assert_close(subject, "module is affine", case + " (f(a*x+(1-a)*y) vs a*f(x)+(1-a)*f(y), a=0.3)",
                     f(a * x + (1 - a) * y), a * want + (1 - a) * f(y), max(tol, 1e-9))
        result.record("module is affine")
        assert_close(subject, "unfolded expr == module", case, expr(x), want, tol)
        result.record("unfolded expr == module")
        assert_close(subject, "folded kernel == module", case, expr.fold().apply(x), want, tol)
        result.record("folded kernel == module")


def _check_fold(fold_fn: Callable[..., Any], subject: str, module: nn.Module, c: int, d: int, x: Tensor, seed: int,
                tol: float, case: str, result: CheckResult) -> None:
    torch.manual_seed(seed)
    head = _CONV[d](c, c, 1, bias=False).double()
    model = nn.Sequential(head, copy.deepcopy(module)).eval()
    with torch.no_grad():
        want = model(x)
    try:
        folded, report = fold_fn(model, verify=True, return_report=True)
    except RepCompilerError as exc:
        raise CheckFailure(subject, "fold(model) == model", case, f"fold raised {type(exc).__name__}: {exc}") from None
    with torch.no_grad():
        assert_close(subject, "fold(model) == model", case, folded(x), want, tol)
    result.record("fold(model) == model")
    # the layer (path "1") must have been folded into a conv, or be in a region fold
    # kept on purpose (e.g. folding would make the conv bigger); not opaque/refused.
    # (nn.Identity: nothing to fold, and fold's own placeholders are nn.Identity)
    if type(module) is nn.Identity:
        return
    if not isinstance(getattr(folded, "1", None), type(module)):
        result.record("fold absorbs the layer")
        return
    entries = [e for e in getattr(report, "entries", []) if "1" in re.split(r"[^\w.]+", str(e.name))]
    if any(e.action in ("folded", "kept") for e in entries):
        result.record("fold absorbs the layer")
        return
    why = "; ".join(f"{e.name}: {e.action} ({e.reason})" for e in entries) or "no region contains it (opaque)"
    raise CheckFailure(subject, "fold absorbs the layer", case + " in Sequential(1x1 conv, layer)",
                       f"{type(module).__name__} was not folded: {why}; fold report:\n{report}")

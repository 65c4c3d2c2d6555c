"""Tracing models with ``torch.fx`` for the graph compiler.

:class:`RepTracer` is the compiler's tracer: a
:class:`~repcompiler.capture.rule_tracer.RuleTracer` (leaves: the modules the rule
registry lowers, the usual ``torch.nn`` leaves and torchvision's op modules; a module
whose rule declines it is traced into) that also traces into a norm-plus-activation
module in eval mode (:mod:`repcompiler.analysis.norm_act`: timm's ``SyncBatchNormAct``,
whose rule does not decline for lack of a declared geometry), so its norm folds and its
activation stays.

Traces are specialised on ``module.training``: :func:`trace_units` traces in whatever
mode the model is in, and the compiler puts the model in eval mode first (``linearize``
traces the training forward). ``bns_become_scales=True`` (``linearize``, whose branch
BNs become learnable affines) lets capture rewrite DBB's BN-and-pad layer around a BN
in training mode too (:mod:`repcompiler.capture.patterns`); the traced units remember
the option (``TracedUnit.options``), so an owner re-traced for its rewrite
(:func:`repcompiler.rewrite.owner.owner_graph`) is traced the same way.

Where a submodule's ``forward`` does not trace (iteration over a traced shape,
``for s in x.size()``; data-dependent control flow), :func:`trace_model` keeps the
**smallest failing submodule** as an opaque call (the innermost module whose
``forward`` raised) and traces the rest around it, retrying until the model traces
or the model's own code fails; the kept modules are listed in the graph's
:func:`~repcompiler.capture.python.capture_info` (``opaque_calls``) and in
:func:`trace_units`' ``skipped`` list. Where the model's own ``forward`` does not
trace (torchvision's detection models iterate over
proxies; RAFT has data-dependent control flow), :func:`trace_units` falls back to the
**largest submodules that do trace**: it tries the root, and on failure each child in
turn, recursively. The result lists the traced units (qualified name, module,
``GraphModule``) and the skipped modules with the reason (the tracing error); a
skipped module whose children all traced, or which holds no parameters, is not a loss,
and the report says so.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from .python import capture_info
from .rule_tracer import RuleTracer, short_reason
from ..errors import RuleError, TraceError
from ..analysis.inputs import check_rules
from ..analysis.isolation import preserved_state
from ..analysis.norm_act import match_norm_act
from ..rules.base import LowerInfo
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry

__all__ = ["RepTracer", "TracedUnit", "TraceResult", "trace_model", "trace_units"]

log = logging.getLogger(__name__)


class RepTracer(RuleTracer):
    """The compiler's tracer: a :class:`~repcompiler.capture.rule_tracer.RuleTracer` that
    also traces into norm-plus-activation modules in eval mode (see the module
    docstring)."""

    def traces_into(self, m: nn.Module) -> bool:
        return _norm_act(m, self.rules)


def _norm_act(m: nn.Module, rules: RuleRegistry) -> bool:
    """A norm-plus-activation module (:mod:`repcompiler.analysis.norm_act`): traced into in eval
    mode, so its norm folds and its activation stays."""
    mean = getattr(m, "running_mean", None)
    if not isinstance(mean, torch.Tensor):
        return False
    # a rule that lowers it (as a plain BN), or refuses the guessed geometry, keeps it a leaf
    if rules.probe(m, LowerInfo(int(mean.numel()), 2)) is not False:
        return False
    return match_norm_act(m, rules) is not None


def trace_model(model: nn.Module, *, rules: RuleRegistry | None = None, extra_leaves: Iterable[type] = (),
                bns_become_scales: bool = False) -> fx.GraphModule:
    """Trace ``model`` whole with :class:`RepTracer`; raise :class:`TraceError` naming the
    model and the reason if it does not trace. The ``GraphModule`` shares the leaf
    modules (not copies) with ``model``. ``bns_become_scales``: see the module docstring."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace_model expects an nn.Module, got {type(model).__name__}")
    check_rules(rules, "trace_model")
    _check_leaves(extra_leaves, "trace_model")
    tracer = RepTracer(rules, extra_leaves, bns_become_scales)
    # the capture evaluates parameter-only values of the user's code (a parametrization's
    # power iteration, an in-place buffer update): none of it may stay in the model
    opaque: list[tuple[str, str]] = []
    with preserved_state(model):
        while True:
            try:
                graph = tracer.trace(model)
                break
            except RuleError:  # a bug in a rule, not a module that does not trace
                raise
            except Exception as exc:  # the model's forward is arbitrary code, and fx raises many types
                failed = tracer.failed
                if failed is None or failed[0] is model or id(failed[0]) in tracer.opaque:
                    raise TraceError(f"{type(model).__name__} does not trace with torch.fx: {short_reason(exc)}") from exc
                # the smallest failing submodule stays an opaque call; the rest of the model traces
                tracer.opaque[id(failed[0])] = failed[2]
                opaque.append((failed[1], failed[2]))
                log.info("%s: %s does not trace (%s); kept as an opaque call", type(model).__name__, failed[1],
                         failed[2])
        capture_info(graph).opaque_calls.extend(opaque)
        _resolve_string_types(graph, type(model).forward)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _check_leaves(extra_leaves: object, title: str) -> None:
    """Raise :class:`TraceError` unless ``extra_leaves`` is a collection of module types."""
    ok = isinstance(extra_leaves, (list, tuple, set, frozenset)) and all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in extra_leaves)
    if not ok:
        raise TraceError(f"{title}: extra_leaves must be a list or tuple of nn.Module subclasses, "
                         f"got {extra_leaves!r}")


def _resolve_string_types(graph: fx.Graph, forward: Any) -> None:
    """Replace string annotations on ``graph``'s inputs and output by the types they name.

    fx copies ``forward.__annotations__`` onto the placeholder and output nodes; under
    ``from __future__ import annotations`` those are strings, which fx's code emits as a
    ``_Tensor_ = 'Tensor'`` global that ``torch.jit.script`` cannot resolve in a
    rewritten forward. Resolve them in ``forward``'s module (as ``typing.get_type_hints``
    does); an annotation that does not resolve is dropped.
    """
    nodes = [n for n in graph.nodes if n.op in ("placeholder", "output") and isinstance(n.type, str)]
    if not nodes:
        return
    try:
        hints = typing.get_type_hints(forward)
    except Exception:  # evaluates the user's annotation strings: a name only imported under TYPE_CHECKING, ...
        hints = {}
    for n in nodes:
        n.type = hints.get("return" if n.op == "output" else str(n.target).lstrip("*"))


@dataclass
class TracedUnit:
    """A submodule that traced: ``path`` ('' for the root), the module and its graph;
    ``options``: the tracing options it was traced with (:func:`trace_model` keywords),
    for a re-trace of a part of it to match."""

    path: str
    module: nn.Module
    gm: fx.GraphModule
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceResult:
    """What :func:`trace_units` traced and what it skipped (``(path, reason)``)."""

    units: list[TracedUnit] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """True when the root traced as a whole."""
        return len(self.units) == 1 and self.units[0].path == "" and not self.skipped


def _has_forward(m: nn.Module) -> bool:
    fwd = type(m).forward
    return fwd is not nn.Module.forward and not isinstance(m, (nn.ModuleList, nn.ModuleDict))


def trace_units(
    model: nn.Module, *, rules: RuleRegistry | None = None, extra_leaves: Iterable[type] = (),
    bns_become_scales: bool = False,
) -> TraceResult:
    """Trace ``model``, falling back to the largest submodules that trace.

    Modules that are leaves themselves (have a rule, or are standard ``torch.nn``
    leaves) are not traced on their own: there is nothing inside them to rewrite.
    ``bns_become_scales``: see the module docstring.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace_units expects an nn.Module, got {type(model).__name__}")
    check_rules(rules, "trace_units")
    _check_leaves(extra_leaves, "trace_units")
    rules = rules if rules is not None else default_rules()
    result = TraceResult()
    tracer_probe = RepTracer(rules, extra_leaves)
    options = {"bns_become_scales": True} if bns_become_scales else {}

    def visit(path: str, m: nn.Module) -> None:
        if _has_forward(m):
            if path and tracer_probe.is_leaf_module(m, path):
                return
            try:
                gm = trace_model(m, rules=rules, extra_leaves=extra_leaves, **options)
            except TraceError as exc:
                reason = str(exc.__cause__ and short_reason(exc.__cause__) or exc)
                has_params = any(True for _ in m.parameters(recurse=False)) or any(
                    True for _ in m.buffers(recurse=False)
                )
                result.skipped.append((path or "<root>", reason + (" (own tensors not folded)" if has_params else "")))
                log.info("could not trace %s (%s); tracing its children", path or "<root>", reason)
            else:
                result.units.append(TracedUnit(path, m, gm, options))
                for p, why in capture_info(gm).opaque_calls:
                    qp = f"{path}.{p}" if path else p
                    result.skipped.append((qp, f"{why} (called as an opaque module; {path or '<root>'} traced "
                                               "around it; its children are traced on their own)"))
                    for name, child in m.get_submodule(p).named_children():
                        visit(f"{qp}.{name}", child)
                return
        for name, child in m.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return result


"""Tracing models with ``torch.fx`` for the graph compiler.

:class:`RepTracer` is an ``fx.Tracer`` whose leaf modules are

* every module with a lowering rule in the rule registry (MRO lookup, so subclasses of
  ``nn.Conv2d`` and ``OnlineConv`` blocks are leaves: the compiler lowers them whole),
  **unless the rule declines that instance** (:meth:`RuleRegistry.declines
  <repcompiler.rules.registry.RuleRegistry.declines>`, asked once per module): then its
  ``forward`` is traced, so e.g. timm's ``BatchNormAct2d`` with a ReLU becomes
  ``F.batch_norm`` (which folds) followed by the ReLU. A module in training mode stays
  a leaf (its traced ``forward`` would bake the training branch, batch statistics and
  all, into a rewritten owner's code) unless it is a conv subclass whose ``forward``
  does not read ``self.training`` (DBB's identity-based 1x1: the same code in both
  modes), and so does one with forward hooks of its own. A norm-plus-activation module
  (:mod:`repcompiler.analysis.norm_act`: timm's ``SyncBatchNormAct``, whose rule does not
  decline for lack of a declared geometry) is traced into in eval mode too (tracing into it would run
  the hooks on proxies);
* the usual ``torch.nn`` leaves (activations, pooling, linear, ... but not containers);
* torchvision's op modules that do not trace (RoI ops, deformable conv, ...),

and it autowraps ``math`` and the ``torchvision.ops`` functions, as torchvision's own
feature extractor does.

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
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torchvision.ops as tvops
from torch import nn

from .python import CaptureTracerMixin, capture_info
from ..errors import RuleError, TraceError
from ..analysis.inputs import check_rules
from ..analysis.isolation import preserved_state
from ..rules.base import LowerInfo
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry, has_forward_hooks

__all__ = ["RepTracer", "TracedUnit", "TraceResult", "trace_model", "trace_units"]

log = logging.getLogger(__name__)

_TV_OPAQUE_OPS = (
    "RoIAlign",
    "RoIPool",
    "PSRoIAlign",
    "PSRoIPool",
    "MultiScaleRoIAlign",
    "DeformConv2d",
    "StochasticDepth",
    "DropBlock2d",
    "DropBlock3d",
)


_TV_LEAVES = tuple(getattr(tvops, n) for n in _TV_OPAQUE_OPS if hasattr(tvops, n))


class RepTracer(CaptureTracerMixin, fx.Tracer):
    """``fx.Tracer`` whose leaves are rule-registered modules plus the usual ``torch.nn``
    leaves (see the module docstring). ``extra_leaves`` adds module types to keep opaque."""

    proxy_buffer_attributes = True
    """Buffers read in traced code (``self.bn.running_var``) are ``get_attr`` nodes, as
    parameters are: every read of a module's tensors is visible (:mod:`repcompiler.analysis.uses`),
    and an in-place update of a buffer is a node, not a write done while tracing."""

    def __init__(self, rules: RuleRegistry | None = None, extra_leaves: Iterable[type] = (),
                 bns_become_scales: bool = False) -> None:
        super().__init__(autowrap_modules=(math, tvops))
        self.bns_become_scales = bns_become_scales
        self.rules = rules if rules is not None else default_rules()
        self.extra_leaves = tuple(extra_leaves) + _TV_LEAVES
        self._declined: dict[int, bool] = {}
        self.opaque: dict[int, str] = {}
        """``id(module) -> reason``: submodules kept as opaque calls because their own
        ``forward`` does not trace (see :func:`trace_model`)."""
        self.failed: tuple[nn.Module, str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, fx.GraphModule):
            return False
        if id(m) in self.opaque:
            return True
        if self.rules.lookup(m) is not None and not self._declines(m):
            return True
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def _declines(self, m: nn.Module) -> bool:
        """Whether ``m``'s rule declines it (cached per module; asked before tracing,
        since fx patches parameter access while it traces)."""
        if id(m) not in self._declined:
            self._declined[id(m)] = ((not m.training or _mode_free_conv(m)) and not has_forward_hooks(m)
                                     and (self.rules.declines(m) or (not m.training and _norm_act(m, self.rules))))
        return self._declined[id(m)]

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # the module's own forward may raise anything: note where, re-raise
            if self.failed is None:  # the innermost module whose forward failed
                self.failed = (m, self.path_of_module(m), _short(exc))
            raise

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.failed = None
        if isinstance(root, nn.Module):
            for m in root.modules():
                if self.rules.lookup(m) is not None:
                    self._declines(m)
        return super().trace(root, concrete_args)


def _norm_act(m: nn.Module, rules: RuleRegistry) -> bool:
    """A norm-plus-activation module (:mod:`repcompiler.analysis.norm_act`): traced into in eval
    mode, so its norm folds and its activation stays."""
    from ..analysis.norm_act import match_norm_act  # traces with this module's tracer: imported late

    mean = getattr(m, "running_mean", None)
    if not isinstance(mean, torch.Tensor):
        return False
    # a rule that lowers it (as a plain BN), or refuses the guessed geometry, keeps it a leaf
    if rules.probe(m, LowerInfo(int(mean.numel()), 2)) is not False:
        return False
    return match_norm_act(m, rules) is not None


def _mode_free_conv(m: nn.Module) -> bool:
    """A conv subclass whose own ``forward`` does not read ``self.training``: tracing
    into it gives the same code in training and eval mode."""
    fwd = getattr(type(m).forward, "__code__", None)
    return isinstance(m, nn.modules.conv._ConvNd) and fwd is not None and "training" not in fwd.co_names


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
                    raise TraceError(f"{type(model).__name__} does not trace with torch.fx: {_short(exc)}") from exc
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


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else type(exc).__name__
    first = first.split(". This can be attempted")[0]  # fx's long iteration hint
    return f"{type(exc).__name__}: {first[:200]}"


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
                reason = str(exc.__cause__ and _short(exc.__cause__) or exc)
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


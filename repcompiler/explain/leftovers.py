"""Why each BatchNorm is still there after ``fold``: no BN is left in silence.

After :func:`repcompiler.fold` (and ``deploy``), every ``BatchNorm`` module the folded
model still holds gets a report row (action ``"left"``) saying why no exact fold
removed it, unless a row already names it (an opaque module's row, a folded Linear/BN1d
pair). The reasons are read from the graphs ``fold`` traced
(:func:`repcompiler.capture.tracing.trace_units`):
nodes of a folded region name the module that now computes it (the ``replaced``
map ``fold`` keeps) and identity calls are looked through, so each BN's neighbours
are described as they are in the folded model. For each BN call the reason names what
is on each side of it:

* its input comes from outside the traced part (the parent did not trace: the skip
  reason is in the report's ``skipped`` list), from a nonlinearity (``ReLU``, ...), or
  from a module / function without a lowering rule (opaque to the algebra);
* its output goes to a nonlinearity, an opaque op, the model's output, or a conv the
  algebra refused to merge it with (the refused region's row gives the reason);

and a BN inside a module that did not trace at all gets that module's skip reason.

Owns :func:`explain_left_bns`.
"""

from __future__ import annotations

from typing import Mapping

import torch.fx as fx
from torch import nn

from .report import TransformReport
from ..rewrite.owner import is_under, qualify
from ..rules.registry import RuleRegistry
from ..capture.tracing import TracedUnit, TraceResult, trace_units

__all__ = ["explain_left_bns"]

_BN = nn.modules.batchnorm._BatchNorm


def _current(model: nn.Module, name: str, fallback: nn.Module) -> nn.Module:
    """The module at ``name`` in the folded ``model`` (the graph may hold the one it replaced)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return fallback


class _Neighbours:
    """What is on each side of a BN call in a unit's graph, as the folded model computes
    it: folded regions by the module that replaced them, identity calls looked through."""

    def __init__(self, model: nn.Module, unit: TracedUnit, rules: RuleRegistry, replaced: Mapping[fx.Node, str]):
        self.model, self.unit, self.rules, self.replaced = model, unit, rules, replaced

    def _module(self, n: fx.Node) -> tuple[str, nn.Module]:
        name = qualify(self.unit.path, str(n.target))
        return name, _current(self.model, name, self.unit.gm.get_submodule(str(n.target)))

    def _identity(self, n: fx.Node) -> bool:
        return (n not in self.replaced and n.op == "call_module" and len(n.args) == 1
                and type(self._module(n)[1]) is nn.Identity)

    def inputs(self, n: fx.Node) -> fx.Node:
        while self._identity(n) and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n

    def users(self, n: fx.Node) -> list[fx.Node]:
        out: list[fx.Node] = []
        for u in n.users:
            out.extend(self.users(u) if self._identity(u) else [u])
        return list(dict.fromkeys(out))

    def describe(self, n: fx.Node) -> str:
        path, rules = self.unit.path, self.rules
        if n in self.replaced:
            name = self.replaced[n]
            return f"{name} ({type(_current(self.model, name, nn.Identity())).__name__})"
        if n.op == "placeholder":
            return f"the input of {path or 'the model'} (computed outside the traced part)"
        if n.op == "output":
            return f"the output of {path or 'the model'}"
        if n.op == "call_module":
            qname, m = self._module(n)
            name = f"{qname} ({type(m).__name__})"
            return name if rules.lookup(type(m)) is not None else f"{name}, which has no lowering rule (opaque)"
        target = getattr(n.target, "__name__", str(n.target))
        return target if n.op == "call_method" or rules.lookup(n.target) is not None else (
            f"{target}, which has no lowering rule (opaque)")


def explain_left_bns(model: nn.Module, report: TransformReport, rules: RuleRegistry,
                     traced: TraceResult | None = None, replaced: Mapping[fx.Node, str] | None = None) -> int:
    """Add a ``"left"`` row to ``report`` for every BatchNorm of ``model`` no row names
    yet (see the module docstring); return how many BNs ``model`` still holds.

    ``traced``: the capture the fold worked on (its units' graphs after the fold) and
    ``replaced``: for nodes of folded regions, the qualified name of the module that
    now computes the region. Without ``traced`` the model is traced here."""
    bns = [p for p, m in model.named_modules() if isinstance(m, _BN)]
    if not bns:
        return 0
    named = {e.name for e in report.entries}
    named |= {part.strip() for e in report.entries for part in e.name.split("->")}
    todo = [p for p in bns if p not in named]
    if not todo:
        return len(bns)
    traced = traced if traced is not None else trace_units(model, rules=rules)
    seen: set[str] = set()
    for unit in traced.units:
        gm = unit.gm
        near = _Neighbours(model, unit, rules, replaced or {})
        for n in gm.graph.nodes:
            if n.op != "call_module" or n in near.replaced:
                continue
            name = qualify(unit.path, str(n.target))
            if name not in todo or name in seen or not isinstance(_current(model, name, nn.Identity()), _BN):
                continue
            seen.add(name)
            src = near.describe(near.inputs(n.args[0])) if isinstance(n.args[0], fx.Node) else "a constant"
            dst = "; ".join(dict.fromkeys(near.describe(u) for u in near.users(n))) or "nothing"
            report.add(name, "bn", "left", f"no exact fold removes it: its input is {src}; its output goes to {dst}")
    for name in todo:
        if name in seen:
            continue
        where = [(p, why) for p, why in traced.skipped if p == "<root>" or is_under(name, p)]
        why = (f"inside {where[-1][0]}, which did not trace: {where[-1][1]}" if where
               else "not reached by the trace (a leaf module's inside)")
        report.add(name, "bn", "left", why)
    return len(bns)

"""Why each BatchNorm is still there after ``fold``: no BN is left in silence.

After :func:`repcompiler.fold` (and ``deploy``), every ``BatchNorm`` module the folded
model still holds gets a report row (action ``"left"``) saying why no exact fold
removed it, unless a row already names it (an opaque module's row, a folded Linear/BN1d
pair). The folded model is traced again (:func:`repcompiler.tracing.trace_units`, only
when a BN is left) and for each BN call the reason names what is on each side of it:

* its input comes from outside the traced part (the parent did not trace: the skip
  reason is in the report's ``skipped`` list), from a nonlinearity (``ReLU``, ...), or
  from a module / function without a lowering rule (opaque to the algebra);
* its output goes to a nonlinearity, an opaque op, the model's output, or a conv the
  algebra refused to merge it with (the refused region's row gives the reason);

and a BN inside a module that did not trace at all gets that module's skip reason.

Owns :func:`explain_left_bns`.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .report import TransformReport
from .rewrite import is_under, qualify
from .rules import RuleRegistry
from .tracing import trace_units

__all__ = ["explain_left_bns"]

_BN = nn.modules.batchnorm._BatchNorm


def _describe(gm: fx.GraphModule, n: fx.Node, path: str, rules: RuleRegistry) -> str:
    if n.op == "placeholder":
        return f"the input of {path or 'the model'} (computed outside the traced part)"
    if n.op == "output":
        return f"the output of {path or 'the model'}"
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        name = f"{qualify(path, str(n.target))} ({type(m).__name__})"
        return name if rules.lookup(type(m)) is not None else f"{name}, which has no lowering rule (opaque)"
    target = getattr(n.target, "__name__", str(n.target))
    return target if n.op == "call_method" or rules.lookup(n.target) is not None else (
        f"{target}, which has no lowering rule (opaque)")


def explain_left_bns(model: nn.Module, report: TransformReport, rules: RuleRegistry) -> int:
    """Add a ``"left"`` row to ``report`` for every BatchNorm of ``model`` no row names
    yet (see the module docstring); return how many BNs ``model`` still holds."""
    bns = [p for p, m in model.named_modules() if isinstance(m, _BN)]
    if not bns:
        return 0
    named = {e.name for e in report.entries}
    named |= {part.strip() for e in report.entries for part in e.name.split("->")}
    todo = [p for p in bns if p not in named]
    if not todo:
        return len(bns)
    traced = trace_units(model, rules=rules)
    seen: set[str] = set()
    for unit in traced.units:
        gm = unit.gm
        for n in gm.graph.nodes:
            if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), _BN):
                continue
            name = qualify(unit.path, str(n.target))
            if name not in todo or name in seen:
                continue
            seen.add(name)
            src = _describe(gm, n.args[0], unit.path, rules) if isinstance(n.args[0], fx.Node) else "a constant"
            dst = "; ".join(_describe(gm, u, unit.path, rules) for u in n.users) or "nothing"
            report.add(name, "bn", "left", f"no exact fold removes it: its input is {src}; its output goes to {dst}")
    for name in todo:
        if name in seen:
            continue
        where = [(p, why) for p, why in traced.skipped if p == "<root>" or is_under(name, p)]
        why = (f"inside {where[-1][0]}, which did not trace: {where[-1][1]}" if where
               else "not reached by the trace (a leaf module's inside)")
        report.add(name, "bn", "left", why)
    return len(bns)

"""The owner-module rewrite as a pass: replace each planned region of a traced unit by one
module, editing the user's module hierarchy in place.

:class:`RewriteOwners` runs on a traced unit's graph (:class:`~repcompiler.capture.tracing.TracedUnit`)
and applies the :class:`~repcompiler.passes.state.RewritePlan` s in
``pipeline_state(gm).plans`` with the engine of :mod:`repcompiler.rewrite.owner`:

* a region made only of module calls (and known replacement) has its modules swapped
  in place: the replacement goes to :func:`~repcompiler.rewrite.owner.conv_target`'s
  name, every other module of the region becomes ``nn.Identity``;
* a region holding a function call is squeezed into the graph of its owner (the
  deepest module whose ``forward`` created it, outermost owner when they nest), and
  the owner gets the rewritten ``forward``
  (:func:`~repcompiler.rewrite.owner.install_forward`).

What replaces the regions of one owner is decided by an :class:`OwnerBuilder`: the
default one installs the plans' modules (``fold``'s folded convs); ``linearize`` gives
one that makes online convs on the owner's graph. When an owner cannot be rewritten (a
:class:`~repcompiler.errors.RepCompilerError` from re-tracing it or from the builder),
its module-only regions are swapped in place and the others are left, recorded with
the error. A :class:`~repcompiler.errors.VerificationError` (a replacement that does
not compute what it replaces) is not such a case: it propagates.

Every outcome is a :class:`~repcompiler.passes.state.Rewrite` appended to
``pipeline_state(gm).rewrites``, in the order the rewrite happened. Usage::

    state = PipelineState(plans=[FoldPlan(region, conv, params_before)])
    run_passes(unit.gm, [RewriteOwners(unit)], state=state)
    [(r.target, r.applied) for r in state.rewrites]

Afterwards ``unit.gm`` describes the model before the rewrite (its nodes are stale;
``state.regions`` is cleared): trace again to read the rewritten model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch.fx as fx
from torch import nn

from ..capture.tracing import TracedUnit
from ..errors import RepCompilerError, VerificationError
from ..rewrite.owner import OwnerGraph, conv_target, group_by_owner, owner_graph, qualify
from .base import GraphPass, PassResult
from .squeeze import squeeze_region
from .state import Rewrite, RewritePlan, live_regions, pipeline_state

__all__ = ["Replacement", "OwnerBuilder", "RewriteOwners"]

log = logging.getLogger(__name__)


@dataclass
class Replacement:
    """The module replacing one region in its owner's graph.

    ``target``: its name relative to the owner (``None``: a fresh name); ``drop``:
    attributes of the owner's graph module to delete once the region is squeezed
    (modules the replacement absorbed); ``detail``: kept in the
    :class:`~repcompiler.passes.state.Rewrite` record for the caller's report."""

    module: nn.Module
    target: str | None
    drop: tuple[str, ...] = ()
    detail: Any = None


class OwnerBuilder:
    """Makes the replacements of the regions one owner's ``forward`` holds.

    The default installs each plan's ``module`` at the name of the region's largest
    conv. Subclass to build the replacements on the owner's graph (``og.gm`` holds the
    owner's own children; ``og.regions`` are the plans' regions mapped onto it).
    """

    def check(self, unit: TracedUnit, owner: str, plans: Sequence[RewritePlan]) -> None:
        """Raise :class:`~repcompiler.errors.RepCompilerError` to leave ``owner`` as it
        is (before it is re-traced)."""

    def build(self, unit: TracedUnit, og: OwnerGraph, plans: Sequence[RewritePlan]) -> list[Replacement]:
        """One :class:`Replacement` per plan, in order."""
        out = []
        for plan in plans:
            if plan.module is None:
                raise RepCompilerError(f"region {plan.region.name}: no replacement module planned")
            out.append(Replacement(plan.module, og.local(conv_target(unit.module, plan.region))))
        return out


class RewriteOwners(GraphPass):
    """Apply ``pipeline_state(gm).plans`` to the user's modules (module docstring).

    ``unit``: the traced unit ``gm`` is the graph of (``gm is unit.gm``);
    ``builder``: an :class:`OwnerBuilder` (default: install the planned modules).
    ``modified`` is true when a plan was applied. Requires the plans' regions to be
    regions of this graph; ensures every applied replacement is the module at its
    target.
    """

    def __init__(self, unit: TracedUnit, builder: OwnerBuilder | None = None) -> None:
        self.unit = unit
        self.builder = builder if builder is not None else OwnerBuilder()

    def requires(self, graph_module: fx.GraphModule) -> None:
        if graph_module is not self.unit.gm:
            self.fail("run it on the traced unit's own graph module")
        if not live_regions(graph_module, [p.region for p in pipeline_state(graph_module).plans]):
            self.fail("the planned regions are not regions of this graph (found on an earlier version?)")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        state = pipeline_state(graph_module)
        first = len(state.rewrites)
        groups, direct = group_by_owner(state.plans, lambda p: p.region)
        unbuilt = [p for p in direct if p.module is None]  # built on the unit's own graph
        if unbuilt:
            direct = [p for p in direct if p.module is not None]
            groups.setdefault("", []).extend(unbuilt)
        for owner, group in groups.items():
            direct += self._rewrite_owner(owner, group, state.rewrites)
        for plan in direct:
            state.rewrites.append(self._swap_modules(plan))
        done = [r for r in state.rewrites[first:] if r.applied]
        state.plans = []
        if done:
            state.regions = None  # they describe the graph before the rewrite
        return PassResult(graph_module, bool(done))

    def _rewrite_owner(self, owner: str, group: list[RewritePlan], out: list[Rewrite]) -> list[RewritePlan]:
        """Rewrite ``owner``'s forward for ``group``; return the plans to swap in place
        instead when it cannot be rewritten."""
        try:
            self.builder.check(self.unit, owner, group)
            og = owner_graph(self.unit, owner, [p.region for p in group])
            made = self.builder.build(self.unit, og, group)
            replaced: dict[fx.Node, fx.Node] = {}
            for region, rep in zip(og.regions, made):
                squeeze_region(og.gm, region, rep.module, rep.target, replaced)
            for rep in made:
                for name in rep.drop:
                    delattr(og.gm, name)
            og.finish()
        except VerificationError:
            raise
        except RepCompilerError as exc:
            where = qualify(self.unit.path, owner) or "<root>"
            log.debug("owner %s left as it is: %s", where, exc)
            fallback = [p for p in group if p.region.all_modules and p.module is not None]
            out += [Rewrite(p, owner, error=exc) for p in group if not any(p is f for f in fallback)]
            return fallback
        for plan, rep in zip(group, made):
            target = og.prefix + rep.target if rep.target else None
            out.append(Rewrite(plan, owner, target, rep.module, rep.detail))
        return []

    def _swap_modules(self, plan: RewritePlan) -> Rewrite:
        """Install a module-only region's replacement in place of its modules."""
        assert plan.module is not None
        target = conv_target(self.unit.module, plan.region)
        for t in plan.region.module_targets():
            self.unit.module.set_submodule(t, plan.module if t == target else nn.Identity())
        return Rewrite(plan, None, target, plan.module)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for r in pipeline_state(graph_module).rewrites:
            if r.applied and r.target is not None and self.unit.module.get_submodule(r.target) is not r.module:
                self.fail(f"the replacement of region {r.plan.region.name} is not the module at {r.target}")

"""Find linear regions in an fx graph and lower them into the kernel algebra.

A **region** is a single-entry single-exit subgraph made only of linear ops: one data
value ``entry`` flows in, one node ``exit`` produces the only value used outside, and
every node in between has a lowering (module rule, function rule, or is a sum /
channel concat of branches). It is found with dominators: for a linear node ``e``, the
entries it could have are its dominators ``idom(e), idom(idom(e)), ...``; the region of
``(d, e)`` is every node on a path from ``d`` to ``e``. It is valid when all those nodes
are linear and none of their values (except ``e``'s) is used outside. Validity is
monotone along the dominator chain, so the walk stops at the first invalid entry. Exits
are visited in reverse topological order, so each region is maximal; when the maximal
region is not exact the largest exact sub-region ending at ``e`` is taken instead (and
the refusal of the larger one is recorded with the algebra's reason).

Boundaries: a module called more than once in the graph, or registered at more than
one path in the model (shared weights), is **opaque**, so a shared conv is never fused
into one of its uses (``torch.fx.experimental.optimization.fuse`` gets that wrong).
``nn.Identity`` has no weights, so a shared one stays linear. A module whose tensors
or submodules are used other than by its call (``self.conv.weight`` read elsewhere, by
untraced code, or a module run inside another: :mod:`repcompiler.analysis.uses`) is opaque as
well (``pinned``), and a region whose entry is written in place between its reads is
refused (:mod:`repcompiler.analysis.effects`): the region shrinks to what is still one value
read by modules nothing else uses, and the rest folds.

Identity calls are **aliases**: a chain of ``nn.Identity`` calls starting at the entry
computes the entry's value, so it may be used outside the region too. Such a chain is
left out of the region's body, listed in ``Region.aliases`` and kept in the graph; the
region reads it as its entry. The rewrite drops identity calls
(:class:`~repcompiler.passes.cleanup.Cleanup`), so without this the region would only
become valid after folding, and one pass of ``fold`` would not reach a fixpoint.

This module owns the analysis's entry points, :func:`find_regions` and the
:class:`FindRegions` pass; the steps live in :mod:`repcompiler.passes.regions`
(lowering and channel inference, dominance, expression, selection).
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch.fx as fx
from torch import nn

from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry
from .base import GraphPass, PassResult
from .regions.dominance import dominators, entry_candidates
from .regions.lowering import CONV_FUNCTIONS, ELEMENTWISE_FUNCS, ELEMENTWISE_MODULES, LoweredGraph
from .regions.region import Region, node_owner, region_name
from .regions.expression import build_region
from .regions.selection import choose_region, worth_alone
from .state import pipeline_state

__all__ = [
    "Region",
    "find_regions",
    "FindRegions",
    "node_owner",
    "region_name",
    "CONV_FUNCTIONS",
    "ELEMENTWISE_FUNCS",
    "ELEMENTWISE_MODULES",
]

log = logging.getLogger(__name__)

def _analyse(gm: fx.GraphModule, rules: RuleRegistry | None, shared_modules: Iterable[nn.Module],
             pinned: Mapping[str, str] | None = None) -> tuple[LoweredGraph, dict]:
    """The lowered graph (classified, shapes inferred) and its immediate dominators."""
    g = LoweredGraph(gm, rules if rules is not None else default_rules(),
                     frozenset(id(m) for m in shared_modules), pinned)
    g.classify()
    g.infer_shapes()
    return g, dominators(g)


def find_regions(
    gm: fx.GraphModule,
    rules: RuleRegistry | None = None,
    *,
    shared_modules: Iterable[nn.Module] = (),
    merge_convs: bool = False,
    pinned: Mapping[str, str] | None = None,
) -> list[Region]:
    """All maximal linear regions of ``gm`` (exact or not), in graph order.

    ``shared_modules``: modules known to be used elsewhere too (e.g. registered at
    several paths of the enclosing model); they are treated as opaque. ``pinned``:
    ``{module target: reason}`` for modules of ``gm`` that code outside ``gm`` uses
    (:func:`repcompiler.analysis.uses.model_pins`); they are opaque too, as are those ``gm``'s
    own graph uses other than by calling them (:func:`repcompiler.analysis.uses.graph_pins`).

    Which regions are worth folding (``Region.foldable``): exact, holding a conv,
    not a lone plain conv already, not making the conv bigger than the convs it
    replaces (a low-rank ``1x1 -> 1x1`` bottleneck or a depthwise-separable pair stays
    factorized), and - unless ``merge_convs`` - not a plain *chain* of two or more
    convs: a model's own consecutive convs (e.g. a MobileNet projection followed by
    the next block's expansion) keep their layout, so a plain model keeps its conv
    count. Branches (sums / concats), BNs, scales, pads and pools always fold.
    When the largest region ending at a node is not worth folding, the largest
    sub-region that is (ending at the same node) is taken, without separating a
    BN/affine from the conv before it.
    """
    g, idom = _analyse(gm, rules, shared_modules, pinned)

    assigned: set[fx.Node] = set()
    regions: list[Region] = []
    for e in reversed(g.nodes):
        if e in assigned or not g.linear(e):
            continue
        cands = entry_candidates(g, idom, e, assigned)
        written = _written_region(g, e)
        if not cands:
            if written is not None:
                regions.append(written)
            continue
        chosen, refused = choose_region(g, cands, e, merge_convs)
        if written is not None and (refused is None or len(written.nodes) > len(refused.nodes)):
            refused = written
        if refused is not None:
            regions.append(refused)
        if chosen is None:
            continue
        assigned |= set(chosen.nodes)
        if not worth_alone(g, chosen):
            continue
        regions.append(chosen)
        if refused is not None:
            chosen.notes.append(f"part of the larger refused region {refused.name}")
    regions.sort(key=lambda r: g.order[r.exit])
    return regions


def _written_region(g: LoweredGraph, e: fx.Node) -> Region | None:
    """The region ending at ``e`` that an in-place write made invalid, refused with that
    reason (``None`` if there is none or it holds no conv)."""
    if e not in g.refusals:
        return None
    d, body, aliases, why = g.refusals[e]
    reg = build_region(g, d, e, body, aliases)
    reg.reasons = (*reg.reasons, why)
    return reg if reg.has_conv else None


class FindRegions(GraphPass):
    """Analysis pass: stores :func:`find_regions`'s result in
    ``pipeline_state(gm).regions``; never modifies the graph.

    ``prefix`` (the traced unit's path plus ``"."``) is put in front of the module
    paths in the regions' names, as the report shows them. ``pinned``: see
    :func:`find_regions`. Ensures the regions are
    disjoint and in graph order.
    """

    def __init__(self, rules: RuleRegistry | None = None, shared_modules: Iterable[nn.Module] = (),
                 merge_convs: bool = False, prefix: str = "", pinned: Mapping[str, str] | None = None) -> None:
        self.rules = rules
        self.shared_modules = tuple(shared_modules)
        self.merge_convs = merge_convs
        self.prefix = prefix
        self.pinned = dict(pinned or {})

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        regions = find_regions(
            graph_module, self.rules, shared_modules=self.shared_modules, merge_convs=self.merge_convs,
            pinned=self.pinned,
        )
        if self.prefix:
            for r in regions:
                r.name = region_name(r.nodes, self.prefix)
        pipeline_state(graph_module).regions = regions
        return PassResult(graph_module, False)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        regions = pipeline_state(graph_module).regions or []
        order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        if [order[r.exit] for r in regions] != sorted(order[r.exit] for r in regions):
            self.fail("regions are not in graph order")
        taken: set[fx.Node] = set()
        for r in regions:
            if r.foldable and taken & set(r.nodes):
                self.fail(f"foldable region {r.name} overlaps another")
            if r.foldable:
                taken |= set(r.nodes)

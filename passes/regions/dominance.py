"""Single-entry single-exit candidates from dominators of the fx data-flow graph.

The data-flow graph of a :class:`~repcompiler.passes.regions.lowering.LoweredGraph`
(non-constant nodes, an edge per data input, a virtual root feeding placeholders and
sources) is handed to networkx for its immediate dominators. For a linear node ``e``
the entries it could have are its dominators ``idom(e), idom(idom(e)), ...``; the
region of ``(d, e)`` is every node on a path from ``d`` to ``e``. It is valid when all
those nodes are linear and none of their values (except ``e``'s) is used outside
(reading a value's number of dimensions is not a use: every value of a region has
the region's dims, and the rewrite points such reads at the folded output).
Validity is monotone along the dominator chain, so the walk stops at the first
invalid entry (:func:`entry_candidates`).

A region whose entry is written in place between its reads (``x.mul_(3)`` between two
branches reading ``x``, through any alias of ``x``; :mod:`repcompiler.analysis.effects`) is not
valid either: folded, it would read the entry once. Writes only get more numerous up
the chain, so the walk stops there too, and the refused candidate is kept in
``LoweredGraph.refusals`` for the report.

Identity calls are **aliases**: a chain of ``nn.Identity`` calls starting at the entry
computes the entry's value, so it may be used outside the region too (e.g. a skip
branch's identity that another block also reads). Such a chain is left out of the
region's body and returned as the region's aliases; the region reads it as its entry.
"""

from __future__ import annotations

from typing import Hashable

import networkx as nx
import torch.fx as fx

from .lowering import LoweredGraph, is_rank_read

__all__ = ["Candidate", "dominators", "entry_candidates", "written_between_reads"]

ROOT = "__root__"

Candidate = tuple[fx.Node, set[fx.Node], list[fx.Node]]
"""``(entry, body, aliases)``: a valid region ending at a given exit."""


def dominators(g: LoweredGraph) -> dict[Hashable, Hashable]:
    """Immediate dominators of the data-flow graph of ``g`` (from a virtual root)."""
    dg = nx.DiGraph()
    dg.add_node(ROOT)
    for n, data in g.data_in.items():
        dg.add_node(n)
        if not data:
            dg.add_edge(ROOT, n)
        for a in data:
            dg.add_edge(a, n)
    for n in g.nodes:
        if n.op == "placeholder":
            dg.add_edge(ROOT, n)
    return nx.immediate_dominators(dg, ROOT)


def entry_candidates(g: LoweredGraph, idom: dict[Hashable, Hashable], e: fx.Node,
                     assigned: set[fx.Node]) -> list[Candidate]:
    """The valid regions ending at ``e``, smallest first, walking up ``e``'s
    dominators; nodes in ``assigned`` (already in a region) cannot be taken again."""
    cands: list[Candidate] = []
    d = idom.get(e)
    while d is not None and d != ROOT:
        found = _closure(g, e, d, assigned)  # type: ignore[arg-type]
        if found is None:
            break
        why = written_between_reads(g, d, e, *found)  # type: ignore[arg-type]
        if why:
            g.refusals.setdefault(e, (d, *found, why))  # type: ignore[arg-type]
            break
        if not cands or found[0] != cands[-1][1]:  # same body from further up: d is an alias
            cands.append((d, *found))  # type: ignore[arg-type]
        nd = idom.get(d)
        d = None if nd is d else nd
    return cands


def written_between_reads(g: LoweredGraph, d: fx.Node, e: fx.Node, body: set[fx.Node],
                          aliases: list[fx.Node]) -> str:
    """Why the region ``(d, e)`` does not read one value, or ``''``: its entry (or a value
    sharing its storage) is written in place at or after the region's first read of it
    and up to its exit. Folded, the region reads the entry once, at the exit."""
    entry = {d, *aliases}
    reads = [g.order[n] for n in body if any(a in entry for a in n.all_input_nodes)]
    if not reads:
        return ""
    w = g.effects.writer_between(entry, min(reads), g.order[e])
    if w is None:
        return ""
    return (f"its input {d.name} is modified in place by {w.name} ({w.format_node()}) between the region's reads "
            "of it: the branches do not read one value")


def _closure(
    g: LoweredGraph, e: fx.Node, d: fx.Node, assigned: set[fx.Node]
) -> tuple[set[fx.Node], list[fx.Node]] | None:
    """Nodes on paths from ``d`` to ``e`` (``d`` excluded) if they form a valid region,
    and the region's aliases of ``d`` (taken out of the body, see :func:`_split_aliases`)."""
    body = {e}
    stack = [e]
    while stack:
        n = stack.pop()
        for p in g.data_in.get(n, ()):
            if p is d or p in body:
                continue
            if p in assigned or not g.linear(p) or p not in g.data_in:
                return None
            body.add(p)
            stack.append(p)
    leaks = [n for n in body if n is not e and any(u not in body and not is_rank_read(u) for u in n.users)]
    aliases = _split_aliases(g, d, body, leaks) if leaks else []
    if aliases is None:
        return None
    return body, aliases


def _split_aliases(g: LoweredGraph, d: fx.Node, body: set[fx.Node],
                   leaks: list[fx.Node]) -> list[fx.Node] | None:
    """Take the identity chains from ``d`` to each of ``leaks`` (body nodes used outside
    the body) out of ``body`` and return them, in graph order; ``None`` if a leak's value
    is not ``d``'s (the region would drop a value used elsewhere)."""
    out: set[fx.Node] = set()
    for n in leaks:
        chain = g.alias_chain(n, d)
        if chain is None:
            return None
        out.update(chain)
    body -= out
    return sorted(out, key=g.order.__getitem__)

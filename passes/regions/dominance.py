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

__all__ = ["Candidate", "dominators", "entry_candidates"]

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
        if not cands or found[0] != cands[-1][1]:  # same body from further up: d is an alias
            cands.append((d, *found))  # type: ignore[arg-type]
        nd = idom.get(d)
        d = None if nd is d else nd
    return cands


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

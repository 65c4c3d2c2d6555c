"""The :class:`Region` record: one single-entry single-exit linear subgraph of an fx
graph with its kernel-algebra expression, plus the naming helpers for regions and
nodes (:func:`region_name`, :func:`node_owner`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ... import algebra as A

__all__ = ["Region", "region_name", "node_owner"]


@dataclass
class Region:
    """A single-entry single-exit linear subgraph and its algebra expression."""

    entry: fx.Node
    exit: fx.Node
    nodes: list[fx.Node]
    expr: A.Expr | None
    reasons: tuple[str, ...]
    kind: str
    dims: int
    in_channels: int
    has_conv: bool
    name: str = ""
    worth: bool = True
    notes: list[str] = field(default_factory=list)
    aliases: list[fx.Node] = field(default_factory=list)
    """Identity calls of the entry's value that the region reads but that are used
    outside it too: not part of the region, they stay in the graph (see
    :mod:`repcompiler.passes.find_regions`)."""

    @property
    def entry_values(self) -> list[fx.Node]:
        """The nodes whose value is the region's input: the entry and its aliases."""
        return [self.entry, *self.aliases]

    @property
    def exact(self) -> bool:
        return self.expr is not None and not self.reasons

    @property
    def foldable(self) -> bool:
        """Exact, and folding it removes work (it holds a conv and is not one already)."""
        return self.exact and self.has_conv and self.worth

    @property
    def all_modules(self) -> bool:
        return all(n.op == "call_module" for n in self.nodes)

    def module_targets(self) -> list[str]:
        return [str(n.target) for n in self.nodes if n.op == "call_module"]

    def __repr__(self) -> str:
        state = "exact" if self.exact else "inexact"
        return f"Region({self.name!r}, {self.kind}, {len(self.nodes)} ops, {state})"


def region_name(nodes: list[fx.Node], prefix: str = "") -> str:
    """A short readable name for a region of ``nodes``: module paths (after ``prefix``,
    the traced unit's path) or node names, elided in the middle past three ops."""
    labels = [prefix + str(n.target) if n.op == "call_module" else n.name for n in nodes]
    if len(labels) <= 3:
        return " -> ".join(labels)
    return f"{labels[0]} .. {labels[-1]} ({len(labels)} ops)"


def node_owner(node: fx.Node) -> list[str]:
    """The chain of module paths whose forward created ``node`` (outermost first,
    the node's own module excluded for ``call_module`` nodes)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return paths

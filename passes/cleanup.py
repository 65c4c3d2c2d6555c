"""Clean-up pass: drop identity calls and dead constant nodes from a graph.

:class:`Cleanup` removes ``call_module`` nodes whose module is an ``nn.Identity`` (their
uses read the input directly), then dead ``get_attr`` / constant-only nodes, and, with
``delete_unused_submodules=True``, submodules no node refers to any more. The last is
off by default: the compiler keeps replaced modules as ``nn.Identity`` under their
names so user code that refers to them still works. It ensures no identity call and
no dead constant node is left.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .base import GraphPass, PassResult

__all__ = ["Cleanup"]


def _identity_call(gm: fx.GraphModule, n: fx.Node) -> bool:
    return (n.op == "call_module" and len(n.args) == 1 and not n.kwargs
            and type(gm.get_submodule(str(n.target))) is nn.Identity)


def _dead_constant(n: fx.Node) -> bool:
    if n.users or n.op in ("output", "placeholder", "call_module"):
        return False
    return n.op == "get_attr" or (
        n.op in ("call_function", "call_method")
        and bool(n.all_input_nodes)
        and all(a.op == "get_attr" for a in n.all_input_nodes)
    )


class Cleanup(GraphPass):
    """Remove ``nn.Identity`` calls and dead constant nodes (see module docstring)."""

    def __init__(self, delete_unused_submodules: bool = False) -> None:
        self.delete_unused_submodules = delete_unused_submodules

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for n in list(graph.nodes):
            if _identity_call(graph_module, n):
                n.replace_all_uses_with(n.args[0])  # type: ignore[arg-type]
                graph.erase_node(n)
                modified = True
        changed = True
        while changed:
            changed = False
            for n in reversed(list(graph.nodes)):
                if _dead_constant(n):
                    graph.erase_node(n)
                    changed = modified = True
        if self.delete_unused_submodules:
            graph_module.delete_all_unused_submodules()
            modified = True
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for n in graph_module.graph.nodes:
            if _identity_call(graph_module, n) or _dead_constant(n):
                self.fail(f"node {n.format_node()} is still in the graph")

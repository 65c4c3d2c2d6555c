"""The library's modules import each other without a cycle.

Every module of ``repcompiler`` (and ``passes/``, installed as ``repcompiler.passes``) is
parsed with :mod:`ast`; every import counts, wherever it is written (module level,
inside a function, under ``TYPE_CHECKING``). An import of a name from a package counts
as an import of that submodule when the name is one, otherwise of the package.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = (("repcompiler", "repcompiler"), ("passes", "repcompiler.passes"))


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source file, is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for top, dotted in TREES:
        for folder, dirs, files in os.walk(ROOT / top):
            dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink() and d != "__pycache__"]
            rel = Path(folder).relative_to(ROOT / top).parts
            for f in files:
                if not f.endswith(".py"):
                    continue
                if f == "__init__.py":
                    found[".".join((dotted, *rel))] = (Path(folder) / f, True)
                else:
                    found[".".join((dotted, *rel, f[:-3]))] = (Path(folder) / f, False)
    return found


def _imports(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The library modules ``name`` imports."""
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            source = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in known else source)
    return {m for m in out if m in known and m != name}


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, (path, is_package) in modules.items():
        graph.add_edges_from((name, dep) for dep in _imports(name, path, is_package, set(modules)))
    return graph


def test_graph_sees_the_library() -> None:
    graph = import_graph()
    assert "repcompiler.rules.registry" in graph and "repcompiler.passes.find_regions" in graph
    assert graph.has_edge("repcompiler.transforms.fold", "repcompiler.rules.registry")


def _cycles(graph: nx.DiGraph) -> list[list[str]]:
    """Every simple cycle, each started at its smallest module name, sorted."""
    out = []
    for cycle in nx.simple_cycles(graph):
        i = cycle.index(min(cycle))
        out.append(cycle[i:] + cycle[:i])
    return sorted(out)


def test_no_import_cycle() -> None:
    cycles = _cycles(import_graph())
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)

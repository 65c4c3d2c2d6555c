"""Every use of a module's tensors and submodules besides calling it: which modules a
transform must leave where they are.

Folding or replacing a module (a region's conv and BN become one conv, a conv becomes a
training block) is exact only if nothing else reads what it held. This module finds the
other uses, for a whole model and for one traced graph, and returns them as
``{module path: reason}`` (**pinned** modules): the region analysis treats a pinned
module as opaque (its region shrinks to what does not need it, the rest still folds) and
``orepa_transform`` leaves a pinned conv plain; both report the reason.

A module is pinned when

* a traced graph reads one of its parameters, buffers or attributes directly
  (an ``fx`` ``get_attr`` node ``conv.weight``, ``bn.running_var``), other than in the
  module's own traced ``forward`` (:func:`graph_pins`);
* it is called on its own *and* inside another module that is called as a leaf (a leaf
  reads its submodules), or one of its submodules is (:func:`graph_pins`);
* code that is not traced can reach it and names one of its tensors or submodules
  (:func:`untraced_pins`): the ``forward`` of a module whose forward did not trace, the
  methods and properties of its class that ``forward`` names (transitively) and the
  functions of their own source file they name, and the forward / pre-forward /
  backward hooks of the traced units and of those modules. Names are read from the code objects (attribute and
  global names, string constants, nested functions), so ``self.conv.weight``,
  ``getattr(self.bn, "running_var")`` and a helper function doing the same are seen;
  code reaching a module through a hook's closure or generic iteration
  (``self.parameters()``) is not;
* with ``ties`` (the training transforms, which would give each module its own copy):
  one of its parameters or buffers is the same tensor object as one of another module
  (a tied weight) (:func:`tied_pins`).

A module registered at several paths is handled by the region analysis itself
(``shared``): it is opaque there.
"""

from __future__ import annotations

import dis
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch.fx as fx
from torch import nn

__all__ = ["graph_pins", "untraced_pins", "tied_pins", "model_pins", "local_pins", "shared_modules", "code_reads", "CodeReads"]


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _owners(n: fx.Node) -> set[str]:
    stack = n.meta.get("nn_module_stack") or {}
    return {v[0] if isinstance(v, tuple) else str(v) for v in stack.values()}


def graph_pins(gm: fx.GraphModule) -> dict[str, str]:
    """``{module target: reason}`` for the modules of ``gm`` that its graph uses other
    than by calling them (see the module docstring); targets relative to ``gm``."""
    out: dict[str, str] = {}
    called = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module"))
    for n in gm.graph.nodes:
        if n.op != "get_attr" or not n.users:
            continue
        target = str(n.target)
        parts = target.split(".")
        own = _owners(n)
        users = ", ".join(u.name for u in list(n.users)[:3])
        for k in range(1, len(parts)):
            mod = ".".join(parts[:k])
            if mod not in own:
                out.setdefault(mod, f"its {target[len(mod) + 1:]} is read directly by the model's code "
                                    f"(node {n.name}, used by {users})")
    for t in called:
        for c in called:
            if c.startswith(t + "."):
                out.setdefault(c, f"it is called on its own and inside {t}")
                out.setdefault(t, f"its submodule {c} is called on its own too")
    return out


def _functions_of(obj: Any) -> Iterator[types.FunctionType]:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for f in (obj.fget, obj.fset):
            if f is not None:
                yield from _functions_of(f)
        return
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if isinstance(obj, types.FunctionType):
        yield obj
    elif callable(obj) and not isinstance(obj, type):
        call = getattr(type(obj), "__call__", None)
        if isinstance(call, types.FunctionType) and not type(obj).__module__.startswith("torch"):
            yield call  # a callable object (e.g. a hook class)


def _code_strings(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for c in code.co_consts:
        if isinstance(c, str):
            yield c
        elif isinstance(c, types.CodeType):
            yield from _code_strings(c)


@dataclass
class CodeReads:
    """What some code reads off a module it is given (``self`` of a method, the module
    argument of a hook): ``chains``, the exact attribute paths read off it
    (``self.body.conv.weight`` -> ``("body", "conv", "weight", ...)``), and ``loose``,
    attribute names read off anything else (a loop variable, a call's result, a helper
    function's argument) and string constants (``getattr(m, "weight")``), which may be
    anything the code can reach."""

    chains: set[tuple[str, ...]] = field(default_factory=set)
    loose: set[str] = field(default_factory=set)


_SELF_LOADS = ("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW")
_ATTR_LOADS = ("LOAD_ATTR", "LOAD_METHOD")


def _scan(code: types.CodeType, this: str | None, reads: CodeReads) -> Iterator[str]:
    """Add ``code``'s reads to ``reads`` (``this``: the name of the module argument, or
    ``None``) and yield the global names it loads."""
    chain: list[str] | None = None
    for ins in dis.get_instructions(code):
        if ins.opname in _ATTR_LOADS:
            if chain is not None:
                chain.append(str(ins.argval))
            else:
                reads.loose.add(str(ins.argval))
            continue
        if chain:
            reads.chains.add(tuple(chain))
        chain = [] if this is not None and ins.opname in _SELF_LOADS and ins.argval == this else None
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            yield str(ins.argval)
        elif ins.opname == "LOAD_CONST" and isinstance(ins.argval, str):
            reads.loose.add(ins.argval)
    if chain:
        reads.chains.add(tuple(chain))
    for c in code.co_consts:
        if isinstance(c, types.CodeType):  # nested functions, lambdas, comprehensions: same module argument
            yield from _scan(c, this, reads)


def code_reads(functions: Iterable[Any]) -> CodeReads:
    """What ``functions`` (methods, hooks, callables taking the module first) read off
    the module they are given, and off anything else (:class:`CodeReads`); functions of
    the same source module they call are read too (their arguments count as anything),
    ``torch``'s own code is not."""
    reads = CodeReads()
    todo: list[tuple[types.FunctionType, bool]] = [(f, True) for obj in functions for f in _functions_of(obj)]
    seen: set[int] = set()
    while todo:
        f, bound = todo.pop()
        if id(f.__code__) in seen or (f.__module__ or "").startswith("torch"):
            continue
        seen.add(id(f.__code__))
        code = f.__code__
        this = code.co_varnames[0] if bound and code.co_argcount else None
        for name in set(_scan(code, this, reads)):
            g = f.__globals__.get(name)
            if isinstance(g, types.FunctionType) and g.__module__ == f.__module__:
                todo.append((g, False))
    return reads


def _forward_functions(m: nn.Module) -> list[Any]:
    """``m``'s ``forward`` and the methods (and properties) of its class that it reaches
    through ``self.<name>``, transitively; ``torch``'s own code excluded."""
    cls = type(m)
    out: list[Any] = []
    todo = ["forward"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        attr = inspect.getattr_static(cls, name, None)
        fns = [f for f in (_functions_of(attr) if attr is not None else ())
               if not (f.__module__ or "").startswith("torch")]
        out += fns
        for f in fns:
            todo += [c[0] for c in code_reads([f]).chains if c and c[0] not in seen]
    return out


def _hooks(m: nn.Module) -> list[Any]:
    out: list[Any] = []
    for table in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        out += list(getattr(m, table, {}).values())
    return out


def _reach(model: nn.Module, path: str, reads: CodeReads, why: str, out: dict[str, str]) -> None:
    """Pin every module strictly under ``path`` that ``reads`` (code given the module at
    ``path``) may read a tensor of or use other than by calling a direct child: an exact
    attribute path through it (``self.body.conv.weight``), or a loose name of one of its
    tensors, or of it when it is not a direct child."""
    top = model.get_submodule(path) if path else model
    for sub, m in top.named_modules(remove_duplicate=False):
        if not sub:
            continue
        parts = tuple(sub.split("."))
        local = parts[-1]
        hit = next((".".join(c) for c in reads.chains
                    if c[:len(parts)] == parts and (len(c) > len(parts) or len(parts) > 1)), None)
        if hit is None:
            names = [k for k in (*m._parameters, *m._buffers) if k in reads.loose]
            if len(parts) > 1 and local in reads.loose:
                names.append(local)
            hit = names[0] if names else None
        if hit is not None:
            out.setdefault(_qualify(path, sub), f"{why} reads {hit!r}, which can be this module or one of its tensors")


def untraced_pins(model: nn.Module, skipped: Iterable[str], units: Iterable[str]) -> dict[str, str]:
    """``{qualified name: reason}`` for modules that code which is not traced can reach
    and names (see the module docstring). ``skipped``: paths of modules whose forward did
    not trace (``"<root>"`` or ``""`` for the model); ``units``: paths of the traced units
    (their own hooks run outside their graphs)."""
    out: dict[str, str] = {}
    for path in skipped:
        path = "" if path == "<root>" else path
        m = model.get_submodule(path) if path else model
        reads = code_reads([*_forward_functions(m), *_hooks(m)])
        _reach(model, path, reads, f"the code of {path or type(model).__name__} (not traced)", out)
    for path in units:
        m = model.get_submodule(path) if path else model
        hooks = _hooks(m)
        if hooks:
            _reach(model, path, code_reads(hooks), f"a hook of {path or type(model).__name__} (not traced)", out)
    return out


def tied_pins(model: nn.Module) -> dict[str, str]:
    """``{qualified name: reason}`` for modules holding a parameter or buffer that another
    module object holds too (a tied weight)."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is not None:
                    holders.setdefault(id(t), []).append((path, m, k))
    out: dict[str, str] = {}
    for hs in holders.values():
        if len({id(m) for _, m, _ in hs}) < 2:
            continue
        for path, m, k in hs:
            other = next(f"{_qualify(p, kk)}" for p, mm, kk in hs if mm is not m)
            out.setdefault(path, f"its {k} is the same tensor as {other} (tied): a replacement would untie them")
    return out


def model_pins(model: nn.Module, graphs: Iterable[tuple[str, fx.GraphModule]], skipped: Iterable[str],
               *, ties: bool = False) -> dict[str, str]:
    """Every pinned module of ``model`` (qualified name -> reason): the traced units'
    graphs ``(path, graph)`` (:func:`graph_pins`), the code that did not trace
    (:func:`untraced_pins`) and, with ``ties``, tied tensors (:func:`tied_pins`)."""
    graphs = list(graphs)
    out: dict[str, str] = {}
    for path, gm in graphs:
        for t, why in graph_pins(gm).items():
            out.setdefault(_qualify(path, t), why)
    for k, why in untraced_pins(model, skipped, [p for p, _ in graphs]).items():
        out.setdefault(k, why)
    if ties:
        for k, why in tied_pins(model).items():
            out.setdefault(k, why)
    return out


def local_pins(pinned: dict[str, str], path: str) -> dict[str, str]:
    """The entries of ``pinned`` (qualified names) under the module at ``path``, with
    names relative to it (for the graph of the unit traced at ``path``)."""
    if not path:
        return dict(pinned)
    pre = path + "."
    return {k[len(pre):]: v for k, v in pinned.items() if k.startswith(pre)}


def shared_modules(model: nn.Module) -> list[nn.Module]:
    """Modules registered at more than one path of ``model`` (shared weights)."""
    seen: dict[int, int] = {}
    mods: dict[int, nn.Module] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
        mods[id(m)] = m
    return [mods[i] for i, c in seen.items() if c > 1]

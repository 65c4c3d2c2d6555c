"""The owner-module rewrite engine of ``fold``, ``deploy`` and ``linearize``: the steps
:class:`~repcompiler.passes.rewrite_owners.RewriteOwners` runs.

A region found in a traced unit (:mod:`repcompiler.capture.tracing`) is replaced by one module
(a plain conv for ``fold``, an :class:`~repcompiler.online.conv.OnlineConv` for
``linearize``). How the user's hierarchy is edited, so that qualified names,
``state_dict`` keys and user methods survive outside the rewritten regions:

* A region made only of module calls is rewritten **without touching any forward**:
  the new module goes to the qualified name of one of the region's convs
  (:func:`conv_target`), every other module of the region becomes ``nn.Identity``.
* A region that contains a function call (``+`` of branches, ``torch.cat``,
  ``F.pad``, ...) lives in the ``forward`` of its **owner**, the deepest module whose
  ``forward`` created all its nodes (:func:`region_owner`). The owner is re-traced
  (:func:`owner_graph`; the unit's own graph when the owner is the unit), its regions
  are mapped onto that graph, they are squeezed, and :func:`install_forward`
  gives the owner the rewritten graph's code: the **object stays** (same ``id``,
  children, attributes, other methods and ``isinstance``); only its class is swapped
  for a subclass of the **user's** class whose ``forward`` is the generated code. One
  marker (``_repcompiler_base``) names the user's class, so rewriting an owner again
  (``linearize`` then ``fold``) subclasses the user's class, never a generated one.
  Such objects pickle (``torch.save``) and deep-copy through the forward's source, as
  ``GraphModule`` does. When owners nest, the outermost one is rewritten once
  (:func:`group_by_owner`).

Methods of the owner's class stay. A block's own re-parameterization method (timm's
``reparameterize``) describes the original branches and is not meaningful after
``linearize``: use :func:`repcompiler.deploy`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch.fx as fx
from torch import Tensor, nn
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer

from ..errors import TraceError
from ..passes.base import run_passes
from ..passes.cleanup import Cleanup
from ..passes.find_regions import Region, node_owner
from ..passes.squeeze import conv_target
from ..capture.tracing import TracedUnit, trace_model

__all__ = [
    "qualify",
    "region_owner",
    "is_under",
    "conv_target",
    "group_by_owner",
    "OwnerGraph",
    "owner_graph",
    "install_forward",
    "rewritten_class",
]

T = TypeVar("T")


def qualify(prefix: str, name: str) -> str:
    """``prefix.name`` ('' parts dropped)."""
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def region_owner(region: Region) -> str:
    """The deepest module path whose ``forward`` created every node of ``region``
    ('' = the traced unit itself)."""
    chains = [node_owner(n) for n in region.nodes]
    if not chains:
        return ""
    first = chains[0]
    k = 0
    while all(len(c) > k and c[k] == first[k] for c in chains):
        k += 1
    return first[k - 1] if k else ""


def is_under(path: str, owner: str) -> bool:
    """Whether module ``path`` is ``owner`` or inside it ('' owns everything)."""
    return owner == "" or path == owner or path.startswith(owner + ".")


def group_by_owner(items: Sequence[T], region_of: Callable[[T], Region]) -> tuple[dict[str, list[T]], list[T]]:
    """Split ``items`` into ``{outermost owner: items}`` for regions holding a function
    call (their owner's forward is rewritten, once, nested owners included) and the
    items whose regions are made only of module calls and lie under no such owner."""
    # dict, not set: owners of equal depth keep the items' (graph) order, so reports are deterministic
    owners = sorted(dict.fromkeys(region_owner(region_of(i)) for i in items if not region_of(i).all_modules), key=len)
    top: list[str] = []
    for o in owners:
        if not any(is_under(o, t) for t in top):
            top.append(o)
    groups: dict[str, list[T]] = {t: [] for t in top}
    direct: list[T] = []
    for item in items:
        own = region_owner(region_of(item))
        home = next((t for t in top if is_under(own, t)), None)
        (direct if home is None else groups[home]).append(item)
    return groups, direct


@dataclass
class OwnerGraph:
    """An owner module, its graph (holding the owner's own children) and the regions
    mapped onto that graph (same order as given)."""

    module: nn.Module
    gm: fx.GraphModule
    regions: list[Region]
    prefix: str

    def local(self, target: str | None) -> str | None:
        """A unit-relative module name made relative to the owner."""
        if target is None or not self.prefix:
            return target
        return target[len(self.prefix):]

    def finish(self) -> None:
        """Drop identity calls, check the graph and give the owner its forward."""
        run_passes(self.gm, [Cleanup()])
        self.gm.recompile()
        install_forward(self.module, self.gm)


def owner_graph(unit: TracedUnit, owner: str, regions: Sequence[Region]) -> OwnerGraph:
    """The graph of ``owner`` (a path inside ``unit``) with ``regions`` (found in the
    unit's graph) mapped onto it. The unit's own graph is reused for ``owner == ''``;
    another owner is re-traced (in its current training mode) and must trace to the
    same nodes as inside its parent, else :class:`TraceError`."""
    if owner == "":
        module = unit.module
        gm = fx.GraphModule(module, unit.gm.graph, type(module).__name__)
        mapped = list(regions)
    else:
        module = unit.module.get_submodule(owner)
        gm = trace_model(module, **unit.options)  # traced as the unit was
        mapping = _map_nodes(unit.gm, gm, owner)
        mapped = [_map_region(r, mapping) for r in regions]
    _adopt(gm, module)
    return OwnerGraph(module, gm, mapped, owner + "." if owner else "")


def _adopt(gm: fx.GraphModule, module: nn.Module) -> None:
    """Make ``gm`` hold ``module``'s original children, parameters and buffers (so
    squeezing edits the user's hierarchy itself)."""
    for name, child in module._modules.items():
        gm._modules[name] = child
    for name, p in module._parameters.items():
        if name not in gm._parameters and not hasattr(gm, name):
            gm.register_parameter(name, p)
    for name, b in module._buffers.items():
        if name not in gm._buffers and not hasattr(gm, name):
            gm.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    gm.train(module.training)


def _map_nodes(unit_gm: fx.GraphModule, owner_gm: fx.GraphModule, owner: str) -> dict[fx.Node, fx.Node]:
    """Node correspondence between the owner's part of the unit graph and its own trace
    (same code, same order)."""
    pre = owner + "."
    mine = [
        n for n in unit_gm.graph.nodes
        if n.op not in ("placeholder", "output")
        and any((v[0] if isinstance(v, tuple) else v) == owner for v in (n.meta.get("nn_module_stack") or {}).values())
    ]
    theirs = [n for n in owner_gm.graph.nodes if n.op not in ("placeholder", "output")]
    if len(mine) != len(theirs):
        raise TraceError(f"{owner} traces to {len(theirs)} nodes alone but {len(mine)} inside its parent")
    out: dict[fx.Node, fx.Node] = {}
    for a, b in zip(mine, theirs):
        same = a.op == b.op and (
            (a.op in ("call_module", "get_attr") and a.target == pre + str(b.target))
            or (a.op not in ("call_module", "get_attr") and a.target == b.target)
        )
        if not same:
            raise TraceError(f"{owner} traces differently alone ({b.format_node()}) than inside its parent "
                             f"({a.format_node()})")
        out[a] = b
    return out


def _map_region(region: Region, mapping: dict[fx.Node, fx.Node]) -> Region:
    nodes = [mapping[n] for n in region.nodes]
    entry = mapping.get(region.entry)
    if entry is None:  # the entry is an input of the owner: find it through a user
        entry = _owner_input(region, mapping)
    if entry is None:
        raise TraceError(f"cannot locate the input of region {region.name} in its owner's graph")
    aliases = [mapping[a] for a in region.aliases if a in mapping]
    return dataclasses.replace(region, nodes=nodes, entry=entry, exit=mapping[region.exit], aliases=aliases)


def _owner_input(region: Region, mapping: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The owner's input through which one of the region's nodes (or of its aliases)
    reads the entry's value, when that value comes from outside the owner."""
    same = set(region.entry_values)
    for n in [*region.aliases, *region.nodes]:
        if n not in mapping:
            continue
        for i, a in enumerate(n.all_input_nodes):
            if a in same and a not in mapping:
                return mapping[n].all_input_nodes[i]
    return None


# -- the owner keeps its object and the user's class ---------------------------------------


def install_forward(module: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``module`` ``gm``'s forward, keeping the object, its class's methods and
    ``isinstance`` (``gm`` must hold ``module``'s own children, see
    :func:`owner_graph`). Attributes ``gm``'s code reads that ``module`` lacks are
    copied (tensors as buffers)."""
    code = gm.recompile()
    src = _format_import_block(code.globals, sys_importer) + "\n" + code.src
    for name, child in gm._modules.items():
        module._modules[name] = child
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            _copy_attr(gm, module, str(n.target))
    base = getattr(type(module), "_repcompiler_base", type(module))
    module.__class__ = rewritten_class(base, src)


def _copy_attr(gm: fx.GraphModule, root: nn.Module, target: str) -> None:
    *prefix, last = target.split(".")
    parent = root.get_submodule(".".join(prefix)) if prefix else root
    if hasattr(parent, last):
        return
    value = gm.get_submodule(".".join(prefix)) if prefix else gm
    value = getattr(value, last)
    if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
        parent.register_buffer(last, value)
    else:
        setattr(parent, last, value)


_CLASS_CACHE: dict[tuple[type, str], type] = {}


def rewritten_class(base: type, src: str) -> type:
    """The subclass of the user's class ``base`` whose ``forward`` is the generated
    code ``src`` (cached: identical blocks share one class)."""
    key = (base, src)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(
            base.__name__,
            (base,),
            {
                "forward": _forward_from_src(src, {}),
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "__doc__": base.__doc__,
                "_repcompiler_base": base,
                "_repcompiler_forward_src": src,
                "__reduce_ex__": _reduce_ex,
            },
        )
    return _CLASS_CACHE[key]


def _reduce_ex(self: nn.Module, protocol: Any) -> tuple:
    # pickle / deepcopy: rebuild from the user's class (importable) and the forward source
    cls = type(self)
    return (_rebuild, (cls._repcompiler_base, cls._repcompiler_forward_src, self.__dict__.copy()))


def _rebuild(base: type, src: str, state: dict) -> nn.Module:
    cls = rewritten_class(base, src)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj

"""Squeeze regions into single convolutions.

For each foldable region (exact, holds a conv; see :mod:`repcompiler.passes.find_regions`):

1. :func:`fold_region` evaluates its algebra expression once under ``no_grad`` into
   a plain ``nn.ConvNd`` (BN, scales, pads, pools and branches folded in);
2. :func:`verify_region` runs the **original** nodes of the region (extracted with
   :func:`region_reference`, so the modules themselves run, not their lowering) and
   the folded conv on random inputs whose spatial size comes from the region's
   geometry, and raises :class:`~repcompiler.errors.VerificationError` naming the
   region on a mismatch;
3. :func:`squeeze_region` rewrites the graph: one ``call_module`` node on the region's
   entry replaces the region. The folded conv is installed at the qualified name of
   the region's first conv module (so its ``state_dict`` keys stay where the conv's
   were); the region's other modules are replaced by ``nn.Identity`` (not deleted, so
   containers and user code that refer to them by name keep working).

:class:`SqueezeRegions` is the pass: it reads the regions
:class:`~repcompiler.passes.find_regions.FindRegions` stored in the graph's
:class:`~repcompiler.passes.state.PipelineState` and does for one traced graph what
:func:`repcompiler.fold` does for each traced unit (fold, verify, report, squeeze);
:func:`fold_passes` is that pipeline as a list of passes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..algebra import CONV_TYPES
from ..errors import VerificationError
from ..analysis.isolation import preserved_state
from ..rewrite.verify import relative_error, tolerance_for

from ..explain.report import TransformReport
from ..rules.registry import RuleRegistry
from .base import GraphPass, PassResult
from .cleanup import Cleanup
from .find_regions import FindRegions, Region, region_name
from .regions.lowering import constant_nodes
from .state import FoldPlan, Rewrite, live_regions, pipeline_state

__all__ = [
    "fold_region",
    "region_reference",
    "RegionRunner",
    "verify_region",
    "squeeze_region",
    "fresh_name",
    "SqueezeRegions",
    "fold_passes",
    "relative_error",
    "tolerance_for",
    "region_params",
    "kernel_to_module",
    "keep_memory_format",
    "conv_target",
]

log = logging.getLogger(__name__)


def fold_region(region: Region) -> nn.Module:
    """The plain conv equal to ``region`` (detached tensors)."""
    if region.expr is None or not region.exact:
        raise VerificationError(f"region {region.name} is not exact: " + "; ".join(region.reasons))
    with torch.no_grad():
        return kernel_to_module(region.expr.fold(check=True))


def kernel_to_module(kernel: Any) -> nn.Module:
    """A plain ``nn.ConvNd`` (``ConstantPadNd -> ConvNd`` for asymmetric padding) holding
    detached copies of a folded :class:`~repcompiler.algebra.Kernel` (see ``Kernel.to_module``)."""
    return kernel.to_module()


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(t: Tensor) -> torch.memory_format | None:
    """``t``'s layout: ``channels_last`` / ``channels_last_3d`` or ``contiguous_format``;
    ``None`` when it is both (size-1 dims: a 1x1 kernel) or neither."""
    fmt = _CHANNELS_LAST.get(t.dim())
    if fmt is None:
        return None
    standard, last = t.is_contiguous(), t.is_contiguous(memory_format=fmt)
    return None if standard == last else (fmt if last else torch.contiguous_format)


def keep_memory_format(folded: nn.Module, params: list[Tensor]) -> None:
    """Store ``folded``'s conv weight channels-last when the kernel-shaped weights it
    replaces were (``model.to(memory_format=torch.channels_last)``): a fold keeps the
    model's layout. Weights in both layouts at once (1x1 kernels) do not decide."""
    layouts = {_layout(p) for p in params} - {None}
    if len(layouts) != 1 or torch.contiguous_format in layouts:
        return
    folded.to(memory_format=layouts.pop())


def region_reference(gm: fx.GraphModule, region: Region) -> fx.GraphModule:
    """A graph module running the region's original nodes (sharing ``gm``'s modules)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    x = graph.placeholder("x")
    for a in region.entry_values:
        env[a] = x
    body = set(region.nodes)

    def lookup(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a in body:  # pragma: no cover - nodes are in topological order
            raise VerificationError(f"region {region.name} is not in topological order")
        # a constant operand (parameter, buffer or something computed from them)
        env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in region.nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[region.exit])
    return fx.GraphModule(gm, graph, "RegionReference")


class RegionRunner:
    """Runs a region's original nodes on a given input without building a module
    (cheaper than :func:`region_reference` when called once)."""

    def __init__(self, gm: fx.GraphModule, region: Region) -> None:
        self.gm, self.region = gm, region

    def _value(self, n: fx.Node, env: dict) -> Any:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            v: Any = self.gm
            for part in str(n.target).split("."):
                v = getattr(v, part)
        else:
            v = self._call(n, env)
        env[n] = v
        return v

    def _call(self, n: fx.Node, env: dict) -> Any:
        args = fx.node.map_arg(n.args, lambda a: self._value(a, env))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self._value(a, env))
        if n.op == "call_module":
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)  # type: ignore[operator]
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        raise VerificationError(f"region {self.region.name}: cannot run node {n.format_node()}")

    def __call__(self, x: Tensor) -> Any:
        env: dict = dict.fromkeys(self.region.entry_values, x)
        for n in self.region.nodes:
            env[n] = self._call(n, env)
        return env[self.region.exit]


def _probe_input(region: Region, ref: Tensor, batch: int = 1) -> Tensor:
    spec = region.expr.spec  # type: ignore[union-attr]
    size = [e + 2 * s + 2 for e, s in zip(spec.extent, spec.stride)]
    if region.dims == 3:
        size = [min(n, max(e + s + 2, 4)) for n, e, s in zip(size, spec.extent, spec.stride)]
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, region.in_channels, *size, generator=gen, dtype=torch.float64)
    return x.to(dtype=ref.dtype, device=ref.device)


def verify_region(region: Region, reference: Callable[[Tensor], Any], folded: nn.Module) -> float:
    """Compare ``folded`` with ``reference`` on a random input; return the relative
    error, raise :class:`VerificationError` naming the region if it is too large. The
    original modules run keep their state (:func:`repcompiler.analysis.isolation.preserved_state`;
    ``folded`` is the plain conv built from them)."""
    ref_t = next(iter(folded.parameters()))
    x = _probe_input(region, ref_t)
    if isinstance(reference, RegionRunner):
        ran = [reference.gm.get_submodule(t) for t in region.module_targets()]
    else:
        ran = [reference] if isinstance(reference, nn.Module) else []
    with torch.no_grad(), preserved_state(*ran):
        want = reference(x)
        got = folded(x)
    if not isinstance(want, Tensor) or want.shape != got.shape:
        raise VerificationError(
            f"region {region.name}: the folded conv gives shape {tuple(got.shape)}, the original "
            f"{tuple(want.shape) if isinstance(want, Tensor) else type(want).__name__}"
        )
    if want.is_floating_point() and not bool(torch.isfinite(want).all()):
        raise VerificationError(
            f"region {region.name}: the original modules give NaN/inf on a random input, so the fold cannot be "
            "checked; their weights or BatchNorm statistics are not usable as they are"
        )
    err = relative_error(got, want)
    if not err <= tolerance_for(ref_t.dtype):
        raise VerificationError(
            f"region {region.name}: the folded conv differs from the original by relative {err:.3g} "
            f"(tolerance {tolerance_for(ref_t.dtype):g}); its lowering or a rule is wrong"
        )
    return err


def conv_target(root: nn.Module, region: Region) -> str | None:
    """The module name a region's replacement is installed at: the conv with the largest
    kernel (a block's main branch; the first of equals), the first module when the region
    has no conv, ``None`` when it has no module."""
    mods = region.module_targets()
    convs = [t for t in mods if isinstance(root.get_submodule(t), CONV_TYPES)]
    if convs:
        return max(convs, key=lambda t: math.prod(root.get_submodule(t).kernel_size))
    return mods[0] if mods else None


def _fold_target(gm: fx.GraphModule, region: Region) -> str:
    found = conv_target(gm, region)
    if found is not None:
        return found
    return fresh_name(gm, f"folded_{region.exit.name}")


def fresh_name(gm: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first that is not an attribute of ``gm``."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def squeeze_region(
    gm: fx.GraphModule,
    region: Region,
    folded: nn.Module,
    target: str | None = None,
    replaced: dict[fx.Node, fx.Node] | None = None,
) -> str:
    """Replace ``region``'s nodes in ``gm`` by one call of ``folded``; return its name.

    The region's module targets other than ``target`` become ``nn.Identity``. When
    squeezing several regions, pass the same ``replaced`` dict to every call: a
    region whose entry is an earlier region's exit then reads the new node. Call
    ``gm.recompile()`` afterwards (or run the pass, which does).
    """
    target = target or _fold_target(gm, region)
    graph = gm.graph
    entry = region.entry
    if replaced is not None:
        while entry in replaced:
            entry = replaced[entry]
    for t in region.module_targets():
        if t != target:
            gm.set_submodule(t, nn.Identity())
    gm.set_submodule(target, folded)  # added under a new name for a region of function calls only
    with graph.inserting_before(region.exit):
        new = graph.call_module(target, (entry,))
    new.meta = dict(region.exit.meta)
    region.exit.replace_all_uses_with(new)
    if replaced is not None:
        replaced[region.exit] = new
    body = set(region.nodes)
    for n in region.nodes:  # reads of a value's dims (the only uses outside, see find_regions): the
        if n is not region.exit:  # region's input has those dims too, and is defined before them
            n.replace_all_uses_with(entry, delete_user_cb=lambda u: u not in body)
    operands = [a for n in region.nodes for a in n.all_input_nodes if a not in body]
    for n in reversed(region.nodes):
        graph.erase_node(n)
    _erase_dead_operands(graph, operands)
    return target


def _erase_dead_operands(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the region's constant operands (``self.weight + self.id_tensor``, parameter
    reads; :func:`~repcompiler.passes.regions.lowering.constant_nodes`) that nothing
    reads any more, and what only they read: the module they read may be replaced (a
    conv traced into and folded whole)."""
    todo, erased = list(nodes), set()
    constants: set[fx.Node] | None = None
    while todo:
        n = todo.pop()
        if n in erased or n.users or n.op not in ("get_attr", "call_function", "call_method"):
            continue
        if n.is_impure() or (n.op == "call_method" and str(n.target).endswith("_")):
            continue
        if constants is None:  # computed once, on the first candidate
            constants = constant_nodes(graph)
        if n not in constants:
            continue
        ins = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        todo += ins


class SqueezeRegions(GraphPass):
    """Fold every foldable region found by ``FindRegions`` into one conv.

    Options (those :func:`repcompiler.fold` needs for one traced unit):

    * ``verify``: check each folded conv against the region's original nodes first
      (:func:`verify_region`; a mismatch raises ``VerificationError`` naming it);
    * ``prefix``: put in front of module paths in region names (the unit's path + ``.``);
    * ``report``: a :class:`~repcompiler.explain.report.TransformReport` to add an entry per
      region to (default: ``pipeline_state(gm).report``, if set);
    * ``rewrite``: squeeze the regions into the graph (default). With ``False`` the
      pass only folds, verifies and reports refusals: the verified
      :class:`~repcompiler.passes.state.FoldPlan` s are left in
      ``pipeline_state(gm).plans`` for an owner-module rewrite to apply (and report).

    Requires regions found on this version of the graph; after a rewrite the state's
    regions are cleared (they describe the old graph), each squeezed plan is recorded
    as a :class:`~repcompiler.passes.state.Rewrite` in ``pipeline_state(gm).rewrites``
    and ensured to be the module its new node calls.
    """

    runs_after = (FindRegions,)

    def __init__(self, verify: bool = True, *, prefix: str = "", report: TransformReport | None = None,
                 rewrite: bool = True) -> None:
        self.verify = verify
        self.prefix = prefix
        self.report = report
        self.rewrite = rewrite

    def requires(self, graph_module: fx.GraphModule) -> None:
        regions = pipeline_state(graph_module).regions
        if regions is None:
            self.fail("no regions in the pipeline state: run FindRegions on this graph first")
        if not live_regions(graph_module, regions):
            self.fail("the regions were found on an earlier version of the graph: run FindRegions again")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        state = pipeline_state(graph_module)
        report = self.report if self.report is not None else state.report
        plans: list[FoldPlan] = []
        for r in state.regions or []:
            if self.prefix:
                r.name = region_name(r.nodes, self.prefix)
            if not r.foldable:
                if report is not None:
                    report.add_region(r, "refused" if not r.exact else "kept")  # reason from the region
                continue
            folded = fold_region(r)
            keep_memory_format(folded, region_params(graph_module, r))
            if self.verify:
                verify_region(r, RegionRunner(graph_module, r), folded)
            plans.append(FoldPlan(r, folded, sum(p.numel() for p in region_params(graph_module, r))))
        state.plans = plans
        if not self.rewrite or not plans:
            return PassResult(graph_module, False)
        replaced: dict[fx.Node, fx.Node] = {}
        for plan in plans:
            target = squeeze_region(graph_module, plan.region, plan.folded, replaced=replaced)
            state.rewrites.append(Rewrite(plan, "", target, plan.folded))
            if report is not None:
                report.add_region(plan.region, "folded", params_before=plan.params_before,
                                  params_after=plan.params_after)
        graph_module.recompile()
        state.regions = None
        state.plans = []
        return PassResult(graph_module, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        called = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_module"}
        for rw in pipeline_state(graph_module).rewrites:
            target, folded = rw.target, rw.module
            if target not in called or graph_module.get_submodule(target) is not folded:
                self.fail(f"the folded conv of {target} is not what the graph calls there")


def fold_passes(
    rules: RuleRegistry | None = None,
    *,
    shared_modules: Any = (),
    pinned: Any = None,
    merge_convs: bool = False,
    verify: bool = True,
    prefix: str = "",
    report: TransformReport | None = None,
    rewrite: bool = True,
) -> list[GraphPass]:
    """The passes that fold one traced graph as :func:`repcompiler.fold` folds a unit:
    ``FindRegions -> SqueezeRegions (-> Cleanup when rewriting)``."""
    passes: list[GraphPass] = [
        FindRegions(rules, shared_modules, merge_convs=merge_convs, prefix=prefix, pinned=pinned),
        SqueezeRegions(verify, prefix=prefix, report=report, rewrite=rewrite),
    ]
    if rewrite:
        passes.append(Cleanup())
    return passes


def region_params(gm: fx.GraphModule, region: Region) -> list[Tensor]:
    """The distinct parameters the region's nodes use (modules called and ``get_attr``)."""
    seen: dict[int, Tensor] = {}
    for n in region.nodes:
        if n.op == "call_module":
            for p in gm.get_submodule(str(n.target)).parameters():
                seen[id(p)] = p
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                v = gm
                for part in str(a.target).split("."):
                    v = getattr(v, part)
                if isinstance(v, nn.Parameter):
                    seen[id(v)] = v
    return list(seen.values())

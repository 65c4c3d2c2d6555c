"""Analysis for ``linearize``: which linear regions are multi-branch BN blocks.

A region (found by :func:`repcompiler.passes.find_regions.find_regions`) is a
**multi-branch BN block** when it adds (or concatenates) branches, holds a conv and a
BN inside a branch, and is not already an online/offline block. Such a block is
linearizable unless its fold is not exact, a rule's lowering snapshots parameters
(it would not train online), or it is only part of a block whose sum continues with a
branch that is not linear. Sums outside every selected region whose branches end in
an unusable BN (``BN -> activation -> add``, ``track_running_stats=False``) are
reported too, with the reason.

This module owns :class:`ModelAnalysis` and :func:`analyse_model` (the one capture and
region analysis of a model that ``linearize`` and ``orepa_transform`` share: each unit
traced once, its regions found once, before any rewrite), :class:`LinearizeCandidate`,
:func:`analyse_unit` (one traced unit) and :func:`find_linearizable` (a whole model,
read-only).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from .. import algebra as A
from ..online.conv import OfflineBlock, OnlineConv
from ..passes.bn_to_scale import branch_bns, iter_leaves
from ..passes.base import run_passes
from ..passes.find_regions import FindRegions, Region, node_owner
from ..passes.state import PipelineState
from ..passes.regions.lowering import ELEMENTWISE_FUNCS, ELEMENTWISE_MODULES
from ..rewrite.owner import qualify, region_owner
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry
from ..capture.tracing import TracedUnit, TraceResult, trace_units
from .uses import local_pins, model_pins, shared_modules

__all__ = ["ModelAnalysis", "analyse_model", "unit_regions", "LinearizeCandidate", "analyse_unit", "find_linearizable", "is_sum",
           "is_activation"]

_BN = nn.modules.batchnorm._BatchNorm
from ..algebra import CONV_TYPES as _CONVS
_SUM_TARGETS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_SUM_METHODS = {"add", "add_", "sub", "sub_"}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_"}


@dataclass
class ModelAnalysis:
    """One capture and one region analysis of a model (:func:`analyse_model`).

    ``traced``: the units that traced and the parts that did not; ``regions``: each
    unit's linear regions (:func:`~repcompiler.passes.find_regions.find_regions`, keyed
    by the unit's path), found on the graphs as traced, before anything rewrote them;
    ``training``: the mode the model was traced in (traces are specialised on it).
    """

    traced: TraceResult
    regions: dict[str, list[Region]]
    training: bool
    pinned: dict[str, str] = field(default_factory=dict)
    """Modules whose tensors or submodules something else uses (qualified name ->
    reason, :func:`repcompiler.analysis.uses.model_pins`): opaque to the regions, never replaced."""

    @property
    def units(self) -> list[TracedUnit]:
        return self.traced.units


def analyse_model(model: nn.Module, *, rules: RuleRegistry | None = None, training: bool | None = None,
                  bns_become_scales: bool = False) -> ModelAnalysis:
    """Trace ``model`` once (:func:`~repcompiler.capture.tracing.trace_units`) and find each
    unit's regions once (modules registered at several paths or used other than by their
    call are opaque: :mod:`repcompiler.analysis.uses`). ``training``: trace in that mode (every module's flag is put
    back afterwards); ``None`` traces in the modes the modules are in.
    ``bns_become_scales``: the caller replaces branch BNs by affines (``linearize``;
    see :mod:`repcompiler.capture.tracing`)."""
    rules = rules if rules is not None else default_rules()
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        if training is not None:
            model.train(training)
        traced = trace_units(model, rules=rules, bns_become_scales=bns_become_scales)
        pinned = model_pins(model, [(u.path, u.gm) for u in traced.units], [p for p, _ in traced.skipped])
        shared = shared_modules(model)
        regions = {u.path: unit_regions(u.gm, rules, shared, local_pins(pinned, u.path)) for u in traced.units}
    finally:
        for m, f in zip(modules, flags):
            m.training = f
    return ModelAnalysis(traced, regions, model.training if training is None else training, pinned)


def unit_regions(gm: fx.GraphModule, rules: RuleRegistry, shared: Iterable[nn.Module] = (),
                 pinned: Mapping[str, str] | None = None) -> list[Region]:
    """The linear regions of the traced graph ``gm`` (:class:`FindRegions` run on it
    through the pass manager; ``gm`` is not modified)."""
    state = PipelineState()
    run_passes(gm, [FindRegions(rules, shared, pinned=pinned)], state=state)
    return state.regions or []


@dataclass
class LinearizeCandidate:
    """A multi-branch region found by :func:`find_linearizable`.

    ``owner``: qualified name of the module whose forward holds the region ('' = root);
    ``convs`` / ``bns``: qualified names of its conv and BN modules; ``reason``: why it
    cannot be linearized (empty when it can).
    """

    name: str
    owner: str
    convs: list[str] = field(default_factory=list)
    bns: list[str] = field(default_factory=list)
    reason: str = ""
    kind: str = "branches"
    modules: frozenset = frozenset()
    unit: str = ""
    """Path of the traced unit the region was found in."""
    region: Region | None = field(default=None, repr=False, compare=False)
    """The region (in the unit's graph) when the block is linearizable."""
    inner: list[str] = field(default_factory=list)
    """For a refused region: the linearizable blocks inside it (its exact sub-regions,
    linearized on their own)."""

    @property
    def ok(self) -> bool:
        return not self.reason


def _get(gm: fx.GraphModule, target: str) -> Any:
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def is_sum(n: fx.Node) -> bool:
    """Whether ``n`` adds or subtracts two values (``+``, ``torch.add``, ``x.add_``, ...)."""
    if n.op == "call_function":
        return n.target in _SUM_TARGETS
    if n.op == "call_method":
        return str(n.target) in _SUM_METHODS
    return False


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a.op != "get_attr"]


def _describe_node(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        m = _get(gm, str(n.target))
        return f"{n.target} ({type(m).__name__})"
    if n.op in ("call_function", "call_method"):
        return f"{n.name} ({getattr(n.target, '__name__', n.target)})"
    return n.name


def _nonlinear_reason(gm: fx.GraphModule, n: fx.Node) -> str:
    """Why node ``n`` stops a branch from being linear."""
    if n.op == "call_module":
        m = _get(gm, str(n.target))
        if isinstance(m, _BN) and (m.running_mean is None or m.running_var is None):
            return (f"BN {n.target} has track_running_stats=False (it normalizes with batch statistics "
                    "in eval mode too: no affine form, the branches cannot be merged)")
        act = getattr(m, "act", None)
        if isinstance(m, _BN) and act is not None and not isinstance(act, nn.Identity):
            return f"BN {n.target} is followed by its activation {type(act).__name__} before the add"
    return f"{_describe_node(gm, n)} is not linear"


def _partial_block(gm: fx.GraphModule, region: Region) -> str:
    """A reason if ``region`` is only part of a block: its output is added to a branch
    that starts at the region's entry but is not linear."""
    for u in region.exit.users:
        if not is_sum(u):
            continue
        for other in _data_inputs(u):
            if other is region.exit:
                continue
            chain: list[fx.Node] = []
            cur = other
            for _ in range(12):
                if cur is region.entry:
                    break
                ins = _data_inputs(cur)
                if len(ins) != 1 or cur.op == "placeholder":
                    cur = None
                    break
                chain.append(cur)
                cur = ins[0]
            if cur is region.entry and chain:
                why = _nonlinear_reason(gm, chain[-1]) if len(chain) == 1 else "; ".join(
                    _nonlinear_reason(gm, c) for c in reversed(chain)
                    if c.op != "call_module" or not isinstance(_get(gm, str(c.target)), _CONVS)
                )
                return f"the block's sum continues at {u.name} with a branch that is not linear: {why}"
    return ""


def _has_block_node(gm: fx.GraphModule, region: Region) -> bool:
    return any(
        n.op == "call_module" and isinstance(_get(gm, str(n.target)), (OnlineConv, OfflineBlock)) for n in region.nodes
    )


def _classify(gm: fx.GraphModule, region: Region) -> str | None:
    """``None``: not a multi-branch BN block (ignored); ``""``: linearizable; else the
    reason it is refused."""

    if region.kind not in ("branches", "concat") or _has_block_node(gm, region):
        return None
    if not branch_bns(gm, region):
        return None
    if not region.has_conv:
        return None
    if not region.exact:
        return "; ".join(region.reasons) or "not exact"
    if not region.worth:  # e.g. merging with a producer conv would grow the kernel
        return "; ".join(region.notes) or "folding it would not remove work"
    snap = _snapshot_leaves(region.expr)
    if snap:
        return (f"the lowering of {', '.join(snap)} holds a computed copy of its parameters, which would not "
                "train online (write its rule over the module's nn.Parameters)")
    return _partial_block(gm, region)


def _snapshot_leaves(expr: A.Expr) -> list[str]:
    """Leaves holding tensors derived from parameters (a rule's snapshot), by label."""

    out = []
    for leaf in iter_leaves(expr):
        if isinstance(leaf, A.BatchNorm):
            continue
        for t in leaf.buffers(recurse=False):
            if t.requires_grad or t.grad_fn is not None:
                out.append(leaf.label())
                break
    return out


def is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` is an elementwise activation or dropout (module, function or method)."""
    if n.op == "call_module":
        return isinstance(_get(gm, str(n.target)), ELEMENTWISE_MODULES)
    if n.op == "call_function":
        return n.target in ELEMENTWISE_FUNCS
    if n.op == "call_method":
        return str(n.target) in _ACT_METHODS
    return False


def _refused_sums(gm: fx.GraphModule, covered: set[fx.Node],
                  branch_reason: Callable[[fx.Node], str | None]) -> list[tuple[fx.Node, str]]:
    """Sums not in any selected region with the reasons ``branch_reason`` gives for their
    operands (sums with none are left out)."""
    out: list[tuple[fx.Node, str]] = []
    for n in gm.graph.nodes:
        if n in covered or not is_sum(n):
            continue
        reasons = [r for a in _data_inputs(n) if (r := branch_reason(a))]
        if reasons:
            out.append((n, "; ".join(reasons)))
    return out


def _scan_refusals(gm: fx.GraphModule, covered: set[fx.Node]) -> list[tuple[fx.Node, str]]:
    """Sums not in any selected region whose branches end in a BN that is not usable:
    ``BN -> nonlinearity -> add`` or a BN with ``track_running_stats=False``."""

    def unusable_bn(a: fx.Node) -> str | None:
        cur, acts = a, []
        while is_activation(gm, cur) and len(_data_inputs(cur)) == 1:
            acts.append(cur)
            cur = _data_inputs(cur)[0]
        m = _get(gm, str(cur.target)) if cur.op == "call_module" else None
        if not isinstance(m, _BN):
            return None
        if acts:
            return f"BN {cur.target} is followed by {_describe_node(gm, acts[-1])} before the add"
        if m.running_mean is None or m.running_var is None or not isinstance(getattr(m, "act", nn.Identity()),
                                                                              nn.Identity):
            return _nonlinear_reason(gm, cur)
        return None

    return _refused_sums(gm, covered, unusable_bn)


def _pinned_branches(gm: fx.GraphModule, covered: set[fx.Node], path: str,
                     pinned: Mapping[str, str]) -> list[tuple[fx.Node, str]]:
    """Sums outside every selected region with a branch through a conv or BN that stays
    where it is because something else uses it (:mod:`repcompiler.analysis.uses`)."""

    def pinned_module(a: fx.Node) -> str | None:
        for _ in range(4):  # back along the branch: conv -> BN (-> conv -> BN)
            name = qualify(path, str(a.target)) if a.op == "call_module" else ""
            if name in pinned and isinstance(_get(gm, str(a.target)), (*_CONVS, _BN)):
                return f"{name} is kept: {pinned[name]}"
            ins = _data_inputs(a)
            if a.op != "call_module" or len(ins) != 1:
                return None
            a = ins[0]
        return None

    return _refused_sums(gm, covered, pinned_module)


def _traced_into_convs(unit: TracedUnit, region: Region) -> list[str]:
    """Conv modules whose ``forward`` was traced into and whose ops are in ``region``
    (e.g. DBB's identity-based 1x1): they belong to the block as much as called convs."""
    out: list[str] = []
    for n in region.nodes:
        for p in node_owner(n):
            try:
                m = unit.module.get_submodule(p)
            except AttributeError:
                continue
            if isinstance(m, _CONVS) and p not in out:
                out.append(p)
    return out


def analyse_unit(unit: TracedUnit, rules: RuleRegistry, regions: list[Region] | None = None,
                 pinned: Mapping[str, str] | None = None) -> list[LinearizeCandidate]:
    """The multi-branch BN blocks of one traced unit (linearizable ones carry their
    region) and the refused sums, with qualified names. ``regions``: the unit's regions
    if already found (:class:`ModelAnalysis`), else they are found here. ``pinned``: the
    model's pinned modules (:attr:`ModelAnalysis.pinned`); a sum left out of every block
    because a branch module is pinned is refused with that reason."""
    gm = unit.gm
    cands: list[LinearizeCandidate] = []
    covered: set[fx.Node] = set()
    for r in (regions if regions is not None else unit_regions(gm, rules)):
        why = _classify(gm, r)
        if why is None:
            continue
        covered |= set(r.nodes)
        mods = [(str(n.target), _get(gm, str(n.target))) for n in r.nodes if n.op == "call_module"]
        cands.append(LinearizeCandidate(
            name=qualify(unit.path, r.name) if not unit.path else f"{unit.path}: {r.name}",
            owner=qualify(unit.path, region_owner(r)),
            convs=[qualify(unit.path, t) for t in [*(t for t, m in mods if isinstance(m, _CONVS)),
                                                   *_traced_into_convs(unit, r)]],
            bns=[qualify(unit.path, n) for n, _ in branch_bns(gm, r)],
            reason=why,
            kind=r.kind,
            modules=frozenset(qualify(unit.path, t) for t, _ in mods),
            unit=unit.path,
            region=None if why else r,
        ))
        if why:
            covered |= set(r.exit.users)
    for c in cands:
        if not c.ok:
            c.inner = [o.name for o in cands if o.ok and o.modules < c.modules]
    for node, why in [*_scan_refusals(gm, covered), *_pinned_branches(gm, covered, unit.path, pinned or {})]:
        owner = qualify(unit.path, (node_owner(node) or [""])[-1])
        cands.append(LinearizeCandidate(name=qualify(owner, node.name), owner=owner, reason=why, unit=unit.path))
    return cands


def find_linearizable(
    model: nn.Module, *, rules: RuleRegistry | None = None
) -> tuple[list[LinearizeCandidate], list[tuple[str, str]]]:
    """Analyse ``model`` without changing it: the multi-branch BN blocks (linearizable
    or refused with the reason) and the parts that did not trace ``(path, reason)``."""
    rules = rules if rules is not None else default_rules()
    analysis = analyse_model(model, rules=rules)
    cands = [c for unit in analysis.units
             for c in analyse_unit(unit, rules, analysis.regions[unit.path], analysis.pinned)]
    return cands, list(analysis.traced.skipped)

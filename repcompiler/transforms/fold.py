"""``fold``: squeeze every exact linear region of a model into one convolution.

Pipeline (each step a pass of :mod:`repcompiler.passes` or a module of its own)::

    capture (trace_units, once: fallback to the largest traceable submodules) -> per unit:
    Linear/BN1d pairs (FoldLinearBN) -> find regions -> fold + verify each region ->
    rewrite the module hierarchy in place -> verify -> explain every BN left

Every step reads the graphs of the one capture: the Linear/BN1d pass runs on them, and
the BNs left are explained from them (:mod:`repcompiler.explain.leftovers`, with a map from the
folded regions' nodes to the modules that now compute them), not from a new trace.
Only an owner whose ``forward`` is rewritten is traced again, alone
(:func:`repcompiler.rewrite.owner.owner_graph`), to produce its own code.

Per unit, the steps are one pass pipeline run by
:func:`~repcompiler.passes.base.run_passes`: ``FoldLinearBN -> FindRegions ->
SqueezeRegions(rewrite=False) -> RewriteOwners``.

**How the hierarchy is edited** (names, ``state_dict`` keys and user methods survive
outside the rewritten regions; the owner of a region with function calls keeps its
object and gets a generated ``forward``): the
:class:`~repcompiler.passes.rewrite_owners.RewriteOwners` pass (engine:
:mod:`repcompiler.rewrite.owner`), which ``linearize`` ends in too. Output checks:
:mod:`repcompiler.rewrite.verify`.

Untraceable parts (see :func:`repcompiler.capture.tracing.trace_units`) are left as they
are and listed in the report. Region boundaries, lowering and exactness: see
:mod:`repcompiler.passes.find_regions`. Nothing is rewritten that the algebra cannot prove
exact, and with ``verify=True`` every rewritten region is checked numerically
against its original modules before the model is touched.
"""

from __future__ import annotations

import contextlib
from collections import Counter
import inspect
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedError, VerificationError, first_line
from ..passes.base import run_passes
from ..passes.find_regions import Region
from ..passes.fold_linear_bn import FoldLinearBN
from ..passes.rewrite_owners import RewriteOwners
from ..passes.squeeze import fold_passes
from ..passes.state import FoldPlan, PipelineState
from ..explain.report import FoldReport, count_convs, count_params
from ..rewrite.owner import qualify
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry
from ..analysis.inputs import as_inputs, check_flags, check_model, check_rules, check_weights, copy_model
from ..analysis.isolation import detached_copy, fresh_inputs, isolated_call, propagate_shapes
from ..explain.leftovers import explain_left_bns
from ..online.conv import block_calls_as_modules
from ..analysis.norm_act import folded_norms, leaf_uses, owned_nodes, strip_folded_norms, unused_modules
from ..explain.opaque import opaque_reasons
from ..capture.tracing import TracedUnit, TraceResult, trace_units
from ..analysis.uses import local_pins, model_pins, shared_modules
from ..rewrite.verify import compare_outputs

__all__ = ["fold", "compile_folds"]

log = logging.getLogger(__name__)


def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    return_report: bool = False,
    rules: RuleRegistry | None = None,
    merge_convs: bool = False,
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Fold every exact linear conv region of ``model`` into one ``nn.ConvNd``.

    Args:
        model: any ``nn.Module``.
        example_inputs: optional input (a tensor or a tuple of positional inputs). Not
            needed; when given, shapes are propagated (channel counts for identity /
            pooling branches) and the whole model's output is checked after folding.
        inplace: edit ``model`` itself; by default a deep copy is folded and ``model``
            is left untouched.
        verify: check every rewritten region against its original modules on random
            inputs (and the whole model on ``example_inputs``); a mismatch raises
            :class:`~repcompiler.errors.VerificationError` naming the region.
        return_report: also return a :class:`~repcompiler.explain.report.FoldReport`.
        rules: a rule registry (default: the global one, :func:`register_rule`).
        merge_convs: also merge plain chains of consecutive convs (e.g. ``1x1 -> kxk``)
            when the merged conv is not bigger; by default such chains keep their
            convs (BNs still fold into them), so a plain model keeps its conv count.
            Branches (sums, concats) always merge.

    Returns:
        the folded model, in eval mode (and the report if asked).
    """
    return compile_folds(model, example_inputs, inplace=inplace, verify=verify,
                         return_report=return_report, rules=rules, title="fold", merge_convs=merge_convs)


def compile_folds(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    return_report: bool = False,
    rules: RuleRegistry | None = None,
    title: str = "fold",
    merge_convs: bool = False,
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """The machinery behind :func:`fold` and :func:`repcompiler.deploy` (arguments as
    :func:`fold`; ``title`` names the caller in errors and the report): check the
    call, capture the model once, fold each traced unit, report what else the folds
    made dead, verify the whole model, explain what is left."""
    t0 = time.perf_counter()
    check_model(model, title)
    check_flags(title, inplace=inplace, verify=verify, return_report=return_report, merge_convs=merge_convs)
    check_rules(rules, title)
    inputs = as_inputs(example_inputs, title)
    check_weights(model, title)
    rules = rules if rules is not None else default_rules()
    report = FoldReport(title=title)
    report.convs_before = count_convs(model)
    report.params_before = count_params(model)

    work = copy_model(model, title, inplace)
    block_calls_as_modules(work)  # a model fx-traced after orepa_transform: its blocks become module calls again
    work.eval()
    traced = _trace(work, model, rules, title, report)
    run = _run_capturing(work, inputs, traced.units, title) if inputs is not None else None
    units = _all_units(work, model, traced, rules, report)
    with _few_threads():
        folds = _fold_units(work, units, rules, report, verify=verify, merge_convs=merge_convs,
                            received=run[2] if run is not None else {})
    _report_consumed(work, rules, folds, report)
    if run is not None and verify:
        _verify_folded(model, work, traced, inputs, run, report)  # type: ignore[arg-type]
    _explain_left(model, work, rules, traced, folds.replaced, report)
    report.seconds = time.perf_counter() - t0
    log.info("%s", report.summary())
    return (work, report) if return_report else work


@dataclass
class _Folds:
    """What folding the units did beyond their regions (for :func:`_report_consumed`)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    """Linear/BN1d pairs folded (qualified names)."""
    replaced: dict[fx.Node, str] = field(default_factory=dict)
    """Node of a unit's graph -> the module now computing the region it was in."""
    norms: set[str] = field(default_factory=set)
    """Norm modules (qualified) whose norm folded away."""
    unused: list[tuple[str, list[str]]] = field(default_factory=list)
    """Modules traced into whose every use folded, with the modules they folded into."""


def _trace(work: nn.Module, model: nn.Module, rules: RuleRegistry, title: str, report: FoldReport) -> TraceResult:
    """The one capture of ``work``; a model of which nothing traces is reported (and warned)."""
    traced = trace_units(work, rules=rules)
    report.skipped = list(traced.skipped)
    if not traced.units:
        msg = f"{title}: no part of {type(model).__name__} traces with torch.fx; nothing was folded"
        warnings.warn(msg, stacklevel=3)  # at the caller of compile_folds
        report.notes.append(msg)
    return traced


def _all_units(work: nn.Module, model: nn.Module, traced: TraceResult, rules: RuleRegistry,
               report: FoldReport) -> list[TracedUnit]:
    """The traced units, and the submodules the eval forward never runs (GoogLeNet's
    auxiliary heads) traced on their own."""
    units = list(traced.units)
    for path, found in _unreached(work, traced.units, rules):
        units += found.units
        report.skipped += [(qualify(path, p) if p != "<root>" else path, why) for p, why in found.skipped]
        report.notes.append(f"{path}: not executed by the forward of {type(model).__name__} in eval mode; "
                            "traced and folded on its own")
    return units


def _fold_units(work: nn.Module, units: list[TracedUnit], rules: RuleRegistry, report: FoldReport, *,
                verify: bool, merge_convs: bool, received: dict[str, tuple]) -> _Folds:
    """Fold every unit (:func:`_fold_unit`); modules whose tensors or submodules are used
    other than by their call stay as they are (reported before the graphs change)."""
    shared = shared_modules(work)
    pinned = model_pins(work, [(u.path, u.gm) for u in units], [p for p, _ in report.skipped])
    _report_pinned(units, pinned, rules, report)
    folds = _Folds()
    for unit in units:
        owned, uses = owned_nodes(unit.gm), leaf_uses(unit.gm)  # before the rewrite edits the unit's graph
        done = _fold_unit(unit, rules, shared, verify, report, received.get(unit.path), merge_convs,
                          folds.pairs, local_pins(pinned, unit.path))
        folds.replaced.update(done)
        prefix = unit.path + "." if unit.path else ""
        folds.norms |= folded_norms(owned, prefix, done)
        folds.unused += [(p, sorted({done[n] for n in uses[p[len(prefix):]]}))
                         for p in unused_modules(work, uses, prefix, done)]
    return folds


def _report_consumed(work: nn.Module, rules: RuleRegistry, folds: _Folds, report: FoldReport) -> None:
    """Strip the norms that folded away from norm-plus-activation modules, replace the
    modules traced into that a fold consumed whole by ``nn.Identity``, and report
    them and the Linear/BN1d pairs."""
    stripped = strip_folded_norms(work, folds.norms, rules)
    for path, match in stripped:
        report.add(path, type(match.module).__name__, "folded",
                   f"its norm folded into the conv before it; {match.activation} stays after it",
                   activation=match.activation)
    taken = {p for p, _ in stripped}
    for path, into in folds.unused:
        if path in taken:
            continue
        module = work.get_submodule(path)
        work.set_submodule(path, nn.Identity())
        report.add(path, type(module).__name__, "folded",
                   f"its forward was traced into and folded into {', '.join(into) or 'a conv'}")
    for linear, bn in folds.pairs:
        report.add(f"{linear} -> {bn}", "linear", "folded", "BatchNorm1d folded into the Linear")


def _verify_folded(model: nn.Module, work: nn.Module, traced: TraceResult, inputs: tuple,
                   run: tuple[Any, dict[str, tuple], dict[str, tuple], dict[str, Any]], report: FoldReport) -> None:
    """Check every traced part on the inputs it saw (strict, names the part; each run
    from the state the reference run started from, on its own copy of the inputs),
    then the whole model."""
    ref_out, unit_args, _, unit_outs = run
    for unit in traced.units:
        if unit.path in unit_args and unit.path in unit_outs:
            got_u = isolated_call(unit.module, unit_args[unit.path])
            compare_outputs(unit_outs[unit.path], got_u, unit.path or type(model).__name__)
    out = isolated_call(work, inputs)
    if traced.whole:
        compare_outputs(ref_out, out, type(model).__name__)
        return
    # untraced parts (detection post-processing: box decoding, thresholds, mask
    # pasting) can amplify float rounding discontinuously: report, do not raise
    try:
        compare_outputs(ref_out, out, type(model).__name__)
    except VerificationError as exc:
        msg = f"whole-model check outside the folded parts: {exc} (every folded part matched)"
        warnings.warn(msg, stacklevel=3)  # at the caller of compile_folds
        report.notes.append(msg)


def _explain_left(model: nn.Module, work: nn.Module, rules: RuleRegistry, traced: TraceResult,
                  replaced: dict[fx.Node, str], report: FoldReport) -> None:
    """Report the opaque modules and, read from the graphs traced above (no re-trace),
    why every BatchNorm left stays; order the report as the model and count."""
    for path, reason in opaque_reasons(work, rules):
        report.add(path, type(dict(work.named_modules())[path]).__name__, "opaque", reason)
    explain_left_bns(work, report, rules, traced, replaced)
    report.sort_by_model(name for name, _ in model.named_modules())
    report.convs_after = count_convs(work)
    report.params_after = count_params(work)


# -- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _few_threads() -> Iterator[None]:
    """Run on one intra-op thread: folding and region checks are many tiny tensor ops,
    for which thread start-up costs more than it saves (and much more on a busy
    machine). The caller's setting is restored."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _capture_args(store: dict[str, tuple], path: str) -> Any:
    """A forward pre-hook storing a copy of the first positional arguments the module
    at ``path`` is called with (a ``forward`` may write into its inputs)."""
    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if path in store:
            return
        try:
            sig = inspect.signature(mod.forward)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            if not kwargs or all(p.kind not in (p.VAR_KEYWORD, p.KEYWORD_ONLY) for p in sig.parameters.values()):
                store[path] = fresh_inputs(tuple(bound.args))
        except (TypeError, ValueError):
            pass

    return hook


def _run_capturing(
    model: nn.Module, inputs: tuple, units: Sequence[TracedUnit], title: str
) -> tuple[Any, dict[str, tuple], dict[str, tuple], dict[str, Any]]:
    """Run ``model`` once (its state restored afterwards, on a copy of ``inputs``),
    capturing for every traced unit, on its first call: the positional inputs its
    caller passed (before the unit's own pre-hooks, which a re-run of the unit applies
    again), the inputs its ``forward`` received (after them: what its graph computes
    on, for shapes) and its output (after its hooks). Returns the model's output and
    these three maps."""
    called: dict[str, tuple] = {}
    received: dict[str, tuple] = {}
    outputs: dict[str, Any] = {}
    handles = []
    for u in units:
        def out_hook(mod: nn.Module, args: tuple, output: Any, _path: str = u.path) -> None:
            if _path not in outputs:
                outputs[_path] = detached_copy(output)

        handles.append(u.module.register_forward_hook(out_hook))
        handles.append(u.module.register_forward_pre_hook(_capture_args(called, u.path), with_kwargs=True,
                                                          prepend=True))
        handles.append(u.module.register_forward_pre_hook(_capture_args(received, u.path), with_kwargs=True))
    try:
        out = isolated_call(model, inputs)
    except Exception as exc:  # the user's forward may raise anything: re-raised naming the model
        raise UnsupportedError(
            f"{title}: {type(model).__name__} does not run on the given example_inputs: {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return out, called, received, outputs


def _reached(unit: TracedUnit) -> set[str]:
    """Module paths (qualified) the unit's graph runs or reads: called modules, the
    modules whose forward created a node, the owners of attributes read."""
    out: set[str] = {unit.path}
    for n in unit.gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            out.add(qualify(unit.path, str(n.target) if n.op == "call_module" else str(n.target).rpartition(".")[0]))
        for v in (n.meta.get("nn_module_stack") or {}).values():
            out.add(qualify(unit.path, v[0] if isinstance(v, tuple) else str(v)))
    return out


def _unreached(model: nn.Module, units: Sequence[TracedUnit], rules: RuleRegistry) -> list[tuple[str, Any]]:
    """Submodules of traced units that hold a conv or a BatchNorm but that the traced
    forward never runs (e.g. GoogLeNet's auxiliary heads, used in training only), each
    with its own trace (:func:`trace_units` of the submodule, paths qualified)."""
    reached: set[str] = set()
    for u in units:
        reached |= _reached(u)
    covered = {u.path for u in units}
    out: list[tuple[str, Any]] = []

    def visit(path: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            cpath = qualify(path, name)
            if cpath in covered:
                continue
            if cpath in reached or any(r.startswith(cpath + ".") for r in reached):
                if cpath not in reached or any(r.startswith(cpath + ".") for r in reached):
                    visit(cpath, child)
                continue
            if not any(isinstance(x, _CONV_OR_BN) for x in child.modules()):
                continue
            found = trace_units(child, rules=rules)
            for fu in found.units:
                fu.path = qualify(cpath, fu.path)
            out.append((cpath, found))

    for u in units:
        visit(u.path, u.module)
    return out


_CONV_OR_BN = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def _report_pinned(units: Sequence[TracedUnit], pinned: dict[str, str], rules: RuleRegistry,
                   report: FoldReport) -> None:
    """A ``"kept"`` row for every module with a rule that a traced graph calls but that
    stays as it is because something else uses its tensors or submodules, or because it
    is called more than once (folding it into one use would change the others)."""
    for unit in units:
        calls = Counter(str(n.target) for n in unit.gm.graph.nodes if n.op == "call_module")
        for n in unit.gm.graph.nodes:
            name = qualify(unit.path, str(n.target)) if n.op == "call_module" else None
            if name is None or any(e.name == name for e in report.entries):
                continue
            why = pinned.get(name) or (f"it is called {calls[str(n.target)]} times (shared)"
                                       if calls[str(n.target)] > 1 else None)
            m = unit.gm.get_submodule(str(n.target))
            if why and rules.lookup(m) is not None and type(m) is not nn.Identity:
                report.add(name, type(m).__name__, "kept", f"not folded: {why}")


def _fold_unit(
    unit: TracedUnit,
    rules: RuleRegistry,
    shared: list[nn.Module],
    verify: bool,
    report: FoldReport,
    args: tuple | None,
    merge_convs: bool,
    linear_pairs: list[tuple[str, str]],
    pinned: dict[str, str],
) -> dict[fx.Node, str]:
    """Fold one traced unit with one pass pipeline: Linear/BN1d pairs
    (:class:`FoldLinearBN`), the conv regions (:func:`fold_passes`) and the owner
    rewrite (:class:`RewriteOwners`). Appends the folded Linear/BN pairs to
    ``linear_pairs``; returns, for the nodes of ``unit.gm`` a folded region replaced,
    the qualified name of the module now computing that region (the graph is not
    re-traced afterwards: this says what its stale nodes became)."""
    gm = unit.gm
    prefix = unit.path + "." if unit.path else ""
    if args is not None:
        try:
            propagate_shapes(gm, args)
        except Exception as exc:  # shapes are only a hint: any error of the user's forward is acceptable here
            log.debug("shape propagation of %s failed: %s", unit.path or "<root>", exc)
    uses = _attribute_uses(gm)  # read before the rewrite edits the graph
    state = PipelineState()
    # Linear/BN1d pairs first (the kernel algebra has no 0-d convs: a dedicated pass;
    # a BN it folds reads a 2-d value, which no conv region holds)
    run_passes(gm, [FoldLinearBN(unit.module, pinned),
                    *fold_passes(rules, shared_modules=shared, pinned=pinned, merge_convs=merge_convs,
                                 verify=verify, prefix=prefix, report=report, rewrite=False),
                    RewriteOwners(unit)], state=state)
    linear_pairs += [(prefix + a, prefix + b) for a, b in state.linear_bn_folds]
    replaced: dict[fx.Node, str] = {}
    done: list[Region] = []
    for rw in state.rewrites:
        plan = rw.plan
        assert isinstance(plan, FoldPlan)
        if not rw.applied:
            report.add_region(plan.region, "refused", f"could not rewrite the forward of "
                              f"{qualify(unit.path, rw.owner or '') or '<root>'}: {rw.error}")
            continue
        done.append(plan.region)
        for n in plan.region.nodes:
            replaced[n] = qualify(unit.path, rw.target or "")
        report.add_region(plan.region, "folded", params_before=plan.params_before, params_after=plan.params_after)
    if state.rewrites:
        _drop_dead_holders(unit, uses, done)
    return replaced


def _attribute_uses(gm: fx.GraphModule) -> tuple[dict[str, list[fx.Node]], set[str]]:
    """``({attribute read by get_attr: its readers}, {modules called})`` of ``gm``'s graph."""
    reads: dict[str, list[fx.Node]] = {}
    called: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            reads.setdefault(str(n.target), []).extend(n.users)
        elif n.op == "call_module":
            called.add(str(n.target))
    return reads, called


def _drop_dead_holders(unit: TracedUnit, uses: tuple[dict[str, list[fx.Node]], set[str]],
                       folded: list[Region]) -> None:
    """Replace by ``nn.Identity`` the submodules of ``unit`` that no longer run after
    the ``folded`` regions were rewritten (``uses``: :func:`_attribute_uses` of the
    unit's graph before the rewrite): modules the trace went into (no rule, not
    called as a module) whose every parameter and buffer was read only by folded
    regions (``x * self.aff.weight + self.aff.bias`` folded into the conv before it).
    Their tensors are in the folded conv now; left in place they would still be listed,
    counted and saved."""
    in_regions = {n for r in folded for n in r.nodes}
    reads, called = uses
    dead = {t for t, readers in reads.items() if all(u in in_regions for u in readers)}
    owners = sorted({t.rpartition(".")[0] for t in dead if "." in t}, key=len)
    for owner in owners:
        if any(owner == c or owner.startswith(c + ".") or c.startswith(owner + ".") for c in called):
            continue
        try:
            module = unit.module.get_submodule(owner)
        except AttributeError:
            continue
        tensors = [owner + "." + name for name, _ in (*module.named_parameters(), *module.named_buffers())]
        if tensors and all(t in dead for t in tensors) and not isinstance(module, nn.Identity):
            log.debug("fold: %s no longer runs (its tensors are folded): replaced by nn.Identity",
                      qualify(unit.path, owner))
            unit.module.set_submodule(owner, nn.Identity())

"""``linearize``: OREPA's block linearization and squeezing for models someone else wrote.

A user who already trains RepVGG, DBB, ACNet or MobileOne style blocks (their own
code, timm's ``repvgg_*`` / ``mobileone_*`` in training form, a YOLO neck with RepConv)
gets OREPA's training cost without rewriting the model::

    model = rc.linearize(timm.create_model("repvgg_a0"))   # one conv per block per forward
    ...train...
    plain = rc.deploy(model)                               # one plain conv per block

What it does (arXiv 2204.00826, Sec. 3), as one pipeline shared with ``fold``:

1. **capture**: trace the model once (:func:`repcompiler.analysis.regions.analyse_model`:
   :func:`repcompiler.capture.tracing.trace_units` in training mode, each unit's regions found
   once; untraceable parts are skipped and reported; ``orepa_transform`` passes its own
   analysis, which it also pairs convs with BNs from);
2. **analysis**: find linear regions (:func:`passes.find_regions.find_regions`, BNs
   lowered as BNs) and **select** the multi-branch BN blocks
   (:mod:`repcompiler.analysis.regions`): a region that adds (or concatenates) branches
   and holds a BN before its output. Branches may be ``conv -> BN``,
   ``conv -> BN -> conv -> BN``, average pooling, identity, or a bare BN (RepVGG's
   skip); anything linear the rule registry lowers;
3. **BN -> scale** (:mod:`passes.bn_to_scale`): every BN of the region except one
   producing its output becomes a learnable per-channel scale (``scaling="vector"``),
   a scalar (``"scalar"``) or nothing (``"none"``), plus a learnable bias for the BN's
   shift;
4. **post-BN** (:mod:`passes.insert_post_bn`): one BN after the branches' sum, where
   the region has none (``post_bn=False``: the paper's ablation, none is inserted; a
   BN that already follows the sum is kept);
5. **squeeze**: the region becomes one :class:`~repcompiler.online.conv.OnlineConv` (its
   kernel generated from the branch parameters inside autograd every forward, then
   one convolution on the feature map, then the post-BN), installed at the qualified
   name of the region's largest-kernel conv; the region's other modules become
   ``nn.Identity`` under their names;
6. **rewrite** (the :class:`~repcompiler.passes.rewrite_owners.RewriteOwners` pass
   ``fold`` ends in too, with a builder making steps 3-5 on the owner's graph): the module
   that owns the region (the deepest whose ``forward`` holds every op of it, e.g.
   timm's ``RepVggBlock``) keeps its object and gets the rewritten ``forward`` (its
   class becomes a subclass of the user's class);
7. **verify** (:func:`passes.squeeze.verify_region`, :mod:`repcompiler.rewrite.verify`): each
   online block in eval mode against the original region (``init="from_bn"``) or its
   own unfolded branches, and with ``example_inputs`` the whole model.

**Training-mode capture: BNs that become scales** (the decision for DBB). Linearize
replaces every branch BN by a learnable per-channel affine (BnToScale; with
``init="from_bn"`` initialised from the BN's running statistics). The official DBB's
BN-and-pad layer (``F.pad(bn(x))`` with its border overwritten by the BN's output for a
zero input) equals "zero pad, then the BN" only in eval mode, and linearize traces the
training forward. But once its BN is an affine ``a``, the layer *is* "zero pad, then
``a``" in both modes (its border is ``a(0)``). So linearize captures with
``bns_become_scales=True``: the BN-and-pad rewrite (:mod:`repcompiler.capture.patterns`)
accepts a training-mode BN (checked numerically with the BN in eval mode), and an owner
whose forward would be regenerated with such a layer whose BN is *not* in a block
linearized there is left as it is (reported in ``notes``: the rewritten form would not
be the original in training mode). DBB's identity-based 1x1 (a conv subclass computing
``F.conv2d(x, weight + id)``, with no ``training``-dependent code) is traced into in
training mode too, and a conv whose weight is such a sum lowers as a sum of convs, so
its weight stays a live parameter of the online block. ``fold`` traces in eval mode
and keeps its checks: a live (training-mode) BN is never rewritten there.

Nonlinear parts (activations, SE/attention, drop-path, anything without a rule) stay
where they are. An op without a rule *between* two sums of a block ends the region:
timm's ``RepVggBlock`` with ``drop_path_rate > 0`` computes
``drop_path(conv_1x1(x) + conv_kxk(x)) + identity_bn(x)``, so its two conv branches
become one online conv (+ post-BN) and the identity BN stays a BN (drop-path applies to
the conv branches only; merging the identity into the conv would change that).

Each online block's kernel generator is
:meth:`~repcompiler.algebra.LinearizedSum.fast_fold` (attached by :class:`~repcompiler.blocks.accel.LinearizedSumAccelerator`; the region's expression is first
simplified by :func:`~repcompiler.algebra.simplify`).

``init="from_bn"`` initialises each scale and bias from the eval-mode affine of the BN
it replaces and each inserted post-BN as the identity in eval mode (running mean 0,
running var ``1 - eps``, weight 1, bias 0), so the linearized model's eval output at
conversion time equals the original's. In training mode the post-BN normalizes the
sum with batch statistics (the original normalized each branch), and its running
statistics move towards the sum's with every training step, so eval outputs drift
from the original's as training proceeds (see :mod:`passes.insert_post_bn`).
``init="default"``: scales 1, biases 0, fresh post-BN (training from scratch).

Not linearized, left as they are, and reported with the reason:

* a branch whose BN is followed by a nonlinearity before the add
  (``conv -> BN -> ReLU`` summed);
* a BN with ``track_running_stats=False`` in a branch (no eval-mode affine form: the
  branches could never be merged) - the whole block is left, not the part of it
  that would linearize;
* a region whose fold would not be exact (e.g. a BN shift before a zero-padded conv),
  with the kernel algebra's reason.

**The rule for** :func:`repcompiler.orepa_transform`: a conv
that already belongs to a multi-branch block (a region this module selects) is not
wrapped in a new OREPA block; the whole block is linearized instead (one online conv
per block, e.g. one per timm ``RepVggBlock``). :func:`linearize_regions` is the hook:
``orepa_transform`` calls it on its working copy first and skips the conv names it
returns.

timm's ``BatchNormAct2d`` lowers as a BN when its activation and drop are
``nn.Identity`` by the global rule of :mod:`repcompiler.rules.third_party`, the registry
``fold`` uses too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .. import algebra as A
from ..blocks import MODES
from ..blocks.accel import LinearizedSumAccelerator
from ..analysis.inputs import as_inputs, check_flags, check_model, check_rules, check_weights, copy_model, run_example
from ..analysis.isolation import preserved_state
from ..errors import RepCompilerError, check_choice
from ..analysis.regions import LinearizeCandidate, ModelAnalysis, analyse_model, analyse_unit, find_linearizable
from ..online.conv import OnlineConv
from ..passes.base import run_passes
from ..passes.bn_to_scale import BnToScale, branch_bns, check_options
from ..passes.find_regions import Region
from ..passes.insert_post_bn import InsertPostBN
from ..passes.rewrite_owners import OwnerBuilder, Replacement, RewriteOwners
from ..passes.squeeze import region_reference, verify_region
from ..passes.state import PipelineState, RewritePlan
from ..explain.report import TransformReport, count_convs, count_params
from ..capture.python import capture_info
from ..rewrite.owner import OwnerGraph, conv_target, is_under, qualify
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry
from ..capture.tracing import TracedUnit
from ..rewrite.verify import compare_outputs, eval_mode

__all__ = ["linearize", "linearize_regions", "find_linearizable", "LinearizeCandidate"]

log = logging.getLogger(__name__)

from ..algebra import CONV_TYPES as _CONVS


@dataclass
class _Done:
    """One linearized block, for the report and the caller's set of handled convs."""

    region: str
    target: str
    convs: list[str]
    bns: list[str]
    post_bn: str
    params_before: int
    params_after: int


def _strip_post_bn(expr: A.Expr, bn: nn.Module) -> A.Expr:
    if isinstance(expr, A.Seq):
        terms = list(expr.terms)
        last = terms[-1]
        if isinstance(last, A.BatchNorm) and last.bn is bn:
            rest = terms[:-1]
            return rest[0] if len(rest) == 1 else A.Seq(*rest)
    raise RepCompilerError(f"internal: the post-BN is not the last term of {expr.label()}")


def _online_conv(gm: nn.Module, region: Region, post_target: str | None, training: bool) -> OnlineConv:
    """The online block of ``region`` after BN -> scale and post-BN: its expression
    simplified, the post-BN (if any) applied after the conv."""
    bn_mod = gm.get_submodule(post_target) if post_target else None
    expr = _strip_post_bn(region.expr, bn_mod) if bn_mod is not None else region.expr
    online = OnlineConv(A.simplify(expr), bn_mod, block="linearized", accelerator=LinearizedSumAccelerator())
    ref_t = next((t for t in expr.parameters() if t.is_floating_point()), None)
    if ref_t is not None:  # parameter-free leaves (identity, pools) follow the block's dtype
        online.to(device=ref_t.device, dtype=ref_t.dtype)
    online.train(training)
    return online


class _Linearizer(OwnerBuilder):
    """Builds the online blocks of one owner's regions on its graph: BN -> scale and
    post-BN (:class:`BnToScale`, :class:`InsertPostBN`), then one
    :class:`OnlineConv` per region, each verified in eval mode before the owner's
    forward is rewritten."""

    def __init__(self, names: dict[int, str], scaled: list[str], *, scaling: str, post_bn: bool, init: str,
                 verify: bool) -> None:
        self.names, self.scaled = names, scaled
        self.scaling, self.post_bn, self.init, self.verify = scaling, post_bn, init, verify

    def check(self, unit: TracedUnit, owner: str, plans: Sequence[RewritePlan]) -> None:
        _check_scaled(unit, owner, plans, self.scaled)

    def _before(self, og: OwnerGraph, path: str, region: Region, name: str) -> dict[str, Any]:
        """What the report and the check need, read before the BNs become scales."""
        gm = og.gm
        mods = [(str(n.target), gm.get_submodule(str(n.target))) for n in region.nodes if n.op == "call_module"]
        return dict(
            name=name,
            ref=region_reference(gm, region) if self.verify and self.init == "from_bn" else None,
            convs=[qualify(path, og.prefix + t) for t, m in mods if isinstance(m, _CONVS)],
            bns=[qualify(path, og.prefix + t) for t, _ in branch_bns(gm, region)],
            target=conv_target(gm, region),
            params=sum(p.numel() for _, m in mods for p in m.parameters()),
        )

    def build(self, unit: TracedUnit, og: OwnerGraph, plans: Sequence[RewritePlan]) -> list[Replacement]:
        gm, path = og.gm, unit.path
        before = [self._before(og, path, r, self.names[id(p)]) for r, p in zip(og.regions, plans)]
        state = PipelineState(selected=list(og.regions))
        run_passes(gm, [BnToScale(self.scaling, self.init), InsertPostBN(self.init, enabled=self.post_bn)],
                   state=state)
        post = {id(p.region): (p.target, p.inserted) for p in state.post_bns}
        out: list[Replacement] = []
        for r, d in zip(og.regions, before):
            post_target, inserted = post.get(id(r), (None, False))
            online = _online_conv(gm, r, post_target, og.module.training)
            if self.verify:
                r.name = d["name"]
                with eval_mode(online, *([d["ref"]] if d["ref"] is not None else [])):
                    verify_region(r, d["ref"] if d["ref"] is not None else online.deploy_expr(), online)
            if post_target is None:
                post_desc = "none (post_bn=False)"
            elif inserted:
                post_desc = "inserted" + (" (identity in eval)" if self.init == "from_bn" else "")
            else:
                post_desc = f"{qualify(path, og.prefix + post_target)} (existing)"
            done = _Done(d["name"], qualify(path, og.prefix + d["target"]), d["convs"], d["bns"], post_desc,
                         d["params"], sum(p.numel() for p in online.parameters()))
            out.append(Replacement(online, d["target"], drop=(post_target,) if inserted else (), detail=done))
        return out


def linearize_regions(
    model: nn.Module,
    *,
    scaling: str = "vector",
    post_bn: bool = True,
    init: str = "default",
    mode: str = "online",
    rules: RuleRegistry | None = None,
    verify: bool = True,
    report: TransformReport | None = None,
    analysis: ModelAnalysis | None = None,
) -> tuple[nn.Module, set[str]]:
    """Linearize every multi-branch BN block of ``model`` **in place**; the hook
    :func:`repcompiler.orepa_transform` calls before wrapping convs.

    Returns ``(model, handled)``: ``handled`` is the set of qualified names of the
    original conv modules that now belong to an online block (``mode="online"``), or,
    with ``mode="offline"``, of the convs of the linearizable blocks, which are left as
    they are (they already are the offline, BN-per-branch form). Either way the caller
    should not wrap those convs. ``report`` (if given) gets one entry per block.

    ``analysis``: the model's capture and region analysis in training mode
    (:func:`~repcompiler.analysis.regions.analyse_model` with ``training=True`` and
    ``bns_become_scales=True``), when the
    caller needs it too (``orepa_transform`` pairs the remaining convs with their BNs
    from the same regions); by default the model is traced and analysed here. The
    units' graphs are rewritten by the linearization: read what else is needed from
    them first.
    """
    check_model(model, "linearize_regions")
    check_flags("linearize_regions", post_bn=post_bn, verify=verify)
    check_rules(rules, "linearize_regions")
    check_options(scaling, init)
    check_choice("mode", mode, MODES, owner="linearize")
    rules = rules if rules is not None else default_rules()
    report = report if report is not None else TransformReport(title="linearize")
    # reads of parametrized weights, region checks: nothing of them stays in the model
    with preserved_state(model):
        if analysis is None:  # traces are specialised on .training: trace the training forward
            analysis = analyse_model(model, rules=rules, training=True, bns_become_scales=True)
        elif not analysis.training:
            raise RepCompilerError("linearize_regions: the analysis must be traced in training mode")
        modules = list(model.modules())
        flags = [m.training for m in modules]
        handled: set[str] = set()
        try:
            model.train()  # owners are re-traced for their rewrite in the mode the units were traced in
            report.skipped += analysis.traced.skipped
            for unit in analysis.units:
                cands = analyse_unit(unit, rules, analysis.regions[unit.path], analysis.pinned)
                for c in cands:
                    if not c.ok and c.inner:
                        report.add(c.name, c.kind, "kept", f"{c.reason}; the block(s) inside it linearized on their "
                                   f"own: {', '.join(c.inner)}")
                    elif not c.ok:
                        report.add(c.name, c.kind, "refused", c.reason)
                    elif mode == "offline":
                        handled |= set(c.convs)
                        report.add(c.name, c.kind, "kept", "offline mode: the block already has a BN per branch")
                if mode == "online":
                    _linearize_unit(unit, [c for c in cands if c.ok], handled, report,
                                    scaling=scaling, post_bn=post_bn, init=init, verify=verify)
            return model, handled
        finally:
            for m, f in zip(modules, flags):
                m.training = f
            # new modules (online convs, post-BNs) follow their parents
            _sync_new_modules(model, set(map(id, modules)))


def _linearize_unit(unit: TracedUnit, cands: list[LinearizeCandidate], handled: set[str],
                    report: TransformReport, **options: Any) -> None:
    """Linearize the blocks ``cands`` of one traced unit with :class:`RewriteOwners`
    and report each block (or each owner left as it is)."""
    pairs = [(RewritePlan(c.region), c) for c in cands if c.region is not None]
    plans = [p for p, _ in pairs]
    by_plan = {id(p): c for p, c in pairs}
    scaled = capture_info(unit.gm).scaled_bns  # BN-and-pad layers rewritten for BNs that become scales
    builder = _Linearizer({i: c.name for i, c in by_plan.items()}, scaled, **options)
    state = PipelineState(plans=plans)
    run_passes(unit.gm, [RewriteOwners(unit, builder)], state=state)
    for owner, exc in dict.fromkeys((rw.owner, rw.error) for rw in state.rewrites if not rw.applied):
        where = qualify(unit.path, owner or "") or "<root>"
        log.warning("linearize: %s: %s", where, exc)
        report.notes.append(f"{where}: {exc}")
    for rw in state.rewrites:
        if not rw.applied:
            continue
        c, d = by_plan[id(rw.plan)], rw.detail
        d.convs = list(dict.fromkeys([*d.convs, *c.convs]))  # with convs traced into (DBB's 1x1)
        handled |= set(d.convs)
        report.add(
            d.region, "branches", "linearized",
            f"online conv at {d.target}; {len(d.convs)} conv(s), {len(d.bns)} BN(s) -> scales; "
            f"post-BN {d.post_bn}",
            d.params_before, d.params_after,
            target=d.target, convs=d.convs, bns=d.bns, post_bn=d.post_bn,
        )


def _check_scaled(unit: TracedUnit, owner: str, group: Sequence[RewritePlan], scaled: list[str]) -> None:
    """Refuse to rewrite ``owner`` if its forward holds a BN-and-pad layer captured in its
    affine form (:mod:`repcompiler.capture.patterns`) whose BN would stay a BN: the
    rewritten forward would not be the original in training mode."""
    mine = {t for p in group for t, _ in branch_bns(unit.gm, p.region)}
    left = [t for t in scaled if is_under(t, owner) and t not in mine]
    if left:
        raise RepCompilerError(
            f"the BN-and-pad layer of {', '.join(qualify(unit.path, t) for t in left)} is captured as 'zero pad, "
            "then the BN's affine', which is exact only where its BN becomes a scale, and it is not in a block "
            "linearized here: its owner is left as it is")


def _sync_new_modules(model: nn.Module, old: set[int]) -> None:
    def visit(m: nn.Module, mode: bool) -> None:
        if id(m) not in old:
            m.training = mode
        for c in m.children():
            visit(c, m.training)

    visit(model, model.training)


def _forward_eval(model: nn.Module, inputs: tuple) -> Any:
    with eval_mode(model):
        return run_example(model, inputs, "linearize")


def linearize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    scaling: str = "vector",
    post_bn: bool = True,
    init: str = "default",
    inplace: bool = False,
    return_report: bool = False,
    verify: bool = True,
    rules: RuleRegistry | None = None,
) -> nn.Module | tuple[nn.Module, TransformReport]:
    """Linearize and squeeze every multi-branch BN block of ``model`` (module docstring).

    Args:
        model: any ``nn.Module`` (deep-copied first unless ``inplace``).
        example_inputs: optional input(s); with ``init="from_bn"`` and ``verify`` the
            eval outputs of the original and the linearized model are compared on them
            (a mismatch raises :class:`~repcompiler.errors.VerificationError`).
        scaling: ``"vector"`` | ``"scalar"`` | ``"none"``: what replaces a branch BN.
        post_bn: insert one BN after the branches' sum where the region has none.
        init: ``"default"`` (scales 1, biases 0, fresh post-BN) or ``"from_bn"``
            (eval output unchanged at conversion time).
        inplace: edit ``model`` itself.
        return_report: also return a :class:`~repcompiler.explain.report.TransformReport`.
        verify: check every rewritten block in eval mode on a random input (against
            the original region for ``from_bn``, against its unfolded branches else).
        rules: a rule registry to use instead of the global one.

    Returns:
        The linearized model (same training/eval mode as ``model``), and the report.
    """
    t0 = time.perf_counter()
    check_model(model, "linearize")
    check_flags("linearize", post_bn=post_bn, inplace=inplace, return_report=return_report, verify=verify)
    check_rules(rules, "linearize")
    check_options(scaling, init)
    check_weights(model, "linearize")
    report = TransformReport(title="linearize")
    report.convs_before, report.params_before = count_convs(model), count_params(model)
    inputs = as_inputs(example_inputs, "linearize")
    # with verify, inputs the model does not run on are refused before any work (the run
    # leaves the caller's model as it was: run_example restores its state)
    want = _forward_eval(model, inputs) if inputs is not None and verify else None
    work = copy_model(model, "linearize", inplace)
    linearize_regions(work, scaling=scaling, post_bn=post_bn, init=init, rules=rules, verify=verify, report=report)
    if want is not None:
        got = _forward_eval(work, inputs)
        if init == "from_bn":  # with fresh scales (init="default") only the run itself is checked
            compare_outputs(want, got, "linearize(init='from_bn')", "linearized model (eval mode)")
    report.convs_after, report.params_after = count_convs(work), count_params(work)
    report.seconds = time.perf_counter() - t0
    if not report.by_action("linearized"):
        log.info("linearize: no multi-branch BN block in %s", type(model).__name__)
    log.info("%s", report.summary())
    return (work, report) if return_report else work

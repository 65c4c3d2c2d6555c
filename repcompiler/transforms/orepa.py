"""``orepa_transform``: turn every eligible conv of a model into an online block.

Each eligible ``nn.Conv1d/2d/3d`` is replaced **in its parent module** (same
qualified name, the root's class kept, user methods and the rest of the hierarchy
untouched) by an :class:`~repcompiler.online.conv.OnlineConv` (``mode="online"``) or an
:class:`~repcompiler.online.conv.OfflineBlock` (``mode="offline"``) with the same call
signature, built from a registered block (:mod:`repcompiler.blocks`).

Post-BN: the model is traced with ``torch.fx`` **once**, in training mode, and analysed
into linear regions once (:func:`repcompiler.analysis.regions.analyse_model`; where a part
does not trace, sibling order in the parent module is used for that part, and the
report says so). The same capture and regions serve the linearization of existing
multi-branch blocks (below), the residual-shortcut analysis of the policy and the
pairing (:mod:`repcompiler.analysis.pairing`, read before the linearization rewrites the
graphs): a ``chain`` region that starts with a conv and the BatchNorm that is its only
user (each called once) pairs them, and so does a conv whose only user is a
norm-plus-activation module (timm's ``BatchNormAct2d``, :mod:`repcompiler.analysis.norm_act`).
Such a conv already has its post-addition BN: it stays where it is in the model.
Where no BN follows, one is inserted inside the block (``insert_bn=True``, for
training from scratch). ``post_bn=False`` (the paper's ablation) inserts none and
replaces a following BN by ``nn.Identity``. A conv bias is kept only where no
post-BN follows (a BN absorbs it).

Initialisation (``init``): ``"fresh"`` (the default, the paper's training from scratch)
gives every block new parameters - **the conv's weight and bias are not used**. Left at
its default on a model whose weights look trained
(:func:`repcompiler.blocks.init.trained_evidence`: BatchNorm running statistics that are
not at their initial values, or conv filters far less uniform than a fresh
initialisation), the transform warns (``UserWarning``) naming ``init="from_conv"``;
passing ``init="fresh"`` explicitly trains from scratch without the warning. ``"from_conv"`` (fine-tuning a
pretrained model; the CLI's ``transform --weights``) makes each block start as exactly
the conv it replaces (:mod:`repcompiler.blocks.init`: origin branch = the conv's weight
and bias, the other branches' scales 0, the existing BN as post-BN, no BN inserted
unless ``insert_bn=True``; the default stem block is ``orepa``, as a stacked
``orepa_large`` cannot hold an arbitrary kernel), so the model computes what it did,
in eval mode; existing multi-branch blocks are linearized with ``init="from_bn"``. A
conv whose block cannot start as it is left as it is (``"refused"``). Each report entry
says how its block was initialised (``details["init"]``). ``requires_grad`` flags
survive: a block made from a frozen conv is frozen (its branches and an inserted BN),
its bias follows the conv's bias (:func:`repcompiler.blocks.init.copy_frozen`).

Which block (the *policy*); the default (``policy="paper"``, or ``None``), for
``block="orepa"``, is the paper's OREPA-ResNet rule, stated so it applies to any model:

* kxk convs (some kernel dim >= 2; grouped, depthwise, strided, dilated,
  asymmetric, 1-d/2-d/3-d) -> ``orepa``;
* a large odd kernel -> ``orepa_large`` (the linear deep stem): every conv whose kernel
  dims are all odd with some >= 7, and the model's first conv already from 5;
* 1x1 convs -> ``orepa_1x1``, **except a 1x1 on a basic block's residual shortcut**,
  which stays a plain conv (+BN), as the official code builds the basic block's
  projection with a plain conv + BN and the bottleneck's with ``conv_bn`` (which its
  OREPA assignment makes an ``OREPA_1x1``): a 1x1 conv whose output (through BNs) is
  added to a residual branch that starts at the conv's own input and holds no 1x1 conv
  (the graph analysis of the traced model,
  :func:`~repcompiler.analysis.policy.shortcut_convs`); in parts that do not trace, a 1x1 whose
  qualified name contains ``downsample`` or ``shortcut`` and whose parent module holds
  no other 1x1. On torchvision ResNets this gives the official OREPA-ResNet:
  ResNet-18/34's 1x1 projections stay conv+BN; ResNet-50's bottleneck 1x1s (``conv1``,
  ``conv3``) and its four projection shortcuts get ``orepa_1x1``.

``policy="all"``: every 1x1 -> ``orepa_1x1``, ``orepa_large`` only for the first conv
(odd kernel, some dim >= 5), every other kxk -> ``orepa``.

``block_options`` (a dict) go to every block's builder that accepts them (e.g.
``{"weight_init": "repcompiler"}``; see :mod:`repcompiler.blocks.orepa`); a key no block
of the transform accepts raises. The paper's Tab. 2 ablations, one component each:
``{"prior": None}`` (frequency prior: the kxk block loses its prior branch),
``{"depthwise_separable": False}`` (linear depthwise separable: the kxk block loses its
``dw_pw`` branch), ``{"reparam_1x1": False}`` ("Rep 1x1": every 1x1 conv stays a plain
conv instead of ``orepa_1x1``; read by the default policy) and ``{"deep_stem": False}``
(linear deep stem: the large stem kernel gets a plain ``orepa`` block). ``{"pw_kxk":
False}`` removes the kxk block's 1x1 -> kxk branch (a DBB base branch, not a Tab. 2
component).

With another ``block`` name every conv gets that block (convs its builder rejects
are left as they are and reported). ``policy`` refines per layer:

* ``{"layer4.*": "dbb", "fc*": None, ...}``: the first matching ``fnmatch`` pattern
  decides (a block name, ``None`` to skip, ``"default"`` for the default choice);
* a callable ``(qualified_name, conv) -> block name | None | "default"``;
* a list/tuple/set of name patterns to skip.

Left as they are and reported with the reason: convs that are not plain convs, as the
rule registry decides (:func:`repcompiler.explain.opaque.conv_reason`: transposed convs,
``padding_mode`` other than ``'zeros'``, conv subclasses that override ``forward`` or a
method it calls, forward hooks; and, for a block, lazy convs and parametrized weights),
convs whose tensors something else reads or that hold a parameter another module holds
too (a tied weight: a block would untie them; :mod:`repcompiler.analysis.uses`), and convs a
block's builder rejects. A model with no transformed conv comes back
unchanged with a ``UserWarning``.

Models that already have multi-branch training blocks (a region of branches, each
linear up to a BN, summed: RepVGG, DBB, ACNet, MobileOne, timm ``repvgg_*`` /
``mobileone_*``): such a block is not wrapped conv by conv; it is linearized whole
(:func:`repcompiler.transforms.linearize.linearize_regions`: branch BNs -> learnable scales, one
post-BN, one online conv per block; report action ``"linearized"``). With
``mode="offline"`` those blocks are left in their own BN-per-branch form (``"kept"``).

``rules``: the rule registry every trace and analysis of the transform uses (the conv
checks, the pairing, the shortcut analysis, the linearization of existing blocks);
``None`` is the global one.

The transform runs in named stages, each a function of this module:
:func:`_check` (arguments), :func:`_analyse` (one capture, the pairing, the shortcut
analysis, the linearization of existing multi-branch blocks), :func:`_choose_sites`
(which convs may become blocks), then per conv :func:`_choose_block` (the policy),
:func:`_build` (the block), :func:`_init` (its weights), :func:`_place` (the block and
its post-BN in the model), and :func:`_finish` (the report).

The report (``return_report=True``) is a :class:`repcompiler.explain.report.TransformReport`
with one entry per conv: action ``"transformed"`` (``details["block"]``,
``details["post_bn"]``), ``"kept"`` (the policy skipped it) or ``"refused"``
(unsupported; ``reason`` says why); parts that did not trace are in ``skipped``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from torch import nn

from ..analysis.inputs import check_flags, check_model, check_rules, check_weights, copy_model
from ..analysis.isolation import preserved_state
from ..analysis.norm_act import match_norm_act
from ..analysis.pairing import pair_by_order, pair_by_regions
from ..analysis.policy import (POLICIES, Policy, check_policy_and_options, default_block_for, policy_choice,
                               shortcut_convs)
from ..analysis.regions import analyse_model
from ..analysis.uses import tied_pins
from ..blocks import MODES, SCALINGS, ConvGeometry, build_block, get_block
from ..blocks.init import INITS, copy_frozen, identity_bn_, init_from_conv, trained_evidence
from ..errors import RepCompilerError, check_choice
from ..explain.opaque import conv_reason
from ..explain.report import TransformReport, count_convs, count_params
from ..online.conv import HybridBlock, HybridExpr, OfflineBlock, OnlineConv
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry
from .linearize import linearize_regions

__all__ = ["orepa_transform", "Policy", "POLICIES", "default_block_for"]

log = logging.getLogger(__name__)

from ..algebra import CONV_TYPES as _CONVS
_BN_FOR_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# -- what flows between the stages ----------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of one ``orepa_transform`` call."""

    block: str
    policy: Policy
    rule: str  # the default policy: "paper" or "all"
    options: dict[str, Any]  # block_options for the builders
    reparam_1x1: bool  # read by the default policy, not a builder
    init: str
    insert_bn: bool | None  # as given: None lets ``init`` decide
    mode: str
    scaling: str
    post_bn: bool
    rules: RuleRegistry

    @property
    def inserts_bn(self) -> bool:
        """Whether a post-BN is inserted where no BN follows a conv."""
        return self.init == "fresh" if self.insert_bn is None else self.insert_bn


@dataclass
class _Analysis:
    """What the one capture of the model says about its convs."""

    pairs: dict[str, str | None]  # traced conv -> the BN that follows it
    order: list[str]  # traced convs in graph order, those of linearized blocks left out
    covered: set[str]  # module paths of the traced units
    shortcuts: set[str]  # 1x1 convs on a basic block's residual shortcut
    linearized: set[str]  # convs that now belong to (or are kept in) an existing multi-branch block
    pinned: dict[str, str]  # modules used other than by their call, or holding a tied tensor


@dataclass
class _ConvSite:
    """A conv that may become a block, and the BN that follows it (``how``: how it was paired)."""

    name: str
    conv: nn.Module
    bn_name: str | None = None
    how: str = ""


@dataclass
class _Sites:
    """The convs that may become blocks, the modules refused, and the model's first conv."""

    sites: list[_ConvSite] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    first: str | None = None


# -- the transform ---------------------------------------------------------------------------


def orepa_transform(
    model: nn.Module,
    *,
    block: str = "orepa",
    policy: Policy = None,
    inplace: bool = False,
    init: str | None = None,
    insert_bn: bool | None = None,
    mode: str = "online",
    scaling: str = "vector",
    post_bn: bool = True,
    block_options: Mapping[str, Any] | None = None,
    rules: RuleRegistry | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, TransformReport]:
    """Replace every eligible conv of ``model`` by a training-time block.

    Args:
        model: any ``nn.Module``; deep-copied first unless ``inplace``.
        block: ``"orepa"`` (the default policy: orepa / orepa_1x1 / orepa_large) or
            any registered block name, applied to every conv.
        policy: ``"paper"`` (default; ``None`` too), ``"all"`` or a per-layer choice
            (see the module docstring).
        inplace: edit ``model`` itself.
        init: ``"fresh"`` (default: every block gets new parameters, the conv's weight
            and bias are **not** used: training from scratch; left unset (``None``) on a
            model whose weights look trained, a ``UserWarning`` names ``"from_conv"``) or ``"from_conv"`` (each
            block starts as exactly the conv it replaces - origin branch = the conv's
            weight and bias, the other branches' scales 0 - so a pretrained model
            computes what it did, in eval mode; see :mod:`repcompiler.blocks.init`).
            A conv whose block cannot start as it is left as it is (``"refused"``).
            The report says per conv how its block was initialised.
        insert_bn: insert a post-BN where no BN follows a conv (default: with
            ``init="fresh"`` only; with ``"from_conv"`` an inserted BN starts as the
            identity in eval mode, but normalises in training mode). Linearized
            multi-branch blocks get one unless it is ``False``.
        mode: ``"online"`` (one conv per forward) or ``"offline"`` (branches on the
            feature map, a BN per branch: the DBB/RepVGG baseline).
        scaling: branch scales (online): ``"vector"`` (learnable per channel, the
            paper's), ``"scalar"`` (learnable per branch), ``"fixed"`` (kept at the
            branches' init values, not learnable; refused with ``init="from_conv"``,
            whose zero scales would never move) or ``"none"`` (no scale: every branch
            weighted 1).
        post_bn: ``False`` removes the post-BN (following BNs become ``nn.Identity``).
        block_options: extra builder options, passed to each block that accepts them
            (e.g. ``{"prior": None}``; see the module docstring).
        rules: a rule registry (default: the global one, :func:`register_rule`), used by
            every trace and analysis of the transform.
        return_report: also return the :class:`TransformReport`.

    Returns:
        The transformed model (and the report).
    """
    settings = _check(model, block=block, policy=policy, inplace=inplace, init=init, insert_bn=insert_bn, mode=mode,
                      scaling=scaling, post_bn=post_bn, block_options=block_options, rules=rules,
                      return_report=return_report)
    t0 = time.perf_counter()
    work = copy_model(model, "orepa_transform", inplace)
    # analysis reads parametrized weights (a power iteration in training mode) and runs checks:
    # the modules the model keeps get their state back
    with preserved_state(work):
        report = TransformReport(title="orepa_transform", convs_before=count_convs(work), params_before=count_params(work))
        found = _analyse(work, settings, report)
        sites = _choose_sites(work, found, settings.rules)
        for name, why in sites.refused:
            report.add(name, _describe(work.get_submodule(name)), "refused", why)
        _replace_sites(work, sites, found, settings, report)
    _finish(report, work, model, t0)
    return (work, report) if return_report else work


# -- check ------------------------------------------------------------------------------------


def _check(model: nn.Module, *, block: str, policy: Policy, inplace: bool, init: str | None, insert_bn: bool | None,
           mode: str, scaling: str, post_bn: bool, block_options: Mapping[str, Any] | None,
           rules: RuleRegistry | None, return_report: bool) -> _Settings:
    """Check ``orepa_transform``'s arguments; warn when the default ``init`` would discard
    weights that look trained."""
    check_model(model, "orepa_transform")
    check_flags("orepa_transform", inplace=inplace, post_bn=post_bn, return_report=return_report,
                insert_bn=insert_bn, optional=("insert_bn",))
    check_weights(model, "orepa_transform", allow_meta=True)  # NaN/inf would be copied into (from_conv) or kept
    check_choice("mode", mode, MODES, owner="orepa_transform")
    check_choice("scaling", scaling, SCALINGS, owner="orepa_transform")
    check_rules(rules, "orepa_transform")
    if init is None:
        init = "fresh"
        _warn_if_trained(model)
    check_choice("init", init, INITS, owner="orepa_transform")
    if block != "orepa":
        get_block(block)  # raises for an unknown name
    rule, options = check_policy_and_options(policy, block, block_options)
    reparam_1x1 = bool(options.pop("reparam_1x1", True))
    return _Settings(block=block, policy=policy, rule=rule, options=options, reparam_1x1=reparam_1x1, init=init,
                     insert_bn=insert_bn, mode=mode, scaling=scaling, post_bn=post_bn,
                     rules=rules if rules is not None else default_rules())


def _warn_if_trained(model: nn.Module) -> None:
    evidence = trained_evidence(model)
    if evidence:
        warnings.warn(
            f"orepa_transform: {type(model).__name__} looks trained ({'; '.join(evidence)}), but init='fresh' "
            "(the default) gives every block new parameters and does not use the convs' weights. To fine-tune "
            "it, pass init='from_conv' (each block starts as the conv it replaces); to train from scratch, "
            "pass init='fresh'.",
            UserWarning,
            stacklevel=4,  # orepa_transform's caller
        )


# -- analyse ----------------------------------------------------------------------------------


def _analyse(work: nn.Module, s: _Settings, report: TransformReport) -> _Analysis:
    """Capture and analyse ``work`` once (training mode: linearize needs the training
    forward); read the conv -> BN pairing and the shortcut analysis from the units' graphs,
    then linearize the existing multi-branch blocks (RepVGG, DBB, ACNet, MobileOne, ...),
    which rewrites those graphs."""
    analysis = analyse_model(work, rules=s.rules, training=True, bns_become_scales=True)
    pairs, order, covered, skipped = pair_by_regions(work, analysis, rules=s.rules)
    shortcuts = shortcut_convs(work, analysis.traced, rules=s.rules) if s.block == "orepa" and s.rule == "paper" \
        else set()
    # branch BNs become scales, so a post-BN is inserted unless insert_bn=False (with from_conv:
    # from_bn, scales from the BNs and the post-BN the identity in eval mode)
    _, linearized = linearize_regions(work, scaling=s.scaling, post_bn=s.post_bn and s.insert_bn is not False,
                                      mode=s.mode, init="from_bn" if s.init == "from_conv" else "default",
                                      rules=s.rules, report=report, analysis=analysis)
    report.skipped += skipped
    return _Analysis(pairs=pairs, order=[n for n in order if n not in linearized], covered=covered,
                     shortcuts=shortcuts, linearized=linearized, pinned={**tied_pins(work), **analysis.pinned})


# -- choose sites -----------------------------------------------------------------------------


def _choose_sites(work: nn.Module, found: _Analysis, rules: RuleRegistry) -> _Sites:
    """The convs of ``work`` that may become blocks, each with the BN that follows it, and
    the conv-like modules that may not (with the reason). Modules inside existing blocks
    are not looked at."""
    existing = [n for n, m in work.named_modules() if isinstance(m, (OnlineConv, OfflineBlock))]
    out = _Sites()
    for name, m in work.named_modules(remove_duplicate=False):
        if not name or _inside(name, existing) or isinstance(m, (OnlineConv, OfflineBlock)) \
                or name in found.linearized or not isinstance(m, nn.modules.conv._ConvNd):
            continue
        why = conv_reason(m, rules, block=True)  # the registry decides what is a plain conv
        if why is None and name in found.pinned:  # its tensors are used elsewhere, or tied
            why = f"{found.pinned[name]}; a block would replace it"
        if not isinstance(m, _CONVS) or why:
            out.refused.append((name, why or "not a conv"))
        else:
            out.sites.append(_paired_site(work, name, m, found))
    out.first = found.order[0] if found.order else (out.sites[0].name if out.sites else None)
    return out


def _paired_site(work: nn.Module, name: str, conv: nn.Module, found: _Analysis) -> _ConvSite:
    """The site of conv ``name``: its BN from the traced graph, else by module order."""
    if name in found.pairs:
        return _ConvSite(name, conv, found.pairs[name], "trace")
    if _inside(name, found.covered):
        # inside a traced unit but never called there (a head the forward does not run,
        # GoogLeNet's aux heads): its BN by module order, as in untraced parts
        return _ConvSite(name, conv, pair_by_order(work, name), "module order (not called in the traced graph)")
    return _ConvSite(name, conv, pair_by_order(work, name), "module order")


def _inside(name: str, paths: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``paths`` or inside one (``""``: the root)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in paths)


# -- per conv: choose a block, build, init, place -----------------------------------------------


def _replace_sites(work: nn.Module, sites: _Sites, found: _Analysis, s: _Settings, report: TransformReport) -> None:
    """Replace each site's conv by its block (a conv registered at several paths gets one
    block, placed at each) and report every site."""
    built: dict[int, tuple[nn.Module, str]] = {}
    for site in sites.sites:
        if id(site.conv) in built:
            new, first_path = built[id(site.conv)]
            _set(work, site.name, new)
            report.add(site.name, _describe(site.conv), "transformed", "shared module: the block of " + first_path)
            continue
        new = _replace_site(work, site, site.name == sites.first, found.shortcuts, s, report)
        if new is not None:
            built[id(site.conv)] = (new, site.name)


def _replace_site(work: nn.Module, site: _ConvSite, first: bool, shortcuts: set[str], s: _Settings,
                  report: TransformReport) -> nn.Module | None:
    """Replace one conv by its block; the new module, or ``None`` where the conv stays
    (kept by the policy, or refused, each reported)."""
    conv, desc = site.conv, _describe(site.conv)
    choice, _ = policy_choice(s.policy, site.name, conv)
    if choice is None:
        report.add(site.name, desc, "kept", "policy")
        return None
    try:
        geom = _geometry(conv, has_post_bn=s.post_bn and (site.bn_name is not None or s.inserts_bn), init=s.init)
        name = _choose_block(choice, geom, first=first, shortcut=site.name in shortcuts, s=s)
        if name is None:
            report.add(site.name, desc, "kept", "policy: " + _why_plain(s.reparam_1x1))
            return None
        expr = _build(name, geom, conv, s)
        init_note = _init(expr, conv, s.init)
    except RepCompilerError as exc:
        why = f"init='from_conv': {exc}" if s.init == "from_conv" else str(exc)
        report.add(site.name, desc, "refused", why, count_params(conv), count_params(conv))
        return None
    new = _wrap(expr, name, geom, site, s)
    bn_note = _place(work, site, new, s)
    reason = f"{name}, post-BN: {bn_note}, init: {init_note}" + (
        "" if site.how == "trace" else f" (BN pairing: {site.how})")
    frozen = not conv.weight.requires_grad
    report.add(site.name, desc, "transformed", reason + (", frozen" if frozen else ""), count_params(conv),
               count_params(new), block=name, post_bn=bn_note, init=init_note, frozen=frozen)
    return new


def _geometry(conv: nn.Module, *, has_post_bn: bool, init: str) -> ConvGeometry:
    """The geometry of the block for ``conv``: with a bias where the conv has one and no
    post-BN absorbs it (from_conv keeps it: in eval mode a BN does not absorb it)."""
    return ConvGeometry.from_module(conv, bias=conv.bias is not None and (init == "from_conv" or not has_post_bn))


def _choose_block(choice: str, geom: ConvGeometry, *, first: bool, shortcut: bool, s: _Settings) -> str | None:
    """The block name for a conv the policy answered ``choice`` for (a block name or
    ``"default"``); ``None``: the default policy leaves it plain."""
    if choice != "default":
        return choice
    # a stacked stem (orepa_large) cannot start as the conv's kernel: from_conv uses orepa
    name = default_block_for(geom, block=s.block, first=first and s.init == "fresh", shortcut=shortcut,
                             policy=s.rule, reparam_1x1=s.reparam_1x1)
    return "orepa" if name == "orepa_large" and s.init == "from_conv" else name


def _why_plain(reparam_1x1: bool) -> str:
    return "a 1x1 on a basic block's residual shortcut stays plain (paper)" if reparam_1x1 else \
        "reparam_1x1=False: 1x1 convs stay plain (the paper's Tab. 2 ablation)"


def _build(name: str, geom: ConvGeometry, conv: nn.Module, s: _Settings) -> Any:
    """Block ``name``'s expression for ``geom``, on the conv's device and dtype."""
    return build_block(name, geom, mode=s.mode, scaling=s.scaling, **s.options).to(device=conv.weight.device,
                                                                                  dtype=conv.weight.dtype)


def _init(expr: Any, conv: nn.Module, init: str) -> str:
    """Initialise the built block ``expr`` as ``init`` says; how it was initialised."""
    if init == "from_conv":
        return f"from_conv (branch {init_from_conv(expr, conv)!r} = the conv, other branches 0)"
    return "fresh (the conv's weights are not used)"


def _wrap(expr: Any, name: str, geom: ConvGeometry, site: _ConvSite, s: _Settings) -> nn.Module:
    """The module that runs ``expr`` (online, offline or hybrid), with a post-BN inserted
    where none follows the conv, in the conv's training mode and ``requires_grad`` flags."""
    conv = site.conv
    inserted = None
    if _inserts_bn(site, s):
        inserted = _BN_FOR_DIMS[geom.dims](geom.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
        if s.init == "from_conv":
            identity_bn_(inserted)
    cls = HybridBlock if isinstance(expr, HybridExpr) else OnlineConv if s.mode == "online" else OfflineBlock
    new = cls(expr, inserted, block=name)
    new.bias_from_inserted_bn = inserted is not None and conv.bias is None
    new.train(conv.training)
    copy_frozen(new, conv)  # a block made from a frozen conv is frozen
    return new


def _inserts_bn(site: _ConvSite, s: _Settings) -> bool:
    """Whether the block of ``site`` gets an inserted post-BN (no BN follows the conv)."""
    return s.post_bn and site.bn_name is None and s.inserts_bn


def _place(work: nn.Module, site: _ConvSite, new: nn.Module, s: _Settings) -> str:
    """Put ``new`` in the conv's place; with ``post_bn=False`` remove the following BN (a
    norm-plus-activation module loses its norm only). What the block's post-BN is."""
    _set(work, site.name, new)
    if site.bn_name is None:
        return "inserted" if _inserts_bn(site, s) else "none"
    bn = work.get_submodule(site.bn_name)
    norm_act = match_norm_act(bn, s.rules)
    stays = f"; {norm_act.activation} stays after it" if norm_act is not None else ""
    if s.post_bn:
        return f"{site.bn_name} (existing{stays})"
    _set(work, site.bn_name, norm_act.tail_of(bn) if norm_act is not None else nn.Identity())
    return f"{site.bn_name} removed (post_bn=False{stays})"


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -- report -----------------------------------------------------------------------------------


def _finish(report: TransformReport, work: nn.Module, model: nn.Module, t0: float) -> None:
    """Complete the report; warn when no conv was transformed."""
    report.convs_after = count_convs(work)
    report.params_after = count_params(work)
    report.seconds = time.perf_counter() - t0
    if not report.by_action("transformed") and not report.by_action("linearized"):
        warnings.warn(
            f"orepa_transform: no eligible conv in {type(model).__name__}; the model is returned unchanged"
            + (f" ({len(report.entries)} conv(s) left as they are: "
               + "; ".join(f"{e.name}: {e.reason}" for e in report.entries[:5]) + ")" if report.entries else ""),
            UserWarning,
            stacklevel=3,  # orepa_transform's caller
        )
    log.info("%s", report.summary())


def _describe(m: nn.Module) -> str:
    if isinstance(m, _CONVS):
        try:
            return ConvGeometry.from_module(m).describe()
        except RepCompilerError:
            pass
    return type(m).__name__

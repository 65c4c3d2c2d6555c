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

``policy="all"`` is the earlier rule: every 1x1 -> ``orepa_1x1``, ``orepa_large`` only for
the first conv (odd kernel, some dim >= 5), every other kxk -> ``orepa``.

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

The report (``return_report=True``) is a :class:`repcompiler.explain.report.TransformReport`
with one entry per conv: action ``"transformed"`` (``details["block"]``,
``details["post_bn"]``), ``"kept"`` (the policy skipped it) or ``"refused"``
(unsupported; ``reason`` says why); parts that did not trace are in ``skipped``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from ..blocks import MODES, SCALINGS, ConvGeometry, build_block, get_block
from ..blocks.init import INITS, copy_frozen, identity_bn_, init_from_conv, trained_evidence
from ..errors import RepCompilerError, check_choice
from ..online.conv import HybridBlock, HybridExpr, OfflineBlock, OnlineConv
from .linearize import linearize_regions
from ..analysis.norm_act import match_norm_act
from ..analysis.regions import analyse_model
from ..analysis.pairing import pair_by_order, pair_by_regions
from ..analysis.policy import POLICIES, Policy, check_policy_and_options, default_block_for, policy_choice, shortcut_convs
from ..explain.report import TransformReport, count_convs, count_params
from ..explain.opaque import conv_reason
from ..analysis.inputs import check_flags, check_model, check_weights, copy_model
from ..analysis.isolation import preserved_state
from ..analysis.uses import tied_pins

__all__ = ["orepa_transform", "Policy", "POLICIES", "default_block_for"]

log = logging.getLogger(__name__)

from ..algebra import CONV_TYPES as _CONVS
_BN_FOR_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# -- finding "conv followed by BN" ------------------------------------------------------


@dataclass
class _ConvSite:
    name: str
    conv: nn.Module
    bn_name: str | None = None
    how: str = ""


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONVS)


def _inside_block(name: str, blocks: list[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)



# -- the transform -----------------------------------------------------------------------


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
            branches' init values, not learnable) or ``"none"`` (no scale: every branch
            weighted 1).
        post_bn: ``False`` removes the post-BN (following BNs become ``nn.Identity``).
        block_options: extra builder options, passed to each block that accepts them
            (e.g. ``{"prior": None}``; see the module docstring).
        return_report: also return the :class:`TransformReport`.

    Returns:
        The transformed model (and the report).
    """
    check_model(model, "orepa_transform")
    check_flags("orepa_transform", inplace=inplace, post_bn=post_bn, return_report=return_report,
                insert_bn=insert_bn, optional=("insert_bn",))
    check_weights(model, "orepa_transform", allow_meta=True)  # NaN/inf would be copied into (from_conv) or kept
    check_choice("mode", mode, MODES, owner="orepa_transform")
    check_choice("scaling", scaling, SCALINGS, owner="orepa_transform")
    if init is None:
        init = "fresh"
        evidence = trained_evidence(model)
        if evidence:
            warnings.warn(
                f"orepa_transform: {type(model).__name__} looks trained ({'; '.join(evidence)}), but init='fresh' "
                "(the default) gives every block new parameters and does not use the convs' weights. To fine-tune "
                "it, pass init='from_conv' (each block starts as the conv it replaces); to train from scratch, "
                "pass init='fresh'.",
                UserWarning,
                stacklevel=2,
            )
    check_choice("init", init, INITS, owner="orepa_transform")
    if block != "orepa":
        get_block(block)  # raises for an unknown name
    rule, options = check_policy_and_options(policy, block, block_options)
    reparam_1x1 = bool(options.pop("reparam_1x1", True))  # read by the default policy, not a builder
    t0 = time.perf_counter()
    work = copy_model(model, "orepa_transform", inplace)
    # analysis reads parametrized weights (a power iteration in training mode) and runs checks:
    # the modules the model keeps get their state back
    with preserved_state(work):
        report = TransformReport(title="orepa_transform", convs_before=count_convs(work), params_before=count_params(work))

        # One capture and one region analysis (training mode: linearize needs the training
        # forward) serve both steps below: the conv -> BN pairing and the shortcut analysis
        # are read from the units' graphs first, since linearizing rewrites them.
        analysis = analyse_model(work, training=True, bns_become_scales=True)
        pairs, order, covered, skipped = pair_by_regions(work, analysis)
        shortcuts = shortcut_convs(work, analysis.traced) if block == "orepa" and rule == "paper" else set()

        # Existing multi-branch blocks (RepVGG, DBB, ACNet, MobileOne, ...): each is
        # linearized whole into one online conv (mode="offline": left in its BN-per-branch
        # form) instead of wrapping each of its convs; see repcompiler.linearize.
        # Their branch BNs become scales, so a post-BN is inserted unless insert_bn=False (with
        # from_conv: from_bn, scales from the BNs and the post-BN the identity in eval mode)
        _, in_blocks = linearize_regions(work, scaling=scaling, post_bn=post_bn and insert_bn is not False, mode=mode,
                                         init="from_bn" if init == "from_conv" else "default", report=report,
                                         analysis=analysis)
        report.skipped += skipped
        order = [n for n in order if n not in in_blocks]  # the first conv left (a stem) after linearizing
        if insert_bn is None:
            insert_bn = init == "fresh"

        # modules used other than by their call, or holding a tensor another module holds, stay
        pinned = {**tied_pins(work), **analysis.pinned}

        # modules inside existing blocks are not touched
        existing = [n for n, m in work.named_modules() if isinstance(m, (OnlineConv, OfflineBlock))]

        def is_covered(name: str) -> bool:
            return any(c == "" or name == c or name.startswith(c + ".") for c in covered)

        sites: list[_ConvSite] = []
        others: list[tuple[str, str]] = []
        seen: dict[int, str] = {}
        for name, m in work.named_modules(remove_duplicate=False):
            if not name or _inside_block(name, existing) or isinstance(m, (OnlineConv, OfflineBlock)):
                continue
            if name in in_blocks:  # part of an existing multi-branch block (see above)
                continue
            if isinstance(m, nn.modules.conv._ConvNd):
                why = conv_reason(m, block=True)  # the registry decides what is a plain conv
                if why is None and name in pinned:  # its tensors are used elsewhere, or tied (repcompiler.analysis.uses)
                    why = f"{pinned[name]}; a block would replace it"
                if not _is_conv(m) or why:
                    others.append((name, why or "not a conv"))
                    continue
                if name in pairs:
                    sites.append(_ConvSite(name, m, pairs[name], "trace"))
                elif is_covered(name):
                    # inside a traced unit but never called there (a head the forward does not
                    # run, GoogLeNet's aux heads): its BN by module order, as in untraced parts
                    sites.append(_ConvSite(name, m, pair_by_order(work, name), "module order (not called in the "
                                           "traced graph)"))
                else:
                    sites.append(_ConvSite(name, m, pair_by_order(work, name), "module order"))
        first_name = order[0] if order else (sites[0].name if sites else None)

        for name, why in others:
            report.add(name, _describe(work.get_submodule(name)), "refused", why)

        built: dict[int, nn.Module] = {}
        for site in sites:
            conv = site.conv
            desc = _describe(conv)
            if id(conv) in built:
                _set(work, site.name, built[id(conv)])
                report.add(site.name, desc, "transformed", "shared module: the block of " + seen[id(conv)])
                continue
            choice, _ = policy_choice(policy, site.name, conv)
            if choice is None:
                report.add(site.name, desc, "kept", "policy")
                continue
            has_bn = site.bn_name is not None
            will_have_post = post_bn and (has_bn or insert_bn)
            try:
                # from_conv keeps the conv's bias (eval mode: a BN does not absorb it)
                geom = ConvGeometry.from_module(conv, bias=conv.bias is not None and (init == "from_conv"
                                                                                     or not will_have_post))
                # a stacked stem (orepa_large) cannot start as the conv's kernel: from_conv uses orepa
                first = site.name == first_name and init == "fresh"
                name = default_block_for(geom, block=block, first=first,  # type: ignore[assignment]
                                         shortcut=site.name in shortcuts, policy=rule,
                                         reparam_1x1=reparam_1x1) if choice == "default" else choice
                if name is None:
                    why = "a 1x1 on a basic block's residual shortcut stays plain (paper)" if reparam_1x1 else \
                        "reparam_1x1=False: 1x1 convs stay plain (the paper's Tab. 2 ablation)"
                    report.add(site.name, desc, "kept", "policy: " + why)
                    continue
                if name == "orepa_large" and choice == "default" and init == "from_conv":
                    name = "orepa"
                expr = build_block(name, geom, mode=mode, scaling=scaling, **options).to(device=conv.weight.device,
                                                                                         dtype=conv.weight.dtype)
                init_note = "fresh (the conv's weights are not used)"
                if init == "from_conv":
                    init_note = f"from_conv (branch {init_from_conv(expr, conv)!r} = the conv, other branches 0)"
            except RepCompilerError as exc:
                why = f"init='from_conv': {exc}" if init == "from_conv" else str(exc)
                report.add(site.name, desc, "refused", why, count_params(conv), count_params(conv))
                continue
            inserted = None
            if post_bn and not has_bn and insert_bn:
                inserted = _BN_FOR_DIMS[geom.dims](geom.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
                if init == "from_conv":
                    identity_bn_(inserted)
            cls = HybridBlock if isinstance(expr, HybridExpr) else OnlineConv if mode == "online" else OfflineBlock
            new = cls(expr, inserted, block=name)
            new.bias_from_inserted_bn = inserted is not None and conv.bias is None
            new.train(conv.training)
            copy_frozen(new, conv)  # a block made from a frozen conv is frozen
            _set(work, site.name, new)
            built[id(conv)] = new
            seen[id(conv)] = site.name
            norm_act = match_norm_act(work.get_submodule(site.bn_name)) if has_bn else None
            stays = f"; {norm_act.activation} stays after it" if norm_act is not None else ""
            if has_bn and post_bn:
                bn_note = f"{site.bn_name} (existing{stays})"
            elif has_bn:
                # a norm-plus-activation module loses its norm only: its activation stays
                _set(work, site.bn_name, norm_act.tail_of(work.get_submodule(site.bn_name)) if norm_act is not None
                     else nn.Identity())
                bn_note = f"{site.bn_name} removed (post_bn=False{stays})"
            elif inserted is not None:
                bn_note = "inserted"
            else:
                bn_note = "none"
            reason = f"{name}, post-BN: {bn_note}, init: {init_note}" + (
                "" if site.how == "trace" else f" (BN pairing: {site.how})")
            if not conv.weight.requires_grad:
                reason += ", frozen"
            report.add(site.name, desc, "transformed", reason, count_params(conv), count_params(new),
                       block=name, post_bn=bn_note, init=init_note, frozen=not conv.weight.requires_grad)

    report.convs_after = count_convs(work)
    report.params_after = count_params(work)
    report.seconds = time.perf_counter() - t0
    if not report.by_action("transformed") and not report.by_action("linearized"):
        warnings.warn(
            f"orepa_transform: no eligible conv in {type(model).__name__}; the model is returned unchanged"
            + (f" ({len(report.entries)} conv(s) left as they are: "
               + "; ".join(f"{e.name}: {e.reason}" for e in report.entries[:5]) + ")" if report.entries else ""),
            UserWarning,
            stacklevel=2,
        )
    log.info("%s", report.summary())
    return (work, report) if return_report else work


def _describe(m: nn.Module) -> str:
    if _is_conv(m):
        try:
            return ConvGeometry.from_module(m).describe()
        except RepCompilerError:
            pass
    return type(m).__name__

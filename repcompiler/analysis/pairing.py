"""Which BatchNorm follows each conv of a model: the pairing ``orepa_transform`` uses
to decide where a block's post-BN already is.

The pairing reads the model's one capture and region analysis
(:class:`repcompiler.analysis.regions.ModelAnalysis`: traced units and their linear regions,
the same analysis ``linearize`` selects its multi-branch blocks from, so
``orepa_transform`` traces each unit once): a conv whose only user is a BatchNorm in
an exact region is paired with it, and so is a conv whose only user is a
norm-plus-activation module (:mod:`repcompiler.analysis.norm_act`: timm's ``BatchNormAct2d``;
the module is its post-BN, the activation stays after it). Parts that do not trace fall back to sibling order
in the parent module (:func:`pair_by_order`).
"""

from __future__ import annotations

from torch import nn

from ..rules.registry import RuleRegistry
from .regions import ModelAnalysis, analyse_model
from .norm_act import match_norm_act
from ..passes.regions.lowering import is_rank_read
from ..passes.find_regions import Region
from ..rules.registry import RuleRegistry

__all__ = ["region_pairs", "norm_act_pairs", "pair_by_regions", "pair_by_order"]

from ..algebra import CONV_TYPES as _CONVS
_BNS = nn.modules.batchnorm._BatchNorm


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONVS)


def region_pairs(gm: nn.Module, region: Region) -> dict[str, str]:
    """``conv -> bn`` targets of an exact region: a conv whose only user is a BatchNorm
    (module calls, each called once: the analysis makes shared modules opaque). In a
    ``chain`` region that is its first two ops; in a region of branches, per branch."""
    if not region.exact:
        return {}
    inside, out = set(region.nodes), {}
    for n in region.nodes:
        users = list(n.users)
        if n.op != "call_module" or not _is_conv(gm.get_submodule(str(n.target))) or len(users) != 1:
            continue
        u = users[0]
        if u in inside and u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), _BNS) \
                and u.args[:1] == (n,):
            out[str(n.target)] = str(u.target)
    return out


def norm_act_pairs(gm: nn.Module, rules: RuleRegistry | None = None) -> dict[str, str]:
    """``conv -> module`` targets where a conv's only user (reads of its dims aside) is a
    call of a norm-plus-activation module (:func:`repcompiler.analysis.norm_act.match_norm_act`,
    e.g. timm's ``BatchNormAct2d``) over the conv's channels: the module is the conv's
    post-BN (its activation stays after it). ``rules``: the registry the module is
    matched with (default: :func:`~repcompiler.rules.defaults.default_rules`)."""
    out: dict[str, str] = {}
    graph = getattr(gm, "graph", None)
    if graph is None:
        return out
    for n in graph.nodes:
        if n.op != "call_module" or not _is_conv(gm.get_submodule(str(n.target))):
            continue
        users = [u for u in n.users if not is_rank_read(u)]
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (n,):
            continue
        m = gm.get_submodule(str(users[0].target))
        match = match_norm_act(m, rules)
        if match is not None and match.num_features == gm.get_submodule(str(n.target)).out_channels:
            out[str(n.target)] = str(users[0].target)
    return out


def pair_by_regions(
    model: nn.Module, analysis: ModelAnalysis | None = None, *, rules: RuleRegistry | None = None
) -> tuple[dict[str, str | None], list[str], set[str], list[tuple[str, str]]]:
    """``conv name -> following BN name or None`` for traced convs (the conv -> BN pairs
    are the ``chain`` regions of the region analysis that start with a conv and its BN),
    the traced conv names in graph order, the module names covered by traced units and
    the parts that did not trace ``(path, reason)``.

    ``analysis``: the model's capture and regions (read before anything rewrote the
    units' graphs); by default the model is traced and analysed here. ``rules``: the
    registry (default: :func:`~repcompiler.rules.defaults.default_rules`), the one
    ``analysis`` was made with."""
    pairs: dict[str, str | None] = {}
    order: list[str] = []
    covered: set[str] = set()
    skipped: list[tuple[str, str]] = []
    analysis = analysis if analysis is not None else analyse_model(model, rules=rules)
    res = analysis.traced
    for path, reason in res.skipped:
        skipped.append((path, f"{reason}; its convs are paired with BNs by module order"))
    for unit in res.units:
        prefix = unit.path + "." if unit.path else ""
        covered.add(unit.path)
        found = {c: b for r in analysis.regions[unit.path] for c, b in region_pairs(unit.gm, r).items()}
        found.update({c: b for c, b in norm_act_pairs(unit.gm, rules).items() if c not in found})
        for node in unit.gm.graph.nodes:
            if node.op != "call_module" or not _is_conv(unit.gm.get_submodule(node.target)):
                continue
            qname = prefix + str(node.target)
            if qname not in order:
                order.append(qname)
            bn = found.get(str(node.target))
            bn = prefix + bn if bn is not None else None
            if qname in pairs and pairs[qname] != bn:
                bn = None  # reached from several units: no single post-BN
            pairs[qname] = bn
    return pairs, order, covered, skipped


def pair_by_order(model: nn.Module, name: str) -> str | None:
    """The BatchNorm that follows conv ``name`` in its parent module's child order (the
    next sibling, a BatchNorm over the conv's output channels), or ``None``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = [n for n, _ in parent.named_children()]
    conv = getattr(parent, child)
    i = names.index(child)
    if i + 1 < len(names):
        nxt = getattr(parent, names[i + 1])
        if isinstance(nxt, _BNS) and nxt.num_features == conv.out_channels:
            return (parent_name + "." if parent_name else "") + names[i + 1]
    return None

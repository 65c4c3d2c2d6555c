"""Which region ending at a node is folded: cost, conv chains and best sub-regions.

Given the candidates ending at an exit (smallest first, see
:mod:`~repcompiler.passes.regions.dominance`), :func:`choose_region` takes the largest
one that is exact and worth folding. A region is **not worth** folding when the folded
conv would be bigger than the convs it replaces (a low-rank ``1x1 -> 1x1`` bottleneck
or a depthwise-separable pair stays factorized) or, unless ``merge_convs``, when it is
a plain *chain* of two or more convs (a model's own consecutive convs keep their
layout, so a plain model keeps its conv count). A smaller candidate is skipped when it
would separate a BN/affine from the conv before it. The largest candidate holding a
conv that was refused is returned too, so the report can say why.
:func:`worth_alone` decides for a region of one effective op (a lone plain conv is
not worth rewriting).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ... import algebra as A
from .dominance import Candidate
from .expression import build_region
from .lowering import CONV_FUNCTIONS, PLAIN_LEAVES, LoweredGraph, fetch_attr, is_identity_call, is_rank_read
from .region import Region

__all__ = ["choose_region", "not_worth", "worth_alone", "region_cost"]

from ...algebra import CONV_TYPES as _CONVS
_AFFINES = (A.Affine, A.BatchNorm)


def choose_region(g: LoweredGraph, cands: list[Candidate], e: fx.Node,
                  merge_convs: bool) -> tuple[Region | None, Region | None]:
    """``(chosen, refused)`` among ``cands`` (regions ending at ``e``), see the module
    docstring; either may be ``None``."""
    refused: Region | None = None
    chosen: Region | None = None
    for idx, (d, body, aliases) in enumerate(reversed(cands)):
        reg = build_region(g, d, e, body, aliases)
        if len(body) == 1:
            chosen = reg
            break
        if reg.exact:
            why_not = not_worth(g, reg, merge_convs)
            if why_not:
                reg.worth = False
                reg.notes.append(why_not)
            elif idx > 0 and _cuts_pair(g, d, body):
                continue
            else:
                chosen = reg
                break
        if refused is None and reg.has_conv:
            refused = reg
    return chosen, refused


def not_worth(g: LoweredGraph, reg: Region, merge_convs: bool) -> str:
    """Why folding the exact region ``reg`` is not worth it ('' when it is): it would
    make the convolution bigger, or it is a chain of convs (unless ``merge_convs``)."""
    before, after = region_cost(g, reg)
    if after > before:
        return (f"folding would make the convolution bigger ({before:,} -> {after:,} weights): "
                "the region is a factorized (low-rank or separable) conv, kept as it is")
    if reg.kind == "chain" and _n_convs(g, reg) > 1 and not merge_convs:
        return "a chain of convolutions is kept as separate convs (merge_convs=True merges it)"
    return ""


def worth_alone(g: LoweredGraph, region: Region) -> bool:
    """False for a region whose only effective op (identity calls aside) is a plain
    conv, or that holds no conv: there is nothing to fold. Sets ``region.worth``."""
    effective = [n for n in region.nodes if not is_identity_call(g.gm, n)]
    if len(effective) > 1:
        return True
    only = effective[0] if effective else region.nodes[0]
    region.worth = not (
        (only.op == "call_module" and type(fetch_attr(g.gm, str(only.target))) in _CONVS)
        or (only.op == "call_function" and only.target in CONV_FUNCTIONS)
    )
    return region.worth and region.has_conv


def _conv_cost(spec: Any) -> int:
    k = 1
    for v in spec.kernel_size:
        k *= v
    return spec.out_channels * (spec.in_channels // spec.groups) * k


def region_cost(g: LoweredGraph, reg: Region) -> tuple[int, int]:
    """Weights of the region's conv-like ops (plain per-channel leaves count 0) and of
    the folded conv."""
    before = 0
    for n in reg.nodes:
        if g.kind[n] == "unary" and not isinstance(g.lowered[n], PLAIN_LEAVES):
            before += _conv_cost(g.lowered[n].spec)
    after = _conv_cost(reg.expr.spec) if reg.expr is not None else 0
    return before, after


def _n_convs(g: LoweredGraph, reg: Region) -> int:
    return sum(1 for n in reg.nodes if g.kind[n] == "unary" and not isinstance(g.lowered[n], PLAIN_LEAVES))


def _cuts_pair(g: LoweredGraph, d: fx.Node, body: set[fx.Node]) -> bool:
    """True if the region would start with per-channel affine ops (BN, scale) that
    belong with the conv-like op ``d`` before them (take a BN away from its conv)."""
    users = [u for u in d.users if not is_rank_read(u)]
    if not g.linear(d) or any(u not in body for u in users):
        return False
    if g.kind.get(d) == "unary" and isinstance(g.lowered.get(d), PLAIN_LEAVES):
        return False  # d is itself per-channel (a BN): nothing before it to keep a pair with
    return all(g.kind.get(u) == "unary" and isinstance(g.lowered.get(u), _AFFINES) for u in users)

"""Assembling a region's kernel-algebra expression from its lowered nodes.

:func:`build_region` turns a candidate ``(entry, body, aliases)`` into a
:class:`~repcompiler.passes.regions.region.Region`: each ``unary`` node's lowering is
composed after its input's expression (``Seq``), sums become ``Sum`` (a subtraction
negates its second term), channel concats ``Concat``; the entry and its aliases are
the identity. The expression's own constant buffers are cast to the region's dtype
(:func:`match_dtype`), then it is planned: the algebra's reasons (inexact borders,
misaligned windows, ...) become the region's ``reasons``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ... import algebra as A
from ...errors import RepCompilerError
from .lowering import PLAIN_LEAVES, LoweredGraph, fetch_attr
from .region import Region, region_name

__all__ = ["build_region", "region_dtype", "match_dtype"]


def build_region(g: LoweredGraph, d: fx.Node, e: fx.Node, body: set[fx.Node], aliases: list[fx.Node]) -> Region:
    """The region with entry ``d``, exit ``e``, nodes ``body`` and ``aliases`` of ``d``."""
    same = {d, *aliases}  # values equal to the entry's
    nodes = sorted(body, key=g.order.__getitem__)
    dims = g.dims.get(e) or g.dims.get(d) or 2
    cin = g.chan.get(d)
    memo: dict[fx.Node, A.Expr | None] = {}
    reasons: list[str] = []

    def identity() -> A.Expr:
        if cin is None:
            raise _NoChannels()
        return A.Identity(cin, dims)

    def build(n: fx.Node) -> A.Expr | None:
        if n in same:
            return None
        if n in memo:
            return memo[n]
        k = g.kind[n]
        if k == "unary":
            prev = build(g.data_in[n][0])
            out = g.lowered[n] if prev is None else A.Seq(prev, g.lowered[n])
        else:
            if k == "cat":
                args = list(n.args[0] if n.args else n.kwargs["tensors"])  # type: ignore[arg-type]
            else:
                args = list(n.args)
            terms = [build(a) or identity() for a in args]
            if k == "sum":
                if g.sign[n] < 0:
                    terms[1] = A.Seq(terms[1], A.Constant(terms[1].spec.out_channels, dims, -1.0, name="neg"))
                out = A.Sum(*terms)
            else:
                out = A.Concat(*terms)
        memo[n] = out
        return out

    expr: A.Expr | None
    try:
        expr = build(e)
        if expr is None:  # pragma: no cover - e is never d
            expr = identity()
        match_dtype(expr, region_dtype(g, nodes, d))
        spec, rs = expr.plan()
        reasons.extend(rs)
        if spec is None and not rs:
            reasons.append("the branches have no common folded form")
    except _NoChannels:
        expr = None
        reasons.append(f"channel count of {d.name} unknown (pass example_inputs to fold)")
    except RepCompilerError as exc:  # IncompatibleError and friends: the branches do not combine
        expr = None
        reasons.append(f"{type(exc).__name__}: {exc}")
    kinds = {g.kind[n] for n in nodes}
    kind = "concat" if "cat" in kinds else "branches" if "sum" in kinds else "chain"
    has_conv = any(g.kind[n] == "unary" and not isinstance(g.lowered[n], PLAIN_LEAVES) for n in nodes)
    return Region(
        entry=d,
        exit=e,
        nodes=nodes,
        expr=expr,
        reasons=tuple(reasons),
        kind=kind,
        dims=dims,
        in_channels=cin or 0,
        has_conv=has_conv,
        name=region_name(nodes),
        aliases=list(aliases),
    )


def region_dtype(g: LoweredGraph, nodes: list[fx.Node], entry: fx.Node) -> torch.dtype:
    """The floating dtype the region computes in (its modules' or the input's)."""
    for n in [entry] + nodes:
        tm = n.meta.get("tensor_meta")
        dt = getattr(tm, "dtype", None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    for n in nodes:
        if n.op == "call_module":
            m = fetch_attr(g.gm, str(n.target))
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_floating_point():
                    return t.dtype
        for a in n.all_input_nodes:
            if g.constant(a):
                try:
                    v = g.value(a)
                except Exception:  # evaluating the graph's constant operands runs the user's code
                    continue
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    return v.dtype
    return torch.get_default_dtype()


def match_dtype(expr: A.Expr, dtype: torch.dtype) -> None:
    """Cast the expression leaves' *own* floating buffers (constants made by rules,
    identity/pool anchors) to ``dtype``; the user's modules are never touched."""
    for leaf in expr.modules():
        if not isinstance(leaf, A.Expr):
            continue
        for name, b in list(leaf._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                leaf._buffers[name] = b.to(dtype)


class _NoChannels(Exception):
    pass

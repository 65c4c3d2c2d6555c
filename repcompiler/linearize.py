"""``linearize``: OREPA's block linearization and squeezing for models someone else wrote.

A user who already trains RepVGG, DBB, ACNet or MobileOne style blocks (their own
code, timm's ``repvgg_*`` / ``mobileone_*`` in training form, a YOLO neck with RepConv)
gets OREPA's training cost without rewriting the model::

    model = rc.linearize(timm.create_model("repvgg_a0"))   # one conv per block per forward
    ...train...
    plain = rc.deploy(model)                               # one plain conv per block

What it does (arXiv 2204.00826, Sec. 3):

1. **trace** the model (:func:`repcompiler.tracing.trace_units`; untraceable parts are
   skipped and reported) and **find linear regions**
   (:func:`passes.find_regions.find_regions`, with BNs lowered as BNs);
2. **select** the multi-branch regions: a region (single entry, single exit, all ops
   linear in eval mode) that adds (or concatenates) branches and holds a BN before its
   output. Branches may be ``conv -> BN``, ``conv -> BN -> conv -> BN``, average
   pooling, identity, or a bare BN (RepVGG's skip); anything linear the rule
   registry lowers. Each selected region is rewritten **inside the module that owns
   it** (the deepest module whose ``forward`` contains every op of the region, e.g.
   timm's ``RepVggBlock``): that module is re-traced and replaced by its rewritten
   ``GraphModule`` (class name kept; modules outside the region keep their qualified
   names and ``state_dict`` keys; the block's own methods, such as timm's
   ``reparameterize``, are gone on purpose: they would be wrong now). A region owned by
   the root is rewritten in the root's own hierarchy and the root keeps its class
   (a subclass with the rewritten ``forward`` is swapped in);
3. **BN -> scale** (:mod:`passes.bn_to_scale`): every BN of the region except one
   producing its output becomes a learnable per-channel scale (``scaling="vector"``),
   a scalar (``"scalar"``) or nothing (``"none"``), plus a learnable bias for the BN's
   shift;
4. **post-BN** (:mod:`passes.insert_post_bn`): one BN after the branches' sum, where
   the region has none (``post_bn=False``: the paper's ablation, none is inserted; a
   BN that already follows the sum is kept);
5. **squeeze**: the region becomes one :class:`~repcompiler.online.OnlineConv` (its
   kernel generated from the branch parameters inside autograd every forward, then
   one convolution on the feature map, then the post-BN), installed at the qualified
   name of the region's largest-kernel conv; the region's other modules become
   ``nn.Identity`` under their names.

Nonlinear parts (activations, SE/attention, drop-path, anything without a rule) stay
where they are. An op without a rule *between* two sums of a block ends the region:
timm's ``RepVggBlock`` with ``drop_path_rate > 0`` computes
``drop_path(conv_1x1(x) + conv_kxk(x)) + identity_bn(x)``, so its two conv branches
become one online conv (+ post-BN) and the identity BN stays a BN (drop-path applies to
the conv branches only; merging the identity into the conv would change that).

Each online block's kernel generator is :meth:`LinearizedSum.fast_fold` (the region's
expression is first simplified by :func:`simplify`: no-op leaves dropped, nested sums
flattened); it adds the smaller branch kernels in place into the largest one.

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

**The rule for** :func:`repcompiler.orepa_transform` **(item 3 of issue 7):** a conv
that already belongs to a multi-branch block (a region this module selects) is not
wrapped in a new OREPA block; the whole block is linearized instead (one online conv
per block, e.g. one per timm ``RepVggBlock``). :func:`linearize_regions` is the hook:
``orepa_transform`` calls it on its working copy first and skips the conv names it
returns.

timm: timm's ``BatchNormAct2d`` (a ``BatchNorm2d`` subclass with its own ``forward``)
lowers as a BN when its activation and drop are ``nn.Identity`` (RepVGG/MobileOne
branches); this rule is private to linearize (a global rule would make a BN+ReLU
module a tracer leaf for ``fold`` too).
"""

from __future__ import annotations

import logging
import operator
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import algebra as A
from .blocks import MODES
from .errors import RepCompilerError, VerificationError, check_choice
from .verify import compare_outputs as _compare_outputs
from .online import OfflineBlock, OnlineConv
from .report import TransformReport, count_convs, count_params
from .rules import LowerInfo, RuleRegistry, default_rules
from .entry import check_model, copy_model
from .tracing import trace_model, trace_units
from .passes.base import run_passes
from .passes.bn_to_scale import BnToScale, META_LINEARIZE, branch_bns, check_options, iter_leaves
from .passes.find_regions import _ELEMENTWISE_FUNCS, _ELEMENTWISE_MODULES, find_regions, node_owner
from .passes.insert_post_bn import InsertPostBN, META_POST_BN
from .passes.squeeze import region_reference, relative_error, squeeze_region, tolerance_for

__all__ = [
    "linearize",
    "linearize_regions",
    "find_linearizable",
    "LinearizeCandidate",
    "linearize_rules",
    "LinearizedSum",
    "simplify",
]

log = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUM_TARGETS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_SUM_METHODS = {"add", "add_", "sub", "sub_"}


# -- rules ------------------------------------------------------------------------------


def _lower_timm_bn_act(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    """timm ``BatchNormAct2d`` with identity act/drop is a BN (in both modes)."""
    if not isinstance(getattr(m, "act", None), nn.Identity) or not isinstance(getattr(m, "drop", None), nn.Identity):
        return None
    if m.running_mean is None or m.running_var is None:
        return None
    return A.BatchNorm(m, dims=info.dims, name=info.name or type(m).__name__)


def linearize_rules(base: RuleRegistry | None = None) -> RuleRegistry:
    """The rule registry linearize uses: ``base`` (default: the global registry) plus
    the timm ``BatchNormAct2d`` rule when timm is loaded (see the module docstring)."""
    rules = (base or default_rules).copy()
    norm_act = sys.modules.get("timm.layers.norm_act")
    cls = getattr(norm_act, "BatchNormAct2d", None) if norm_act is not None else None
    if cls is not None and rules.lookup(cls) in (None, rules.lookup(nn.BatchNorm2d)):
        rules.register(cls, _lower_timm_bn_act, override=True)
    return rules


# -- analysis -----------------------------------------------------------------------------


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

    @property
    def ok(self) -> bool:
        return not self.reason


def _get(gm: fx.GraphModule, target: str) -> Any:
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def _owner_chain(node: fx.Node) -> list[str]:

    return node_owner(node)


def _owner(region) -> str:
    """Deepest module path whose forward created every node of ``region``."""
    chains = [_owner_chain(n) for n in region.nodes]
    if not chains:
        return ""
    common: list[str] = []
    for items in zip(*chains):
        if all(i == items[0] for i in items):
            common.append(items[0])
        else:
            break
    return common[-1] if common else ""


def _is_sum(n: fx.Node) -> bool:
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


def _partial_block(gm: fx.GraphModule, region) -> str:
    """A reason if ``region`` is only part of a block: its output is added to a branch
    that starts at the region's entry but is not linear."""
    for u in region.exit.users:
        if not _is_sum(u):
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


def _has_block_node(gm: fx.GraphModule, region) -> bool:
    return any(
        n.op == "call_module" and isinstance(_get(gm, str(n.target)), (OnlineConv, OfflineBlock)) for n in region.nodes
    )


def _classify(gm: fx.GraphModule, region) -> str | None:
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


_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_"}


def _is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_get(gm, str(n.target)), _ELEMENTWISE_MODULES)
    if n.op == "call_function":
        return n.target in _ELEMENTWISE_FUNCS
    if n.op == "call_method":
        return str(n.target) in _ACT_METHODS
    return False


def _scan_refusals(gm: fx.GraphModule, covered: set[fx.Node]) -> list[tuple[fx.Node, str]]:
    """Sums not in any selected region whose branches end in a BN that is not usable:
    ``BN -> nonlinearity -> add`` or a BN with ``track_running_stats=False``."""
    out: list[tuple[fx.Node, str]] = []
    for n in gm.graph.nodes:
        if n in covered or not _is_sum(n):
            continue
        reasons = []
        for a in _data_inputs(n):
            cur, acts = a, []
            while _is_activation(gm, cur) and len(_data_inputs(cur)) == 1:
                acts.append(cur)
                cur = _data_inputs(cur)[0]
            m = _get(gm, str(cur.target)) if cur.op == "call_module" else None
            if not isinstance(m, _BN):
                continue
            if acts:
                reasons.append(f"BN {cur.target} is followed by {_describe_node(gm, acts[-1])} before the add")
            elif m.running_mean is None or m.running_var is None or not isinstance(
                getattr(m, "act", nn.Identity()), nn.Identity
            ):
                reasons.append(_nonlinear_reason(gm, cur))
        if reasons:
            out.append((n, "; ".join(reasons)))
    return out


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def find_linearizable(
    model: nn.Module, *, rules: RuleRegistry | None = None
) -> tuple[list[LinearizeCandidate], list[tuple[str, str]]]:
    """Analyse ``model`` without changing it: the multi-branch BN blocks (linearizable
    or refused with the reason) and the parts that did not trace ``(path, reason)``."""

    rules = linearize_rules(rules)
    res = trace_units(model, rules=rules)
    cands: list[LinearizeCandidate] = []
    for unit in res.units:
        gm = unit.gm
        regions = find_regions(gm, rules)
        covered: set[fx.Node] = set()
        for r in regions:
            why = _classify(gm, r)
            if why is None:
                continue
            covered |= set(r.nodes)
            mods = [(str(n.target), _get(gm, str(n.target))) for n in r.nodes if n.op == "call_module"]
            cands.append(
                LinearizeCandidate(
                    name=_qual(unit.path, r.name) if not unit.path else f"{unit.path}: {r.name}",
                    owner=_qual(unit.path, _owner(r)),
                    convs=[_qual(unit.path, t) for t, m in mods if isinstance(m, _CONVS)],
                    bns=[_qual(unit.path, n) for n, _ in branch_bns(gm, r)],
                    reason=why,
                    kind=r.kind,
                    modules=frozenset(_qual(unit.path, t) for t, _ in mods),
                )
            )
            if why:
                covered |= set(r.exit.users)
        for node, why in _scan_refusals(gm, covered):
            owner = _qual(unit.path, (_owner_chain(node) or [""])[-1])
            cands.append(LinearizeCandidate(name=_qual(owner, node.name), owner=owner, reason=why))
    return cands, list(res.skipped)


# -- the squeezed expression: simplified, with a fast kernel generator ----------------------


class LinearizedSum(A.Sum):
    """The parallel sum of a linearized block's branches, with :meth:`fast_fold`.

    Same semantics as :class:`~repcompiler.algebra.Sum` (``fold`` is inherited and is
    the reference); :class:`~repcompiler.online.OnlineConv` calls ``fast_fold`` every
    training forward. It folds each branch, then adds the smaller branch kernels
    **in place into a slice** of the largest one (``W[:, :, 1:2, 1:2] += w_1x1`` for a
    1x1 branch, a scatter onto the diagonal for an identity/per-channel branch) instead
    of padding every branch to the full frame, stacking and summing: about a third of
    the full-size tensor traffic, forward and backward. Branches that need a spread
    (dilation) or other group structures fall back to the generic frame.
    """

    has_fast_fold = True

    def fast_fold(self) -> "A.Kernel":
        from .algebra.kernel import expand_groups, spread

        kernels = [t.fold(check=False) for t in self.terms]
        plan = A.parallel([k.spec for k in kernels])
        spec = plan.spec
        if spec is None or len(kernels) == 1:
            return self.fold(check=False)
        size = tuple(spec.kernel_size)
        groups = plan.groups
        base_i = next(
            (i for i, k in enumerate(kernels)
             if tuple(k.weight.shape[2:]) == size and k.spec.groups == groups
             and all(u == 1 for u in plan.ups[i]) and not any(plan.offsets[i])),
            None,
        )
        if base_i is None or groups != spec.groups:
            return A.add(kernels, check=False)
        w = kernels[base_i].weight
        # only edit a fresh tensor whose producer did not save it for backward
        fresh = w.grad_fn is not None and type(w.grad_fn).__name__ in ("MulBackward0", "CloneBackward0")
        if not fresh:
            w = w.clone()
        cin_g = w.shape[1]
        for i, k in enumerate(kernels):
            if i == base_i:
                continue
            up, off = plan.ups[i], plan.offsets[i]
            kw = k.weight.to(w.dtype)
            window = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(off, kw.shape[2:]))
            if any(u != 1 for u in up):
                w = w + spread(expand_groups(kw, k.spec.groups, groups), up, off, size)
            elif k.spec.groups == groups:
                w[window] += kw
            elif kw.shape[1] == 1 and k.spec.groups == kw.shape[0] and kw.shape[0] == w.shape[0]:
                # per-channel (identity-like) branch: channel c reads input c, which is
                # column c % (C / groups) of its group in the frame
                rows = torch.arange(kw.shape[0], device=kw.device)
                sub = w[window]
                sub.index_put_((rows, rows % cin_g), kw[:, 0], accumulate=True)
            else:
                w = w + spread(expand_groups(kw, k.spec.groups, groups), up, off, size)
        biases = [k.bias for k in kernels if k.bias is not None]
        bias = None
        if biases:
            bias = biases[0]
            for b in biases[1:]:
                bias = bias + b
        return A.Kernel(w, bias, spec)


def _is_noop(e: A.Expr) -> bool:
    if isinstance(e, A.Identity):
        return True
    if type(e) is A.Affine and e.scale is None and not isinstance(e.shift, nn.Parameter):
        return e.shift is None or not bool(e.shift.detach().ne(0).any())
    return False


def simplify(expr: A.Expr) -> A.Expr:
    """An equal expression without no-op leaves (identity, ``+ 0``) in sequences and
    with nested sums flattened into one :class:`LinearizedSum` (fewer kernel ops every
    training step). Leaves are reused, not copied."""
    if isinstance(expr, A.Concat):
        return A.Concat(*[simplify(t) for t in expr.terms])
    if isinstance(expr, A.Sum):
        flat: list[A.Expr] = []
        for t in expr.terms:
            t = simplify(t)
            if isinstance(t, A.Sum) and not isinstance(t, A.Concat):
                flat.extend(t.terms)
            else:
                flat.append(t)
        return LinearizedSum(*flat)
    if isinstance(expr, A.Seq):
        terms = [simplify(t) for t in expr.terms]
        kept = [t for t in terms if not _is_noop(t)]
        if not kept:
            return terms[0]
        return kept[0] if len(kept) == 1 else A.Seq(*kept)
    return expr


# -- rewriting ------------------------------------------------------------------------------


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    *prefix, last = path.split(".")
    parent = root.get_submodule(".".join(prefix)) if prefix else root
    setattr(parent, last, module)


def _main_conv(gm: fx.GraphModule, region) -> str | None:
    best, best_size = None, -1
    for n in region.nodes:
        if n.op != "call_module":
            continue
        m = _get(gm, str(n.target))
        if isinstance(m, _CONVS):
            size = m.weight[0].numel()
            if size > best_size:
                best, best_size = str(n.target), size
    return best


def _strip_post_bn(expr: A.Expr, bn: nn.Module) -> A.Expr:
    if isinstance(expr, A.Seq):
        terms = list(expr.terms)
        last = terms[-1]
        if isinstance(last, A.BatchNorm) and last.bn is bn:
            rest = terms[:-1]
            return rest[0] if len(rest) == 1 else A.Seq(*rest)
    raise RepCompilerError(f"internal: the post-BN is not the last term of {expr.label()}")


def _probe(spec, ref: Tensor, batch: int = 2) -> Tensor:
    size = [e + 2 * s + 3 for e, s in zip(spec.extent, spec.stride)]
    gen = torch.Generator().manual_seed(4321)
    x = torch.randn(batch, spec.in_channels, *size, generator=gen, dtype=torch.float64)
    return x.to(dtype=ref.dtype, device=ref.device)


class _EvalMode:
    """Temporarily put modules in eval mode (their flags restored on exit)."""

    def __init__(self, *modules: nn.Module) -> None:
        self.mods = [m for root in modules for m in root.modules()]

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.mods]
        for m in self.mods:
            m.training = False

    def __exit__(self, *exc: Any) -> None:
        for m, f in zip(self.mods, self.flags):
            m.training = f


def _verify(name: str, online: OnlineConv, ref: nn.Module | None) -> float:
    """Eval-mode check: the online block equals ``ref`` (the original region, for
    ``from_bn``) or its own unfolded branches (``default``)."""

    spec = online.expr.spec
    p = next(iter(online.parameters()))
    x = _probe(spec, p)
    with torch.no_grad(), _EvalMode(online, *([ref] if ref is not None else [])):
        got = online(x)
        want = ref(x) if ref is not None else online.deploy_expr()(x)
    if not isinstance(want, Tensor) or want.shape != got.shape:
        raise VerificationError(f"linearized region {name}: output shape {tuple(got.shape)} differs from the reference")
    err = relative_error(got, want)
    if not err <= tolerance_for(p.dtype):
        raise VerificationError(
            f"linearized region {name}: the online conv differs from "
            f"{'the original region' if ref is not None else 'its unfolded branches'} by relative {err:.3g}"
        )
    return err


@dataclass
class _Done:
    region: str
    owner: str
    target: str
    convs: list[str]
    bns: list[str]
    post_bn: str
    params_before: int
    params_after: int


def _copy_missing_attrs(gm: fx.GraphModule, root: nn.Module) -> None:
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        target = str(n.target)
        try:
            _fetch(root, target)
        except AttributeError:
            value = _fetch(gm, target)
            *prefix, last = target.split(".")
            parent = root.get_submodule(".".join(prefix)) if prefix else root
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                parent.register_buffer(last, value)
            else:
                setattr(parent, last, value)


def _fetch(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _linearized_class(base: type, src: str) -> type:
    """A subclass of ``base`` whose ``forward`` is the rewritten graph's code ``src``."""
    from torch.fx.graph_module import _forward_from_src

    cls = type(base.__name__, (base,), {
        "forward": _forward_from_src(src, {}),
        "__module__": base.__module__,
        "__doc__": base.__doc__,
        "__reduce_ex__": _reduce_linearized,
        "_repcompiler_linearized": True,
        "_repcompiler_forward_src": src,
    })
    cls.__qualname__ = base.__qualname__
    return cls


def _reduce_linearized(self: nn.Module, protocol: int) -> tuple:
    # pickle / deepcopy: rebuild from the user's class (importable) and the forward source
    cls = type(self)
    return (_rebuild_linearized, (cls.__mro__[1], cls._repcompiler_forward_src, self.__dict__.copy()))


def _rebuild_linearized(base: type, src: str, state: dict) -> nn.Module:
    obj = base.__new__(base)
    obj.__dict__.update(state)
    obj.__class__ = _linearized_class(base, src)
    return obj


def _swap_root_forward(root: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``root`` (edited in place) the rewritten forward: its class becomes a
    subclass of its own class (methods, attributes and ``isinstance`` kept) that
    pickles and deep-copies through the forward's source, as ``GraphModule`` does."""
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    base = type(root)
    if getattr(base, "_repcompiler_linearized", False):
        base = base.__mro__[1]
    python_code = gm.recompile()
    src = _format_import_block(python_code.globals, sys_importer) + gm.code
    root.__class__ = _linearized_class(base, src)


def _process_owner(
    model: nn.Module,
    path: str,
    *,
    rules: RuleRegistry,
    scaling: str,
    post_bn: bool,
    init: str,
    verify: bool,
    expect: set[frozenset] | None = None,
) -> tuple[list[_Done], list[tuple[str, str]]]:

    owner = model.get_submodule(path) if path else model
    training = owner.training
    gm = trace_model(owner, rules=rules)

    def expected(r) -> bool:  # the same region the whole-model analysis accepted
        if expect is None:
            return True
        return frozenset(_qual(path, str(n.target)) for n in r.nodes if n.op == "call_module") in expect

    regions = [r for r in find_regions(gm, rules) if _owner(r) == "" and _classify(gm, r) == "" and expected(r)]
    if not regions:
        return [], [(path or "<root>", "no linearizable region found when re-tracing the owner module")]
    info = {}
    for r in regions:
        mods = [(str(n.target), _get(gm, str(n.target))) for n in r.nodes if n.op == "call_module"]
        info[id(r)] = dict(
            name=r.name,
            ref=region_reference(gm, r) if verify and init == "from_bn" else None,
            convs=[t for t, m in mods if isinstance(m, _CONVS)],
            bns=[name for name, _ in branch_bns(gm, r)],
            target=_main_conv(gm, r),
            modules=[t for t, _ in mods],
            params=sum(p.numel() for _, m in mods for p in m.parameters()),
        )
    meta = gm.meta
    meta[META_LINEARIZE] = regions
    run_passes(gm, [BnToScale(scaling, init), InsertPostBN(init, enabled=post_bn)], lint=False)
    post = {id(r): (t, ins) for r, t, ins in meta.get(META_POST_BN, [])}
    done: list[_Done] = []
    edits: list[tuple[str, nn.Module]] = []
    for r in regions:
        d = info[id(r)]
        post_target, inserted = post.get(id(r), (None, False))
        bn_mod = gm.get_submodule(post_target) if post_target else None
        expr = _strip_post_bn(r.expr, bn_mod) if bn_mod is not None else r.expr
        expr = simplify(expr)
        online = OnlineConv(expr, bn_mod, block="linearized")
        ref_t = next((t for t in expr.parameters() if t.is_floating_point()), None)
        if ref_t is not None:  # parameter-free leaves (identity, pools) follow the block's dtype
            online.to(device=ref_t.device, dtype=ref_t.dtype)
        online.train(training)
        target = d["target"]
        squeeze_region(gm, r, online, target)
        if inserted:
            delattr(gm, post_target)
        for t in d["modules"]:
            edits.append((t, gm.get_submodule(t)))
        if verify:
            _verify(_qual(path, d["name"]), online, d["ref"])
        if post_target is None:
            post_desc = "none (post_bn=False)"
        elif inserted:
            post_desc = "inserted" + (" (identity in eval)" if init == "from_bn" else "")
        else:
            post_desc = f"{_qual(path, post_target)} (existing)"
        done.append(_Done(
            region=_qual(path, d["name"]) if path else d["name"],
            owner=path,
            target=_qual(path, target),
            convs=[_qual(path, t) for t in d["convs"]],
            bns=[_qual(path, t) for t in d["bns"]],
            post_bn=post_desc,
            params_before=d["params"],
            params_after=sum(p.numel() for p in online.parameters()),
        ))
    gm.graph.lint()
    gm.recompile()
    gm.train(training)
    if path:
        _set_submodule(model, path, gm)
    else:
        for t, m in edits:
            _set_submodule(model, t, m)
        _copy_missing_attrs(gm, model)
        _swap_root_forward(model, gm)
    return done, []


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
) -> tuple[nn.Module, set[str]]:
    """Linearize every multi-branch BN block of ``model`` **in place**; the hook
    :func:`repcompiler.orepa_transform` calls before wrapping convs.

    Returns ``(model, handled)``: ``handled`` is the set of qualified names of the
    original conv modules that now belong to an online block (``mode="online"``), or,
    with ``mode="offline"``, of the convs of the linearizable blocks, which are left as
    they are (they already are the offline, BN-per-branch form). Either way the caller
    should not wrap those convs. ``report`` (if given) gets one entry per block.
    """

    check_options(scaling, init)
    check_choice("mode", mode, MODES, owner="linearize")
    rules = linearize_rules(rules)
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        model.train()  # traces are specialised on .training: trace the training forward
        cands, skipped = find_linearizable(model, rules=rules)
        handled: set[str] = set()
        if report is not None:
            report.skipped += skipped
        for c in cands:
            if not c.ok and report is not None:
                report.add(c.name, c.kind, "refused", c.reason)
        ok = [c for c in cands if c.ok]
        if mode == "offline":
            for c in ok:
                handled |= set(c.convs)
                if report is not None:
                    report.add(c.name, c.kind, "kept", "offline mode: the block already has a BN per branch")
            return model, handled
        owners = sorted({c.owner for c in ok}, key=lambda p: (-(p.count(".") + 1) if p else 1, p))
        for path in owners:
            done, problems = _process_owner(
                model, path, rules=rules, scaling=scaling, post_bn=post_bn, init=init, verify=verify,
                expect={c.modules for c in ok if c.owner == path},
            )
            for where, why in problems:
                log.warning("linearize: %s: %s", where, why)
                if report is not None:
                    report.notes.append(f"{where}: {why}")
            for d in done:
                handled |= set(d.convs)
                if report is not None:
                    report.add(
                        d.region, "branches", "linearized",
                        f"online conv at {d.target}; {len(d.convs)} conv(s), {len(d.bns)} BN(s) -> scales; "
                        f"post-BN {d.post_bn}",
                        d.params_before, d.params_after,
                        target=d.target, convs=d.convs, bns=d.bns, post_bn=d.post_bn,
                    )
        return model, handled
    finally:
        for m, f in zip(modules, flags):
            m.training = f
        # new modules (online convs, post-BNs, rewritten owners) follow their parents
        _sync_new_modules(model, set(map(id, modules)))


def _sync_new_modules(model: nn.Module, old: set[int]) -> None:
    def visit(m: nn.Module, mode: bool) -> None:
        if id(m) not in old:
            m.training = mode
        for c in m.children():
            visit(c, m.training)

    visit(model, model.training)


def _forward_eval(model: nn.Module, example_inputs: Any) -> Any:
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with torch.no_grad(), _EvalMode(model):
        return model(*args)


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
        return_report: also return a :class:`~repcompiler.report.TransformReport`.
        verify: check every rewritten block in eval mode on a random input (against
            the original region for ``from_bn``, against its unfolded branches else).
        rules: a rule registry to use instead of the global one.

    Returns:
        The linearized model (same training/eval mode as ``model``), and the report.
    """
    t0 = time.perf_counter()
    check_model(model, "linearize")

    check_options(scaling, init)
    report = TransformReport(title="linearize")
    report.convs_before, report.params_before = count_convs(model), count_params(model)
    want = None
    if example_inputs is not None and verify and init == "from_bn":
        want = _forward_eval(model, example_inputs)
    work = copy_model(model, "linearize", inplace)
    linearize_regions(work, scaling=scaling, post_bn=post_bn, init=init, rules=rules, verify=verify, report=report)
    if example_inputs is not None and verify:
        got = _forward_eval(work, example_inputs)
        if want is not None:
            _compare_outputs(want, got, "linearize(init='from_bn')", "linearized model (eval mode)")
    report.convs_after, report.params_after = count_convs(work), count_params(work)
    report.seconds = time.perf_counter() - t0
    if not report.by_action("linearized"):
        log.info("linearize: no multi-branch BN block in %s", type(model).__name__)
    log.info("%s", report.summary())
    return (work, report) if return_report else work

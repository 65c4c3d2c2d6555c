"""``fold``: squeeze every exact linear region of a model into one convolution.

Pipeline (each step a pass of :mod:`passes` or a helper of this module)::

    trace (fallback to the largest traceable submodules) -> find regions -> fold +
    verify each region -> rewrite the module hierarchy in place

**How the hierarchy is edited** (so names, ``state_dict`` keys and user methods
survive outside the rewritten regions):

* A region made only of module calls (``conv -> bn``, ``pad -> conv -> bn``, an
  ``OnlineConv -> bn``, ...) is rewritten **without touching any forward**: the folded
  conv goes to the qualified name of the region's first conv, every other module of
  the region becomes ``nn.Identity``. The data flow is unchanged because the region's
  intermediate values are used nowhere else.
* A region that contains a function call (``+`` of branches, ``torch.cat``, ``F.pad``,
  ``x * s``, ...) lives in the ``forward`` of the deepest module ``D`` that created all
  its nodes. ``D`` is re-traced, the region is squeezed in that graph, and ``D`` gets the
  rewritten graph's code as its ``forward``: the **object stays** (same ``id``, same
  children, attributes and ``state_dict`` keys outside the region, all its other
  methods, ``isinstance`` of its class), only its class is swapped for a subclass
  whose ``forward`` is the generated code. Such objects pickle (``torch.save``) and
  deep-copy. This applies to the root too (a detection model keeps post-processing).
  When owners nest, the outermost one is rewritten (once).

Untraceable parts (see :func:`repcompiler.tracing.trace_units`) are left as they
are and listed in the report. Region boundaries, lowering and exactness: see
:mod:`passes.find_regions`. Nothing is rewritten that the algebra cannot prove
exact, and with ``verify=True`` every rewritten region is checked numerically
against its original modules before the model is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import RepCompilerError, TraceError, UnsupportedError, VerificationError
from .report import FoldReport, count_convs, count_params
from .rules import RuleRegistry, default_rules
from .entry import check_model, copy_model
from .tracing import TracedUnit, trace_model, trace_units
from .passes.cleanup import Cleanup
from .passes.find_regions import _region_name, find_regions, node_owner
from .passes.squeeze import RegionRunner, fold_region, region_params, relative_error, set_submodule, squeeze_region, tolerance_for, verify_region

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
        return_report: also return a :class:`~repcompiler.report.FoldReport`.
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


def _as_inputs(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise UnsupportedError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


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
    """The machinery behind :func:`fold` and :func:`repcompiler.deploy`."""
    t0 = time.perf_counter()
    check_model(model, title)
    inputs = _as_inputs(example_inputs)
    rules = rules if rules is not None else default_rules
    report = FoldReport(title=title)
    report.convs_before = count_convs(model)
    report.params_before = count_params(model)

    work = copy_model(model, title, inplace)
    work.eval()
    traced = trace_units(work, rules=rules)
    report.skipped = list(traced.skipped)
    if not traced.units:
        msg = f"{title}: no part of {type(model).__name__} traces with torch.fx; nothing was folded"
        warnings.warn(msg, stacklevel=2)
        report.notes.append(msg)

    ref_out = None
    unit_args: dict[str, tuple] = {}
    unit_outs: dict[str, Any] = {}
    if inputs is not None:
        ref_out, unit_args, unit_outs = _run_capturing(work, inputs, traced.units)

    shared = _shared_modules(work)
    with _few_threads():
        for unit in traced.units:
            _fold_unit(work, unit, rules, shared, verify, report, unit_args.get(unit.path), merge_convs)

    if ref_out is not None and verify:
        # every traced part on the inputs it saw: strict, names the part
        for unit in traced.units:
            if unit.path in unit_args and unit.path in unit_outs:
                with torch.no_grad():
                    got_u = unit.module(*unit_args[unit.path])
                _compare_outputs(unit_outs[unit.path], got_u, unit.path or type(model).__name__)
        with torch.no_grad():
            out = work(*inputs)  # type: ignore[misc]
        if traced.whole:
            _compare_outputs(ref_out, out, type(model).__name__)
        else:
            # untraced parts (detection post-processing: box decoding, thresholds, mask
            # pasting) can amplify float rounding discontinuously: report, do not raise
            try:
                _compare_outputs(ref_out, out, type(model).__name__)
            except VerificationError as exc:
                msg = f"whole-model check outside the folded parts: {exc} (every folded part matched)"
                warnings.warn(msg, stacklevel=2)
                report.notes.append(msg)

    report.convs_after = count_convs(work)
    report.params_after = count_params(work)
    report.seconds = time.perf_counter() - t0
    log.info("%s", report.summary())
    return (work, report) if return_report else work


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


def _run_capturing(
    model: nn.Module, inputs: tuple, units: Sequence[TracedUnit]
) -> tuple[Any, dict[str, tuple], dict[str, Any]]:
    """Run ``model`` once, capturing the first positional inputs (and the outputs) of
    every traced unit."""
    captured: dict[str, tuple] = {}
    outputs: dict[str, Any] = {}
    handles = []
    for u in units:
        def out_hook(mod: nn.Module, args: tuple, output: Any, _path: str = u.path) -> None:
            if _path not in outputs:
                outputs[_path] = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, output)

        handles.append(u.module.register_forward_hook(out_hook))

        def hook(mod: nn.Module, args: tuple, kwargs: dict, _path: str = u.path) -> None:
            if _path in captured:
                return
            try:
                sig = inspect.signature(mod.forward)
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                if not kwargs or all(p.kind not in (p.VAR_KEYWORD, p.KEYWORD_ONLY) for p in sig.parameters.values()):
                    captured[_path] = tuple(bound.args)
            except (TypeError, ValueError):
                pass

        handles.append(u.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:
        raise UnsupportedError(
            f"{type(model).__name__} does not run on the given example_inputs: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return out, captured, outputs


def _shared_modules(model: nn.Module) -> list[nn.Module]:
    """Modules registered at more than one path (shared weights)."""
    seen: dict[int, int] = {}
    mods: dict[int, nn.Module] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
        mods[id(m)] = m
    return [mods[i] for i, c in seen.items() if c > 1]


def _compare_outputs(want: Any, got: Any, name: str, what: str = "folded model") -> None:
    """Raise :class:`VerificationError` naming ``name`` unless ``got`` (the ``what``'s
    output) equals ``want`` in structure, shapes and values (10x the dtype's tolerance)."""

    wl, ws = tree_flatten(want)
    gl, gs = tree_flatten(got)
    if ws != gs or len(wl) != len(gl):
        raise VerificationError(f"{name}: the {what}'s output structure differs from the original's")
    for i, (w, g) in enumerate(zip(wl, gl)):
        if isinstance(w, Tensor) and w.is_floating_point():
            if w.shape != g.shape:
                raise VerificationError(f"{name}: output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
            err = relative_error(g, w)
            tol = 10 * tolerance_for(w.dtype)
            if not err <= tol:
                raise VerificationError(
                    f"{name}: output {i} of the {what} differs from the original by relative {err:.3g} "
                    f"(tolerance {tol:g})"
                )


def _common_prefix(chains: list[list[str]]) -> str:
    if not chains:
        return ""
    first = chains[0]
    k = 0
    while all(len(c) > k and c[k] == first[k] for c in chains):
        k += 1
    return first[k - 1] if k else ""


def _region_owner(region: Any) -> str:

    return _common_prefix([node_owner(n) for n in region.nodes])


def _is_under(path: str, owner: str) -> bool:
    return owner == "" or path == owner or path.startswith(owner + ".")


def _fold_unit(
    model: nn.Module,
    unit: TracedUnit,
    rules: RuleRegistry,
    shared: list[nn.Module],
    verify: bool,
    report: FoldReport,
    args: tuple | None,
    merge_convs: bool = False,
) -> None:

    gm = unit.gm
    prefix = unit.path + "." if unit.path else ""
    if args is not None:
        try:
            from torch.fx.passes.shape_prop import ShapeProp

            ShapeProp(gm).propagate(*args)
        except Exception as exc:  # shapes are only a hint
            log.debug("shape propagation of %s failed: %s", unit.path or "<root>", exc)
    regions = find_regions(gm, rules, shared_modules=shared, merge_convs=merge_convs)
    plans: list[tuple[Any, nn.Module, int]] = []
    for r in regions:
        r.name = _region_name(r.nodes, prefix)
        if not r.foldable:
            report.add_region(r, "refused" if not r.exact else "kept")  # reason from the region
            continue
        folded = fold_region(r)
        if verify:
            verify_region(r, RegionRunner(gm, r), folded)
        before = sum(p.numel() for p in region_params(gm, r))
        plans.append((r, folded, before))
    if not plans:
        return

    # owners of regions that contain function calls: their forward must be rewritten
    owners = sorted({_region_owner(r) for r, _, _ in plans if not r.all_modules}, key=len)
    top: list[str] = []
    for o in owners:
        if not any(_is_under(o, t) for t in top):
            top.append(o)
    groups: dict[str, list[tuple[Any, nn.Module, int]]] = {t: [] for t in top}
    direct: list[tuple[Any, nn.Module, int]] = []
    for plan in plans:
        own = _region_owner(plan[0])
        home = next((t for t in top if _is_under(own, t)), None)
        if home is None:
            direct.append(plan)
        else:
            groups[home].append(plan)

    for owner, group in groups.items():
        try:
            _rewrite_owner(model, unit, owner, group)
        except RepCompilerError as exc:
            for plan in group:
                if plan[0].all_modules:
                    direct.append(plan)
                else:
                    report.add_region(plan[0], "refused", f"could not rewrite the forward of "
                                      f"{prefix + owner if owner else unit.path or '<root>'}: {exc}")
            continue
        for r, folded, before in group:
            report.add_region(r, "folded", params_before=before,
                              params_after=sum(p.numel() for p in folded.parameters()))

    for r, folded, before in direct:
        target = _first_conv_target(unit.module, r)
        for t in r.module_targets():
            _set(unit.module, t, folded if t == target else nn.Identity())
        report.add_region(r, "folded", params_before=before,
                          params_after=sum(p.numel() for p in folded.parameters()))


def _set(root: nn.Module, path: str, module: nn.Module) -> None:

    set_submodule(root, path, module)


def _first_conv_target(root: nn.Module, region: Any) -> str:
    mods = region.module_targets()
    for t in mods:
        if isinstance(root.get_submodule(t), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return t
    return mods[0]


def _adopt(gm: fx.GraphModule, module: nn.Module) -> None:
    """Make ``gm`` hold ``module``'s original children, parameters and buffers."""
    for name, child in module._modules.items():
        gm._modules[name] = child
    for name, p in module._parameters.items():
        if name not in gm._parameters and not hasattr(gm, name):
            gm.register_parameter(name, p)
    for name, b in module._buffers.items():
        if name not in gm._buffers and not hasattr(gm, name):
            gm.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    gm.train(module.training)


def _map_nodes(unit_gm: fx.GraphModule, owner_gm: fx.GraphModule, owner: str) -> dict[fx.Node, fx.Node]:
    """Node correspondence between the owner's part of the unit graph and its own trace
    (same code, same order)."""
    pre = owner + "."
    mine = [
        n for n in unit_gm.graph.nodes
        if n.op not in ("placeholder", "output")
        and any((v[0] if isinstance(v, tuple) else v) == owner for v in (n.meta.get("nn_module_stack") or {}).values())
    ]
    theirs = [n for n in owner_gm.graph.nodes if n.op not in ("placeholder", "output")]
    if len(mine) != len(theirs):
        raise TraceError(f"{owner} traces to {len(theirs)} nodes alone but {len(mine)} inside its parent")
    out: dict[fx.Node, fx.Node] = {}
    for a, b in zip(mine, theirs):
        same = a.op == b.op and (
            (a.op in ("call_module", "get_attr") and a.target == pre + str(b.target))
            or (a.op not in ("call_module", "get_attr") and a.target == b.target)
        )
        if not same:
            raise TraceError(f"{owner} traces differently alone ({b.format_node()}) than inside its parent "
                             f"({a.format_node()})")
        out[a] = b
    return out


def _map_region(region: Any, mapping: dict[fx.Node, fx.Node]) -> Any:
    nodes = [mapping[n] for n in region.nodes]
    entry = mapping.get(region.entry)
    if entry is None:  # the entry is an input of the owner: find it through a user
        entry = _owner_input(region, mapping)
    if entry is None:
        raise TraceError(f"cannot locate the input of region {region.name} in its owner's graph")
    aliases = [mapping[a] for a in region.aliases if a in mapping]
    return dataclasses.replace(region, nodes=nodes, entry=entry, exit=mapping[region.exit], aliases=aliases)


def _owner_input(region: Any, mapping: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The owner's input through which one of the region's nodes (or of its aliases)
    reads the entry's value, when that value comes from outside the owner."""
    same = set(region.entry_values)
    for n in [*region.aliases, *region.nodes]:
        if n not in mapping:
            continue
        ins = n.all_input_nodes
        for i, a in enumerate(ins):
            if a in same and a not in mapping:
                return mapping[n].all_input_nodes[i]
    return None


def _rewrite_owner(model: nn.Module, unit: TracedUnit, owner: str, group: list) -> None:

    if owner == "":
        module = unit.module
        ogm = fx.GraphModule(module, unit.gm.graph, type(module).__name__)
        regions = [r for r, _, _ in group]
    else:
        module = unit.module.get_submodule(owner)
        ogm = trace_model(module)
        mapping = _map_nodes(unit.gm, ogm, owner)
        regions = [_map_region(r, mapping) for r, _, _ in group]
    _adopt(ogm, module)
    pre = owner + "." if owner else ""
    replaced: dict[fx.Node, fx.Node] = {}
    for r, (orig, folded, _) in zip(regions, group):
        target = _first_conv_target(unit.module, orig) if orig.module_targets() else None
        if target is not None:
            target = target[len(pre):] if pre else target
        squeeze_region(ogm, r, folded, target, replaced=replaced)
    Cleanup()(ogm)
    ogm.graph.lint()
    ogm.recompile()
    _install_forward(module, ogm)


# -- the root keeps its class ------------------------------------------------------------


def _install_forward(model: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``model`` ``gm``'s forward, keeping the object, its class's methods and
    ``isinstance``: its class becomes a subclass whose ``forward`` is ``gm``'s code
    (``gm`` must hold ``model``'s own children, see :func:`_adopt`)."""
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    code = gm.recompile()
    src = _format_import_block(code.globals, sys_importer) + "\n" + code.src
    for name, child in gm._modules.items():
        model._modules[name] = child
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            top = str(n.target).split(".")[0]
            if not hasattr(model, top):
                setattr(model, top, getattr(gm, top))
    base = getattr(type(model), "_repcompiler_base", type(model))
    model.__class__ = _folded_class(base, src)


_CLASS_CACHE: dict[tuple[type, str], type] = {}


def _folded_class(base: type, src: str) -> type:
    """The subclass of ``base`` whose forward is ``src`` (cached: identical blocks
    share one class)."""
    from torch.fx.graph_module import _forward_from_src

    key = (base, src)
    if key in _CLASS_CACHE:
        return _CLASS_CACHE[key]
    forward = _forward_from_src(src, {})
    cls = _CLASS_CACHE[key] = type(
        base.__name__,
        (base,),
        {
            "forward": forward,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "_repcompiler_base": base,
            "_repcompiler_forward_src": src,
            "__reduce_ex__": _folded_reduce_ex,
            "__doc__": base.__doc__,
        },
    )
    return cls


def _folded_reduce_ex(self: nn.Module, protocol: Any) -> tuple:
    cls = type(self)
    return (_rebuild_folded, (cls._repcompiler_base, cls._repcompiler_forward_src, self.__dict__.copy()))


def _rebuild_folded(base: type, src: str, state: dict) -> nn.Module:
    cls = _folded_class(base, src)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj

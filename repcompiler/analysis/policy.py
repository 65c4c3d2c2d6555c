"""The default policy of :func:`~repcompiler.transforms.orepa.orepa_transform`: which block
each conv gets (the rule is documented in :mod:`repcompiler.transforms.orepa`), the
residual-shortcut analysis behind the paper's OREPA-ResNet rule, the per-layer policy
forms (dict, callable, list) and the check of ``block_options``."""

from __future__ import annotations

import fnmatch
import inspect
import operator
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import fx, nn

from ..blocks import ConvGeometry, get_block
from ..blocks.registry import accepted_options, build_block
from ..errors import RegistrationError, UnsupportedError, check_choice, first_line
from ..capture.tracing import TraceResult, trace_units
from ..rules.registry import RuleRegistry

__all__ = ["Policy", "POLICIES", "POLICY_OPTIONS", "default_block_for", "shortcut_convs", "policy_choice", "check_policy_and_options"]

Policy = Union[None, str, Mapping[str, Union[str, None]], Callable[[str, nn.Module], Union[str, None]], Sequence[str]]
from ..algebra import CONV_TYPES as _CONVS
_BNS = nn.modules.batchnorm._BatchNorm


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONVS)


#: the built-in default policies (``policy=None`` is ``"paper"``)
POLICIES = ("paper", "all")
#: ``block_options`` the default policy reads itself (not passed to a builder):
#: ``reparam_1x1=False`` leaves every 1x1 conv plain (the paper's Tab. 2 "Rep 1x1" ablation)
POLICY_OPTIONS = ("reparam_1x1",)


def _odd_large(geom: ConvGeometry, k: int) -> bool:
    return all(x % 2 == 1 for x in geom.kernel_size) and max(geom.kernel_size) >= k


def default_block_for(geom: ConvGeometry, *, block: str = "orepa", first: bool = False, shortcut: bool = False,
                      policy: str = "paper", reparam_1x1: bool = True) -> str | None:
    """The block the default policy gives a conv (see the module docstring); ``None``:
    the conv stays as it is (``shortcut``: a 1x1 on a basic block's residual shortcut,
    under ``policy="paper"``; every 1x1 with ``reparam_1x1=False``, the paper's Tab. 2
    ablation of its "Rep 1x1" component)."""
    check_choice("policy", policy, POLICIES, owner="default_block_for")
    if block != "orepa":
        return block
    if geom.is_pointwise_kernel:
        if not reparam_1x1:
            return None
        return None if shortcut and policy == "paper" else "orepa_1x1"
    if (first and _odd_large(geom, 5)) or (policy == "paper" and _odd_large(geom, 7)):
        return "orepa_large"
    return "orepa"


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))


def _reaches(src: fx.Node, dst: fx.Node) -> bool:
    """Whether ``src`` is ``dst`` or one of its inputs, transitively."""
    seen, todo = set(), [dst]
    while todo:
        n = todo.pop()
        if n is src:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _pointwise_between(gm: fx.GraphModule, src: fx.Node, dst: fx.Node) -> bool:
    """Whether a 1x1 conv module is called on some path from ``src`` to ``dst``."""
    seen, todo = set(), [dst]
    while todo:
        n = todo.pop()
        if n is src or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if _is_conv(m) and all(k == 1 for k in m.kernel_size):
                return True
        todo.extend(n.all_input_nodes)
    return False


def shortcut_convs(model: nn.Module, traced: TraceResult | None = None, *,
                   rules: RuleRegistry | None = None) -> set[str]:
    """Qualified names of the 1x1 convs on the residual shortcut of a **basic** block:
    a 1x1 conv whose output (through BNs) is added to a residual branch that starts at the
    conv's own input and holds no 1x1 conv (ResNet-18/34's projections). A shortcut next
    to a residual branch with 1x1 convs (a bottleneck: ResNet-50 and deeper) is not
    included: the official OREPA-ResNet gives it ``orepa_1x1``. Where no traced graph
    holds both the 1x1 and the module around its shortcut (parts that do not trace): a
    1x1 whose qualified name contains ``downsample`` or ``shortcut`` and whose parent
    module holds no other 1x1 conv.

    ``traced``: the model's capture, when the caller has it (``orepa_transform`` reads
    its one analysis); by default the model is traced here, with ``rules`` (default:
    :func:`~repcompiler.rules.defaults.default_rules`)."""
    out: set[str] = set()
    convs = {n for n, m in model.named_modules() if _is_conv(m) and all(k == 1 for k in m.kernel_size)}
    if not convs:
        return out
    res = traced if traced is not None else trace_units(model, rules=rules)
    for unit in res.units:
        prefix = unit.path + "." if unit.path else ""
        for add in (n for n in unit.gm.graph.nodes if _is_add(n)):
            args = [a for a in add.args[:2] if isinstance(a, fx.Node)]
            if len(args) != 2:
                continue
            for mine, other in (args, args[::-1]):
                n = mine
                while n.op == "call_module" and isinstance(unit.gm.get_submodule(str(n.target)), (_BNS, nn.Identity)):
                    n = n.args[0]  # type: ignore[assignment]
                if n.op == "call_module" and prefix + str(n.target) in convs and isinstance(n.args[0], fx.Node) \
                        and _reaches(n.args[0], other) and not _pointwise_between(unit.gm, n.args[0], other):
                    out.add(prefix + str(n.target))
    return out | _shortcuts_by_name(convs, res)


def _shortcuts_by_name(convs: set[str], res: TraceResult) -> set[str]:
    """The 1x1 ``convs`` that no traced graph holds together with the module around their
    shortcut, whose qualified name contains ``downsample`` or ``shortcut`` and whose
    parent module holds no other 1x1 conv."""
    callers: dict[str, list[str]] = {}  # conv -> the units whose graphs call it
    for u in res.units:
        for n in u.gm.graph.nodes:
            if n.op == "call_module":
                callers.setdefault((u.path + "." if u.path else "") + str(n.target), []).append(u.path)
    out: set[str] = set()
    for name in convs:
        parts = name.split(".")
        at = next((i for i, w in enumerate(parts) if "downsample" in w or "shortcut" in w), None)
        if at is None:
            continue
        parent, own = ".".join(parts[:at]), ".".join(parts[:at + 1])
        if any(p == "" or parent == p or parent.startswith(p + ".") for p in callers.get(name, ())):
            continue  # the graph analysis above decided
        siblings = [c for c in convs if c != name and (not parent or c.startswith(parent + "."))
                    and not c.startswith(own + ".") and c != own]
        if not siblings:
            out.add(name)
    return out


def _checked_choice(choice: object, name: str) -> str | None:
    """A policy's answer for conv ``name``: ``None``/``False`` (skip), ``True``/"default"
    (the default policy) or a registered block name; anything else is the policy's
    mistake, not the conv's, and raises (a typo must not silently leave convs plain)."""
    if choice is None or choice is False:
        return None
    if choice is True or choice == "default":
        return "default"
    if not isinstance(choice, str):
        raise UnsupportedError(f"policy for conv {name!r}: expected a block name, None, True or False, got {choice!r}")
    try:
        get_block(choice)
    except RegistrationError as exc:
        raise RegistrationError(f"policy for conv {name!r}: {exc}") from None
    return choice


def policy_choice(policy: Policy, name: str, conv: nn.Module) -> tuple[str | None, bool]:
    """``(choice, decided)``: ``choice`` a block name, ``None`` (skip) or "default"."""
    if policy is None or isinstance(policy, str):
        return "default", False
    if callable(policy) and not isinstance(policy, Mapping):
        return _checked_choice(policy(name, conv), name), True
    if isinstance(policy, Mapping):
        for pattern, choice in policy.items():
            if fnmatch.fnmatchcase(name, pattern):
                return _checked_choice(choice, name), True
        return "default", False
    if isinstance(policy, (list, tuple, set, frozenset)):
        for pattern in policy:
            if fnmatch.fnmatchcase(name, pattern):
                return None, True
        return "default", False
    raise UnsupportedError(f"policy must be None, a dict, a callable or a list of names, got {type(policy).__name__}")


def check_policy_and_options(policy: Policy, block: str,
                              block_options: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The default rule (``"paper"``/``"all"``) and the checked ``block_options``: each key
    must be accepted by a builder the transform may use, and none may be ``mode``/``scaling``."""
    rule = "paper"
    if isinstance(policy, str):
        check_choice("policy", policy, POLICIES, owner="orepa_transform")
        rule = policy
    if not isinstance(block_options, (Mapping, type(None))):
        raise UnsupportedError(f"orepa_transform: block_options must be a dict, got {type(block_options).__name__}")
    options = dict(block_options or {})
    clash = sorted(set(options) & {"mode", "scaling"})
    if clash:
        raise UnsupportedError(f"orepa_transform: block_options {clash} are orepa_transform's own arguments")
    names = ("orepa", "orepa_1x1", "orepa_large") if block == "orepa" else (block,)
    known = {k for n in names for k in accepted_options(get_block(n), options)}
    if block == "orepa":
        known |= set(POLICY_OPTIONS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UnsupportedError(f"orepa_transform: block_options {unknown} are not accepted by block(s) "
                               f"{', '.join(names)}")
    for name in names:
        _check_option_values(name, options)
    return rule, options


# a conv each default block is built for (its probe): 2-d, 8 -> 8 channels, "same" padding
_PROBE_KERNEL = {"orepa_1x1": 1, "orepa_large": 7}


def _check_option_values(name: str, options: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedError` for a ``block_options`` value block ``name``
    cannot take: a boolean option (its builder's default is a bool) given a non-bool,
    or a value its builder refuses on a conv it builds without the options (a bad value,
    not a geometry the block does not cover: that one is refused per conv)."""
    build = get_block(name)
    given = accepted_options(build, options)
    if not given:
        return
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in given.items():
        p = params.get(key)
        if p is not None and isinstance(p.default, bool) and not isinstance(value, bool):
            raise UnsupportedError(f"orepa_transform: block_options[{key!r}] must be True or False "
                                   f"(block {name!r}), got {value!r}")
    k = _PROBE_KERNEL.get(name, 3)
    geom = ConvGeometry.from_module(nn.Conv2d(8, 8, k, padding=k // 2))
    try:
        build_block(name, geom)
    except Exception:  # a builder (possibly a user's) that does not cover the probe, in whatever way it
        # says so: the probe tells nothing about the options; each conv's own build reports its errors
        return
    try:
        build_block(name, geom, **given)
    except Exception as exc:  # a builder (possibly a user's) refusing the options: re-raised with the reason
        raise UnsupportedError(f"orepa_transform: block_options {given!r} are refused by block {name!r}: "
                               f"{type(exc).__name__}: {first_line(exc)}") from exc



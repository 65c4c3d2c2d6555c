"""Checks of what a caller hands an entry point, before any work: the model, example
inputs, boolean options, a rule registry, a destination path, tolerances and the
model's weights. Each raises one of the library's exceptions naming the argument (or
the module/tensor) and the reason, so no raw exception from torch, fx or pathlib
reaches the caller for a bad argument.

Owns :func:`check_model` (an eager, materialized ``nn.Module``), :func:`copy_model`,
:func:`as_inputs` (the positional-input tuple every entry point uses),
:func:`run_example` (run a model on its example inputs, isolated, errors named),
:func:`check_flags` (boolean options take booleans), :func:`check_rules`,
:func:`check_path`, :func:`check_tolerances` and :func:`check_weights` (meta
tensors, NaN/inf, BatchNorm statistics no eval-mode BN can use).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import IncompatibleError, UnsupportedError
from .isolation import isolated_call
from ..rules.registry import global_hooks

__all__ = ["check_model", "copy_model", "as_inputs", "run_example", "check_flags", "check_rules", "check_path",
           "check_tolerances", "check_weights"]


def check_model(model: object, title: str) -> None:
    """Raise :class:`UnsupportedError` unless ``model`` is an eager ``nn.Module`` (the
    entry points trace it with torch.fx, which cannot trace TorchScript) whose
    parameters all exist (a lazy module, e.g. ``nn.LazyConv2d``, has none until its
    first forward), and no global module hooks are registered
    (:func:`repcompiler.rules.registry.global_hooks`: they change what every module computes)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedError(f"{title} expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedError(f"{title}: TorchScript modules cannot be traced with torch.fx; pass the eager model")
    lazy = [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        names = ", ".join(f"{n or '<root>'} ({type(m).__name__})" for n, m in lazy[:3])
        raise UnsupportedError(
            f"{title}: {type(model).__name__} has {len(lazy)} lazy module(s) with uninitialised parameters: {names}"
            f"{' ...' if len(lazy) > 3 else ''}; their shapes are unknown until a first forward - run the model "
            "once on an input (model(x)) to materialize them, then call again")
    hooks = global_hooks()
    if hooks:
        raise UnsupportedError(
            f"{title}: global module hooks are registered ({'; '.join(hooks)}, torch.nn.modules.module): they run "
            "on every module call or registration, and the transformed model calls and registers other modules "
            "than the original, so they would change what it computes. Remove them (handle.remove()) while "
            "transforming and register them again afterwards")


def copy_model(model: nn.Module, title: str, inplace: bool) -> nn.Module:
    """``model`` itself if ``inplace``, else a deep copy; a model that cannot be deep-copied
    (e.g. one holding non-leaf tensors as attributes, as hook-based ``weight_norm`` does)
    raises :class:`UnsupportedError` naming the reason and the way out."""
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # broad on purpose: a user model's __deepcopy__/__reduce__ may raise anything
        raise UnsupportedError(
            f"{title}: cannot copy {type(model).__name__} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"pass inplace=True to work on the model itself") from exc


def check_flags(title: str, *, optional: Collection[str] = (), **flags: object) -> None:
    """Raise :class:`UnsupportedError` for a boolean option (``inplace=...``,
    ``verify=...``) that is not a ``bool``: ``"no"`` or ``0`` is refused, not read as
    true or false. The options named in ``optional`` may also be ``None``."""
    for name, value in flags.items():
        if not isinstance(value, bool) and not (value is None and name in optional):
            allowed = "True, False or None" if name in optional else "True or False"
            raise UnsupportedError(f"{title}: {name} must be {allowed}, got {value!r}")


def check_rules(rules: object, title: str) -> None:
    """Raise :class:`UnsupportedError` unless ``rules`` is ``None`` (the global registry)
    or a :class:`~repcompiler.rules.registry.RuleRegistry`."""
    from ..rules.registry import RuleRegistry  # the rules import the algebra: imported on use

    if rules is not None and not isinstance(rules, RuleRegistry):
        raise UnsupportedError(
            f"{title}: rules must be a RuleRegistry (or None for the global one), got {type(rules).__name__}; "
            "register rules with repcompiler.register_rule, or build one with RuleRegistry()")


def check_path(path: object, title: str, what: str = "path") -> Path:
    """``path`` as a :class:`~pathlib.Path`; :class:`UnsupportedError` unless it is a
    non-empty ``str`` or an ``os.PathLike`` naming a ``str`` path (bytes paths are refused:
    decode them first)."""
    fs = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(fs, str):
        raise UnsupportedError(f"{title}: {what} must be a str or an os.PathLike, got {type(path).__name__}"
                               + ("; decode a bytes path first (os.fsdecode)" if isinstance(fs, bytes) else ""))
    if not fs:
        raise UnsupportedError(f"{title}: {what} is empty")
    return Path(fs)


def as_inputs(example_inputs: Any, title: str, *, required: bool = False) -> tuple[Any, ...] | None:
    """``example_inputs`` as a tuple of positional ``forward`` arguments (``None`` stays
    ``None`` unless ``required``).

    A tensor is one input; a tuple or list is several. A dict (keyword inputs) is
    refused: the entry points call ``model(*inputs)``.
    """
    if example_inputs is None:
        if required:
            raise UnsupportedError(f"{title}: example_inputs is required (a tensor or a tuple of tensors), got None")
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        raise UnsupportedError(
            f"{title}: example_inputs is a dict ({', '.join(map(str, list(example_inputs)[:3]))}); keyword inputs "
            "are not supported, pass the positional inputs as a tensor or a tuple"
        )
    if isinstance(example_inputs, (tuple, list)):
        if required and not example_inputs:
            raise UnsupportedError(f"{title}: example_inputs is empty; pass at least one input tensor")
        return tuple(example_inputs)
    raise UnsupportedError(
        f"{title}: example_inputs must be a tensor or a tuple of positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in inputs)


def run_example(model: nn.Module, inputs: tuple[Any, ...], title: str) -> Any:
    """``model(*inputs)`` under ``no_grad``, isolated (:func:`repcompiler.analysis.isolation.isolated_call`:
    the model's state is restored afterwards, the inputs are copied, the outputs are
    detached copies); a model that fails on them raises :class:`IncompatibleError`
    naming the model, the input shapes and torch's reason."""
    try:
        return isolated_call(model, inputs)
    except Exception as exc:  # broad on purpose: the user model's forward may raise anything
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IncompatibleError(
            f"{title}: {type(model).__name__} does not run on example_inputs of shape {_shapes(inputs)}: "
            f"{type(exc).__name__}: {reason}"
        ) from exc


def check_tolerances(title: str, **tolerances: float | None) -> None:
    """Raise :class:`UnsupportedError` for a tolerance (``rtol=...``, ``atol=...``) that
    is negative or NaN; ``None`` means "the default" and passes."""
    for name, value in tolerances.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnsupportedError(f"{title}: {name} must be a number >= 0, got {type(value).__name__}")
        if math.isnan(value) or value < 0:
            raise UnsupportedError(f"{title}: {name} must be >= 0, got {value}")


def check_weights(model: nn.Module, title: str, *, allow_meta: bool = False) -> None:
    """Refuse a model whose weights cannot be folded and verified: parameters or buffers
    on the ``meta`` device (no data; unless ``allow_meta``, e.g. for ``orepa_transform``,
    which builds new weights and can work on a meta model), or floating parameters/buffers
    holding NaN or inf (every check of a rewrite would fail on them and blame the rewrite).

    Also refuses a BatchNorm whose running statistics no eval-mode BN can use: a
    negative ``running_var``, or ``running_var + eps == 0`` (a zero variance with
    ``eps=0``): its eval output is NaN/inf, so any check of a rewrite would fail on it.

    The message names up to three tensors (or BatchNorms) by their qualified name.
    """
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())
               if not isinstance(t, nn.parameter.UninitializedTensorMixin)]
    meta = [n for n, t in tensors if t.is_meta]
    if allow_meta:
        tensors = [(n, t) for n, t in tensors if not t.is_meta]
    elif meta:
        raise UnsupportedError(
            f"{title}: {type(model).__name__} has {len(meta)} tensor(s) on the meta device (no data), e.g. "
            f"{', '.join(meta[:3])}; folding computes new weights from the old ones - materialize the model "
            "first (model.to_empty(device='cpu') and load its state dict)"
        )
    bad = []
    for n, t in tensors:
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            nans, infs = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(f"{n} ({nans} NaN, {infs} inf)")
    if bad:
        raise UnsupportedError(
            f"{title}: {type(model).__name__} has non-finite weights in {len(bad)} tensor(s): {', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}; no rewrite can be verified on them (was training diverging?)"
        )
    _check_bn_statistics(model, title)


def _all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite. A NaN or inf element makes the sum
    non-finite, so a finite sum settles it in one reduction; only a non-finite sum
    (possibly an overflow of finite values) needs the element-wise check."""
    with torch.no_grad():
        return bool(t.sum().isfinite()) or bool(torch.isfinite(t).all())


def _check_bn_statistics(model: nn.Module, title: str) -> None:
    bad = []
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if not isinstance(m, nn.modules.batchnorm._NormBase) or not isinstance(var, Tensor) or var.is_meta:
            continue
        eps = float(m.eps)
        if eps < 0 or math.isnan(eps):
            bad.append(f"{name or '<root>'} has eps={eps}")
        elif bool((var < 0).any()):
            i = int(var.argmin())
            bad.append(f"{name or '<root>'}.running_var[{i}] = {float(var[i]):.6g} is negative")
        elif bool((var + eps <= 0).any()):
            i = int((var + eps <= 0).nonzero()[0])
            bad.append(f"{name or '<root>'}.running_var[{i}] = {float(var[i]):.6g} with eps={eps:g}: var + eps is 0")
    if bad:
        raise UnsupportedError(
            f"{title}: {type(model).__name__} has BatchNorm statistics no eval-mode BatchNorm can use "
            f"(it divides by sqrt(running_var + eps)): {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
            "fix the checkpoint or recompute the statistics (a forward pass in training mode)")

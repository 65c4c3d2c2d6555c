"""What every entry point (``orepa_transform``, ``fold``, ``deploy``, ``linearize``) does
with the model and inputs it is given before any work: check that it is an eager
``nn.Module`` torch.fx can trace, copy it unless the caller asked for ``inplace``, and
normalize ``example_inputs`` to a tuple of positional inputs."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UnsupportedError
from .rules import global_hooks

__all__ = ["check_model", "copy_model"]


def check_model(model: object, title: str) -> None:
    """Raise :class:`UnsupportedError` unless ``model`` is an eager ``nn.Module`` (the
    entry points trace it with torch.fx, which cannot trace TorchScript), or while
    global module hooks are registered (:func:`repcompiler.rules.global_hooks`: they
    change what every module computes)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedError(f"{title} expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedError(f"{title}: TorchScript modules cannot be traced with torch.fx; pass the eager model")
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
    except Exception as exc:
        raise UnsupportedError(
            f"{title}: cannot copy {type(model).__name__} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"pass inplace=True to work on the model itself") from exc


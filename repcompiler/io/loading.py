"""Safe loading of weights and models.

* **State dicts** load with ``torch.load(..., weights_only=True)``: tensors and plain
  containers only, no code runs. A file that is not a checkpoint at all (random bytes,
  a truncated archive) is named as such; unpickling is never suggested for it.
* **Whole pickled models** (``torch.save(model)``) execute arbitrary code when loaded;
  :func:`load_pickled_model` refuses unless ``trust_pickle=True``.

Owns :func:`load_state_dict`, :func:`load_weights_into` and :func:`load_pickled_model`.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RepCompilerError, first_line

__all__ = ["load_state_dict", "load_weights_into", "load_pickled_model"]

log = logging.getLogger(__name__)

_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "module")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _is_torchscript_archive(path: Path) -> bool:
    """A TorchScript (``torch.jit.save``) zip: it has ``code/`` and ``constants.pkl`` entries."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _refuse_torchscript(p: Path) -> None:
    if _is_torchscript_archive(p):
        raise RepCompilerError(
            f"{p}: is a TorchScript archive (torch.jit.save), not a state dict or an nn.Module; "
            "it cannot be transformed or folded"
        )


def load_state_dict(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a state dict with ``torch.load(..., weights_only=True)`` (no code runs).

    Accepts a plain ``{name: tensor}`` mapping, or a checkpoint that wraps one under a
    common key (``state_dict``, ``model_state_dict``, ``model``, ``net``, ``module``).
    A ``module.`` prefix on every key (``DataParallel``) is stripped.

    Raises:
        FileNotFoundError: the file does not exist.
        RepCompilerError: the file is not a state dict, or holds objects that only a
            full (unsafe) unpickling could load; the message says what to do.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    _refuse_torchscript(p)
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    # broad on purpose: torch.load of a malformed file raises many unrelated types (EOFError,
    # KeyError, RuntimeError, UnicodeDecodeError, UnpicklingError, ...); each means "not loadable"
    except Exception as e:
        raise RepCompilerError(f"{p}: {_why_unloadable(p, e)}") from e
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never yields modules
        return obj.state_dict()
    if not _is_tensor_dict(obj) and isinstance(obj, Mapping):
        for key in _STATE_DICT_WRAPPERS:
            if key in obj and _is_tensor_dict(obj[key]):
                log.info("%s: using the state dict stored under %r", p, key)
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise RepCompilerError(f"{p}: not a state dict (expected a mapping of names to tensors, got {type(obj).__name__})")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


#: The hint a key mismatch ends with (a caller that knows better replaces it).
TRANSFORM_HINT = " (was it saved from a transformed model? then transform before loading)"


def load_weights_into(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> nn.Module:
    """Load the state dict in ``path`` (safely) into ``model``; strict by default.

    Raises :class:`RepCompilerError` naming a few missing / unexpected / mis-shaped keys.
    """
    sd = load_state_dict(path)
    own = model.state_dict()
    bad_shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise RepCompilerError(
            f"{path}: {len(bad_shape)} tensor(s) do not fit {type(model).__name__}, e.g. {k!r} "
            f"has shape {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        )
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise RepCompilerError(
            f"{path}: state dict does not match {type(model).__name__}: " + "; ".join(parts)
            + TRANSFORM_HINT
        )
    model.load_state_dict(sd, strict=strict)
    return model


def load_pickled_model(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a whole model saved with ``torch.save(model)``.

    Unpickling runs arbitrary code from the file, so this refuses unless
    ``trust_pickle=True``. Without it, the file is probed safely (``weights_only=True``)
    so the error can tell a state dict (use it as weights) from a pickled model.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    _refuse_torchscript(p)
    if not trust_pickle:
        try:
            obj = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:  # broad on purpose: any malformed file (see load_state_dict)
            if _pickled_objects(e) is None:  # not a checkpoint at all: unpickling cannot help
                raise RepCompilerError(f"{p}: {_why_unloadable(p, e)}") from None
            raise RepCompilerError(
                f"{p}: is a pickled object; loading it runs arbitrary code from the file. "
                "Pass --trust-pickle (trust_pickle=True) only if you trust its origin"
            ) from None
        kind = "a state dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise RepCompilerError(
            f"{p}: holds {kind}, not a model; name the architecture (e.g. torchvision:resnet18) "
            "and pass this file with --weights"
        )
    log.warning("unpickling %s with weights_only=False (trusted by the caller)", p)
    obj = torch.load(p, map_location=map_location, weights_only=False)
    if isinstance(obj, torch.jit.ScriptModule) or not isinstance(obj, nn.Module):
        raise RepCompilerError(f"{p}: holds a {type(obj).__name__}, not an nn.Module")
    return obj


def _pickled_objects(exc: BaseException) -> str | None:
    """The first non-tensor global a ``weights_only`` load refused (``"GLOBAL
    torch.nn.modules.conv.Conv2d"``), or ``None`` if the failure was not about one."""
    m = re.search(r"[Uu]nsupported (?:global: )?(GLOBAL [\w.]+)", str(exc))
    return m.group(1) if m else None


def _why_unloadable(p: Path, exc: BaseException) -> str:
    """Why a safe (``weights_only``) load of ``p`` failed, and what to do; never suggests
    unpickling a file that is not a valid checkpoint."""
    found = _pickled_objects(exc)
    if found is not None:
        return (f"holds pickled Python objects ({found}), not only tensors, so it cannot be loaded safely as a "
                "state dict; if it is a whole pickled model you trust, pass it as the MODEL with --trust-pickle")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return (f"is a damaged torch checkpoint (its zip archive cannot be read: {first_line(exc, 200)}); "
                "it was truncated or corrupted, save it again")
    return "is not a torch checkpoint (neither a torch.save archive nor a state-dict pickle)"

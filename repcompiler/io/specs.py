"""Model specs: ``torchvision:resnet50``-style names, and building or loading the model
a command line names.

* ``torchvision:NAME``  - ``torchvision.models.get_model(NAME, weights=None, **kwargs)``;
* ``timm:NAME``         - ``timm.create_model(NAME, pretrained=False, **kwargs)`` (needs timm);
* ``package.module:factory`` - imports ``package.module`` and calls ``factory(**kwargs)``
  (``factory`` may be a dotted attribute path, e.g. ``mymodels:Nets.small``).

Pretrained weights are never downloaded; pass a state dict file instead.

Owns :class:`ModelSpec`, :func:`parse_model_spec`, :func:`build_model`,
:func:`load_model` and :func:`parse_shape`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import RepCompilerError, UnsupportedError, first_line
from .loading import load_pickled_model, load_weights_into

__all__ = ["ModelSpec", "parse_model_spec", "build_model", "load_model", "parse_shape"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: ``source`` is ``"torchvision"``, ``"timm"`` or ``"python"``."""

    source: str
    name: str
    module: str = ""

    def __str__(self) -> str:
        if self.source == "python":
            return f"{self.module}:{self.name}"
        return f"{self.source}:{self.name}"


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``.

    Raises :class:`RepCompilerError` with the accepted forms when ``spec`` is malformed.
    """
    text = spec.strip()
    prefix, sep, name = text.partition(":")
    if not sep or not prefix or not name or ":" in name:
        raise RepCompilerError(
            f"model {spec!r}: expected torchvision:NAME, timm:NAME, package.module:factory "
            "or the path of an existing model file"
        )
    if prefix in ("torchvision", "tv"):
        return ModelSpec("torchvision", name)
    if prefix == "timm":
        return ModelSpec("timm", name)
    if not all(part.isidentifier() for part in prefix.split(".")) or not all(
        part.isidentifier() for part in name.split(".")
    ):
        raise RepCompilerError(f"model {spec!r}: {prefix!r}:{name!r} is not a valid module path and factory name")
    return ModelSpec("python", name, module=prefix)


def build_model(spec: str | ModelSpec, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec`` with random weights (never downloads any).

    ``kwargs`` go to the factory (e.g. ``num_classes=10``).
    """
    ms = parse_model_spec(spec) if isinstance(spec, str) else spec
    if ms.source == "torchvision":
        import torchvision

        if "weights" in kwargs or "pretrained" in kwargs:
            raise RepCompilerError(f"{ms}: pretrained weights are not downloaded; pass a state dict with --weights")
        try:
            model = torchvision.models.get_model(ms.name, weights=None, **kwargs)
        except ValueError as e:
            raise RepCompilerError(f"{ms}: unknown torchvision model ({first_line(e)})") from e
    elif ms.source == "timm":
        try:
            import timm
        except ImportError as e:
            raise UnsupportedError(f"{ms}: timm is not installed (pip install timm)") from e
        kwargs.pop("pretrained", None)
        try:
            model = timm.create_model(ms.name, pretrained=False, **kwargs)
        except RuntimeError as e:
            raise RepCompilerError(f"{ms}: {first_line(e)}") from e
    else:
        try:
            mod = importlib.import_module(ms.module)
        except ImportError as e:
            raise RepCompilerError(f"{ms}: cannot import module {ms.module!r} ({first_line(e)})") from e
        factory: Any = mod
        for attr in ms.name.split("."):
            if not hasattr(factory, attr):
                raise RepCompilerError(f"{ms}: module {ms.module!r} has no attribute {ms.name!r}")
            factory = getattr(factory, attr)
        if not callable(factory):
            raise RepCompilerError(f"{ms}: {ms.name!r} is not callable")
        model = _call(factory, kwargs, ms)
    if not isinstance(model, nn.Module):
        raise RepCompilerError(f"{ms}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _call(factory: Callable[..., Any], kwargs: dict[str, Any], ms: ModelSpec) -> Any:
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise RepCompilerError(f"{ms}: calling {ms.name}(**{kwargs}) failed: {first_line(e)}") from e


def load_model(
    source: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Build or load a model, then (optionally) load weights into it.

    ``source`` is an existing file (a whole pickled model; needs ``trust_pickle``) or a
    model spec (see :func:`parse_model_spec`). ``prepare`` (e.g. an OREPA transform) is
    applied *before* the weights are loaded, so a state dict saved from a transformed
    model loads into a freshly transformed one. Weights load strictly and safely.
    """
    text = os.fspath(source)
    if Path(text).expanduser().is_file():
        if model_kwargs:
            raise RepCompilerError(f"{text}: model keyword arguments only apply to a model spec, not a file")
        model = load_pickled_model(text, trust_pickle=trust_pickle)
    else:
        if any(text.endswith(s) for s in (".pt", ".pth", ".pkl", ".bin", ".ckpt")) and ":" not in text:
            raise FileNotFoundError(f"{text}: no such file")
        model = build_model(text, **(model_kwargs or {}))
    if prepare is not None:
        model = prepare(model)
    if weights is not None:
        load_weights_into(model, weights)
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; every entry >= 1."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise RepCompilerError(f"input shape {text!r}: expected integers like 1,3,224,224") from None
    if not shape or any(s < 1 for s in shape):
        raise RepCompilerError(f"input shape {text!r}: every dimension must be >= 1")
    return shape

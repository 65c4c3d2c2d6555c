"""What an export call asks for, checked before any work: the format (from ``format=``
or the file suffix), the options that format honours, the tolerances for the model's
dtype, the dtypes a format can carry and the packages it needs.

Owns :data:`FORMATS`, :func:`normalize_format`, :func:`format_from_suffix`,
:func:`resolve_format`, :func:`check_options`, :func:`default_tolerances`,
:func:`check_dtypes` and :func:`require_packages`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import UnsupportedError, check_choice
from ..rewrite.verify import tolerance_for

__all__ = [
    "FORMATS",
    "ONNX_EXPORTERS",
    "TORCHSCRIPT_METHODS",
    "MIN_DYNAMO_OPSET",
    "INSTALL_EXPORT",
    "normalize_format",
    "format_from_suffix",
    "resolve_format",
    "check_options",
    "default_tolerances",
    "check_dtypes",
    "require_packages",
]

FORMATS = ("onnx", "torchscript", "exported_program")
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_METHODS = ("trace", "script")
# the torch.export-based ONNX exporter writes opset 18 and converts down from there; the
# conversion fails for older opsets (and would then silently keep 18)
MIN_DYNAMO_OPSET = 17
INSTALL_EXPORT = 'pip install "repcompiler[export]"'

_ALIASES = {
    "onnx": "onnx",
    "torchscript": "torchscript",
    "ts": "torchscript",
    "jit": "torchscript",
    "exported_program": "exported_program",
    "exportedprogram": "exported_program",
    "torch.export": "exported_program",
    "export": "exported_program",
    "ep": "exported_program",
    "pt2": "exported_program",
}
_SUFFIXES = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".jit": "torchscript",
    ".pt2": "exported_program",
}


def normalize_format(fmt: str) -> str:
    """Canonical format name; raises :class:`UnsupportedError` for an unknown one."""
    if not isinstance(fmt, str):
        raise UnsupportedError(f"export: format must be a string ({', '.join(FORMATS)}) or None, got {fmt!r}")
    key = fmt.strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise UnsupportedError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return _ALIASES[key]


def format_from_suffix(path: str | os.PathLike[str]) -> str | None:
    """The format a file suffix implies (``.onnx``; ``.pt``, ``.ts``, ``.torchscript``:
    TorchScript; ``.pt2``: exported program), else ``None``."""
    return _SUFFIXES.get(Path(path).suffix.lower())


def resolve_format(path: str | os.PathLike[str], fmt: str | None) -> str:
    """The format to write ``path`` in: ``fmt`` if given (it must not contradict a known
    suffix: ``format="onnx"`` for ``model.pt2`` is refused), else the suffix's, else ONNX."""
    implied = format_from_suffix(path)
    if fmt is None:
        return implied or "onnx"
    chosen = normalize_format(fmt)
    if implied is not None and implied != chosen:
        raise UnsupportedError(
            f"export: format={fmt!r} contradicts the suffix of {os.fspath(path)!r} ({Path(path).suffix} is "
            f"{implied}); change the file name or drop format="
        )
    return chosen


def check_options(
    fmt: str, *, opset: int | None, onnx_exporter: str | None, onnx_optimize: bool | None,
    torchscript_method: str | None,
) -> None:
    """Refuse an option the chosen format does not honour (``opset`` for TorchScript,
    ``torchscript_method`` for ONNX, ...), an unknown choice, and an opset the
    explicitly requested ``dynamo`` exporter cannot write."""
    check_choice("onnx_exporter", onnx_exporter, ONNX_EXPORTERS, owner="export", allow_none=True)
    check_choice("torchscript_method", torchscript_method, TORCHSCRIPT_METHODS, owner="export", allow_none=True)
    onnx_only = {"opset": opset, "onnx_exporter": onnx_exporter, "onnx_optimize": onnx_optimize}
    given = [k for k, v in onnx_only.items() if v is not None]
    if fmt != "onnx" and given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UnsupportedError(f"export: {', '.join(given)} {verb} only to ONNX, not to format {fmt!r}")
    if fmt != "torchscript" and torchscript_method is not None:
        raise UnsupportedError(f"export: torchscript_method only applies to TorchScript, not to format {fmt!r}")
    if opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
            raise UnsupportedError(f"export: opset must be an integer >= 7, got {opset!r}")
        if onnx_exporter == "dynamo" and opset < MIN_DYNAMO_OPSET:
            raise UnsupportedError(
                f"export: the dynamo ONNX exporter cannot write opset {opset} (it supports >= {MIN_DYNAMO_OPSET}); "
                "use onnx_exporter='torchscript' (or 'auto') for older opsets"
            )


def _least_precise(dtypes: Iterable[torch.dtype]) -> torch.dtype | None:
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=tolerance_for) if floats else None


def default_tolerances(dtypes: Iterable[torch.dtype]) -> tuple[float, float]:
    """``(rtol, atol)`` scaled to the least precise floating dtype among ``dtypes`` (the
    model's outputs): ``rtol = tolerance_for(dtype)``, ``atol = rtol / 10`` (float32:
    1e-4 / 1e-5; float16 and bfloat16: 2e-2 / 2e-3; float64: 1e-9 / 1e-10)."""
    dt = _least_precise(dtypes) or torch.float32
    rtol = tolerance_for(dt)
    return rtol, rtol / 10


def check_dtypes(fmt: str, dtypes: Iterable[torch.dtype], *, verify: bool, convs: bool = True) -> None:
    """Refuse a dtype the format's runtime cannot run when the artifact is to be
    verified: onnxruntime has no bfloat16 convolution kernels, and (CPU) no float64
    ones (``convs``: the model has convolutions)."""
    found = set(dtypes)
    if fmt == "onnx" and verify and convs and torch.float64 in found:
        raise UnsupportedError(
            "export: the model computes in float64, and onnxruntime's CPU provider has no float64 Conv kernel, so "
            "the ONNX artifact cannot be verified; export model.float() (with float inputs), use "
            "format='exported_program'/'torchscript', or pass verify=False"
        )
    if fmt == "onnx" and verify and torch.bfloat16 in found:
        raise UnsupportedError(
            "export: the model computes in bfloat16, which onnxruntime cannot run (no bfloat16 Conv kernel), so "
            "the ONNX artifact cannot be verified; export model.float() (or .half()), use "
            "format='exported_program'/'torchscript', or pass verify=False"
        )


def require_packages(fmt: str, *, verify: bool, onnx_exporter: str | None) -> None:
    """Raise :class:`UnsupportedError` naming the missing package and the install
    command before any work, when the export (or its check) needs one that is missing.

    ONNX export needs ``onnx``; its verification ``onnxruntime``; the ``dynamo``
    exporter ``onnxscript`` (``auto`` falls back to the TorchScript-based exporter
    without it)."""
    if fmt != "onnx":
        return
    needed = ["onnx"] + (["onnxruntime"] if verify else []) + (["onnxscript"] if onnx_exporter == "dynamo" else [])
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UnsupportedError(
                f"export to ONNX needs the package {name!r}, which is not installed; install the export extra: "
                f"{INSTALL_EXPORT}"
            ) from None

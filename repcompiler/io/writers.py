"""Writing an artifact in each format and loading it back to run it.

Owns :func:`write_artifact` (ONNX via the torch.export-based or the TorchScript-based
exporter, TorchScript by trace or script, ``torch.export`` programs), :func:`load_artifact`
(onnxruntime, ``torch.jit.load``, ``torch.export.load``), :func:`onnx_opset` and
:func:`onnx_op_counts`. Exporter failures raise :class:`~repcompiler.errors.TraceError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..errors import TraceError, UnsupportedError, first_line
from ..analysis.isolation import preserved_state
from .formats import MIN_DYNAMO_OPSET

__all__ = ["write_artifact", "load_artifact", "onnx_opset", "onnx_op_counts", "run_flat"]

log = logging.getLogger(__name__)

# weights above this go to an ONNX external data file (protobuf's hard limit is 2 GiB)
_ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000


def run_flat(model: Callable[..., Any], args: Sequence[Tensor]) -> list[Tensor]:
    """``model(*args)`` under ``no_grad``, its output tensors flattened, on the CPU."""
    with torch.no_grad():
        flat, _ = tree_flatten(model(*args))
    bad = [type(t).__name__ for t in flat if not isinstance(t, Tensor) and t is not None]
    if bad:
        raise UnsupportedError(f"model output of type {bad[0]} cannot be exported/compared (tensors only)")
    return [t.detach().cpu() for t in flat if isinstance(t, Tensor)]


def onnx_opset(path: str | os.PathLike[str]) -> int | None:
    """The default-domain opset an ONNX file declares."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_op_counts(model: Any) -> Counter[str]:
    """Count ONNX node types in a model (path or ``onnx.ModelProto``).

    Nodes inside subgraphs (``If``/``Loop`` bodies) and model-local functions are
    counted too, so a conv hidden in a function is not missed. External data is not
    loaded (only the graph structure is needed).
    """
    import onnx

    proto = onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model
    counts: Counter[str] = Counter()

    def walk(nodes: Sequence[Any]) -> None:
        for node in nodes:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g.node)

    walk(proto.graph.node)
    for fn in proto.functions:
        walk(fn.node)
    return counts


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence the exporters' chatter: legacy/deprecation warnings, onnxscript's
    version-converter tracebacks (a failed down-conversion is detected and reported by
    :func:`write_artifact` instead) and torch's guard-creation tracebacks (an export
    that fails on them raises, and is reported or retried)."""
    # onnxscript's converter; torch's guard builder logs every failed guard of a dynamic
    # dimension with its traceback at ERROR (the failure itself is raised and handled)
    loggers = [logging.getLogger(n) for n in ("onnxscript.version_converter", "torch._guards")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # torch marks torch.jit.* deprecated; the TorchScript format is still offered
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dynamic_dims(args: Sequence[Tensor]) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in args)


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def _param_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _onnx_dynamo(model: nn.Module, args: tuple[Tensor, ...], out: Path, *, names: tuple[list[str], list[str]],
                 dynamic: bool, opset: int | None, optimize: bool) -> None:
    with _quiet_exporters():
        prog = torch.onnx.export(
            model, args, None, dynamo=True, input_names=names[0], output_names=names[1],
            dynamic_shapes=_dynamic_dims(args) if dynamic else None, opset_version=opset,
            optimize=optimize, verbose=False, report=False,
        )
    prog.save(os.fspath(out), external_data=_param_bytes(model) > _ONNX_EXTERNAL_DATA_BYTES)
    written = onnx_opset(out)
    if opset is not None and written != opset:
        raise UnsupportedError(f"the dynamo exporter wrote opset {written} instead of the requested {opset}")


def _export_onnx(model: nn.Module, args: tuple[Tensor, ...], out: Path, *, n_outputs: int, dynamic: bool,
                 exporter: str, opset: int | None, optimize: bool) -> str:
    names = (_names("input", len(args)), _names("output", n_outputs))
    errors: list[str] = []
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and (opset is None or opset >= MIN_DYNAMO_OPSET))
    if exporter == "auto" and not use_dynamo:
        log.info("opset %d is below the dynamo exporter's %d: using the TorchScript-based exporter",
                 opset, MIN_DYNAMO_OPSET)
    if use_dynamo:
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError:
            errors.append("dynamo: onnxscript not installed")
        else:
            try:
                _onnx_dynamo(model, args, out, names=names, dynamic=dynamic, opset=opset, optimize=optimize)
                return "dynamo"
            except UnsupportedError as e:
                if exporter == "dynamo":
                    raise UnsupportedError(f"ONNX export (dynamo) of {type(model).__name__}: {e}") from None
                errors.append(f"dynamo: {e}")
            except Exception as e:  # the exporter runs the user's model: any error type, reported or retried
                if exporter == "dynamo":
                    raise TraceError(f"ONNX export (dynamo) of {type(model).__name__} failed: {first_line(e)}") from e
                errors.append(f"dynamo: {first_line(e)}")
            warnings.warn(f"export: the dynamo ONNX exporter failed ({errors[-1]}); falling back to the "
                          "TorchScript-based exporter (ExportResult.exporter says which one wrote the file)",
                          UserWarning, stacklevel=6)  # rc.export's caller
            out.unlink(missing_ok=True)
    dyn_axes = {n: {0: "batch"} for n in names[0] + names[1]} if dynamic else None
    try:
        with _quiet_exporters():
            torch.onnx.export(
                model, args, os.fspath(out), dynamo=False, input_names=names[0], output_names=names[1],
                dynamic_axes=dyn_axes, opset_version=opset or 17, do_constant_folding=optimize,
            )
    except Exception as e:  # the exporter runs the user's model: any error type becomes a TraceError
        errors.append(f"torchscript: {first_line(e)}")
        raise TraceError(f"ONNX export of {type(model).__name__} failed: " + " | ".join(errors)) from e
    return "torchscript"


def _export_torchscript(model: nn.Module, args: tuple[Tensor, ...], out: Path, *, method: str) -> str:
    try:
        with _quiet_exporters(), torch.no_grad():
            sm = torch.jit.script(model) if method == "script" else torch.jit.trace(model, args, check_trace=False)
            torch.jit.save(sm, os.fspath(out))
    except Exception as e:  # scripting/tracing runs the user's model: any error type becomes a TraceError
        raise TraceError(f"TorchScript ({method}) of {type(model).__name__} failed: {first_line(e)}") from e
    return method


def _export_program(model: nn.Module, args: tuple[Tensor, ...], out: Path, *, dynamic: bool) -> str:
    try:
        with _quiet_exporters():
            ep = torch.export.export(model, args, dynamic_shapes=_dynamic_dims(args) if dynamic else None)
        with open(out, "wb") as f:  # a file object: any suffix (torch warns on non-.pt2 paths)
            torch.export.save(ep, f)
    except Exception as e:  # torch.export runs the user's model: any error type becomes a TraceError
        raise TraceError(f"torch.export of {type(model).__name__} failed: {first_line(e)}") from e
    return "torch.export"


def write_artifact(model: nn.Module, args: tuple[Tensor, ...], out: Path, *, fmt: str, dynamic: bool,
                   n_outputs: int, opset: int | None, onnx_exporter: str, onnx_optimize: bool,
                   torchscript_method: str) -> str:
    """Write ``model`` to ``out`` in ``fmt``; returns the exporter used (``"dynamo"`` /
    ``"torchscript"`` for ONNX, ``"trace"`` / ``"script"``, ``"torch.export"``). The
    exporters run ``model``: its state is restored afterwards
    (:func:`repcompiler.analysis.isolation.preserved_state`)."""
    with preserved_state(model):
        if fmt == "onnx":
            return _export_onnx(model, args, out, n_outputs=n_outputs, dynamic=dynamic, exporter=onnx_exporter,
                                opset=opset, optimize=onnx_optimize)
        if fmt == "torchscript":
            return _export_torchscript(model, args, out, method=torchscript_method)
        return _export_program(model, args, out, dynamic=dynamic)


def load_artifact(fmt: str, path: Path) -> Callable[..., list[Tensor]]:
    """A function running the artifact at ``path`` on tensors, returning its flat outputs."""
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        onnx.checker.check_model(os.fspath(path))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run_onnx(*args: Tensor) -> list[Tensor]:
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
            return [torch.from_numpy(o) for o in sess.run(None, feeds)]

        return run_onnx
    if fmt == "torchscript":
        with _quiet_exporters():
            sm = torch.jit.load(os.fspath(path), map_location="cpu")
        sm.eval()
        return lambda *args: run_flat(sm, args)
    with open(path, "rb") as f:
        ep = torch.export.load(f)
    mod = ep.module()
    return lambda *args: run_flat(mod, args)

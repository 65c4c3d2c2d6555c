"""Fold before export: deploy a model, export it, load the artifact back and check it.

:func:`export` is the last step of the workflow::

    train_model = rc.orepa_transform(torchvision.models.resnet18())
    ...train...
    rc.export(train_model, "resnet18.onnx", torch.randn(1, 3, 224, 224))

It

1. **deploys** the model (``repcompiler.deploy``: online/offline blocks become plain
   convs, every foldable linear region - conv -> BN and friends - is squeezed into one
   conv). The caller's model is not modified;
2. **exports** it as ``"onnx"`` (``torch.onnx.export``; the torch.export-based
   exporter with onnxscript by default, the legacy TorchScript-based one as fallback),
   ``"torchscript"`` (``torch.jit.trace`` or ``torch.jit.script``, saved with
   ``torch.jit.save``) or ``"exported_program"`` (``torch.export.export``, saved with
   ``torch.export.save``);
3. **loads the artifact back** (onnxruntime, ``torch.jit.load``, ``torch.export.load``)
   and compares its outputs with the eager *original* model in eval mode, on the
   example inputs and - when the batch dimension is dynamic - on a batch of another
   size. A mismatch raises :class:`~repcompiler.errors.VerificationError`;
4. writes the artifact **atomically**: everything is produced in a temporary
   directory next to ``path`` and moved into place only after verification passed.
   A large ONNX model (> ~1.8 GB of weights) is written with its weights in an
   external data file ``<name>.data`` next to it, which is moved first.

Verification tolerance: an output passes when ``max|artifact - eager| <= atol +
rtol * max|eager|`` (scale-aware; runtimes reorder float sums differently).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import IncompatibleError, TraceError, UnsupportedError, VerificationError
from .io import atomic_dir
from .report import count_convs

__all__ = [
    "FORMATS",
    "ExportResult",
    "export",
    "normalize_format",
    "format_from_suffix",
    "onnx_op_counts",
    "count_convs",
    "has_online_blocks",
    "max_abs_diff",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "exported_program")
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
_SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript", ".jit": "torchscript", ".pt2": "exported_program"}
# weights above this go to an ONNX external data file (protobuf's hard limit is 2 GiB)
_ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass
class ExportResult:
    """What :func:`export` did.

    Attributes:
        path: the artifact written.
        format: ``"onnx"``, ``"torchscript"`` or ``"exported_program"``.
        exporter: which exporter produced it (``"dynamo"``/``"torchscript"`` for ONNX,
            ``"trace"``/``"script"`` for TorchScript, ``"torch.export"``).
        dynamic_batch: whether the artifact accepts any batch size (verified).
        deployed: whether ``repcompiler.deploy`` ran before exporting.
        verified_batches: batch sizes the artifact was checked on (empty: not verified).
        max_abs_diff: largest absolute output difference artifact vs eager model.
        seconds: wall time of the whole call.
        files: every file written (the artifact, plus ONNX external data if any).
        deploy_report: the report returned by ``deploy`` (``None`` if not deployed).
    """

    path: Path
    format: str
    exporter: str
    dynamic_batch: bool
    deployed: bool
    verified_batches: tuple[int, ...] = ()
    max_abs_diff: float | None = None
    seconds: float = 0.0
    files: tuple[Path, ...] = ()
    deploy_report: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        size = sum(f.stat().st_size for f in self.files if f.exists())
        check = (
            f"verified on batch {', '.join(map(str, self.verified_batches))} (max |diff| {self.max_abs_diff:.3g})"
            if self.verified_batches
            else "not verified"
        )
        return (
            f"{self.path} [{self.format} via {self.exporter}, {size / 1e6:.2f} MB, "
            f"{'dynamic' if self.dynamic_batch else 'static'} batch, "
            f"{'deployed' if self.deployed else 'exported as is'}, {check}, {self.seconds:.1f} s]"
        )


# ----------------------------------------------------------------------------------
# small public helpers
# ----------------------------------------------------------------------------------
def normalize_format(fmt: str) -> str:
    """Canonical format name; raises :class:`UnsupportedError` for an unknown one."""
    key = fmt.strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise UnsupportedError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return _ALIASES[key]


def format_from_suffix(path: str | os.PathLike[str]) -> str | None:
    """The format a file suffix implies (``.onnx``, ``.pt2``, ``.ts``/``.torchscript``), else ``None``."""
    return _SUFFIXES.get(Path(path).suffix.lower())


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


def has_online_blocks(model: nn.Module) -> bool:
    """Whether ``model`` still holds training-time blocks (``OnlineConv``/``OfflineBlock``)."""
    from .online import OfflineBlock, OnlineConv

    return any(isinstance(m, (OnlineConv, OfflineBlock)) for m in model.modules())


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two (nested) outputs."""
    fa, fb = _flatten(a), _flatten(b)
    if len(fa) != len(fb):
        raise VerificationError(f"output structure differs: {len(fa)} vs {len(fb)} tensors")
    return max((float((x.double() - y.double()).abs().max()) if x.numel() else 0.0) for x, y in zip(fa, fb))


# ----------------------------------------------------------------------------------
# internals
# ----------------------------------------------------------------------------------
def _flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    if out is None:
        return []
    raise UnsupportedError(f"model output of type {type(out).__name__} cannot be exported/compared (tensors only)")


def _as_args(example_inputs: Any) -> tuple[Tensor, ...]:
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not args:
        raise UnsupportedError("export needs at least one example input tensor")
    for i, a in enumerate(args):
        if not isinstance(a, Tensor):
            raise UnsupportedError(f"example input {i} is a {type(a).__name__}; export takes tensors only")
        if a.dim() == 0:
            raise UnsupportedError(f"example input {i} is a scalar tensor; it needs a batch dimension")
    return args


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def _run(model: Callable[..., Any], args: Sequence[Tensor]) -> list[Tensor]:
    with torch.no_grad():
        return [t.detach().cpu() for t in _flatten(model(*args))]


def _other_batch(args: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The example inputs with one more sample (the first repeated), for dynamic-batch checks."""
    return tuple(torch.cat([a, a[:1]], dim=0) for a in args)


def _deploy(model: nn.Module, args: tuple[Tensor, ...], *, deploy: bool, verify: bool) -> tuple[nn.Module, bool, Any]:
    """Returns (model to export, deployed?, report). Never modifies ``model``."""
    if not deploy:
        return model, False, None
    _deploy_fn = _find_deploy()
    if _deploy_fn is None:
        if has_online_blocks(model):
            raise UnsupportedError(
                f"{type(model).__name__} still has online/offline training blocks, and repcompiler.deploy "
                "is not available to turn them into plain convs"
            )
        log.warning("repcompiler.deploy is not available; exporting %s as is", type(model).__name__)
        return model, False, None
    example = args[0] if len(args) == 1 else args
    out = _deploy_fn(model, example, inplace=False, verify=verify, return_report=True)
    deployed, report = out if isinstance(out, tuple) else (out, None)
    return deployed, True, report


def _find_deploy() -> Callable[..., Any] | None:
    """``repcompiler.deploy`` (or, failing that, ``repcompiler.fold``: the same machinery,
    online blocks fold through their registered rule) if available, else ``None``."""
    import importlib

    for name in ("deploy", "fold"):
        try:
            mod = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{name}":
                continue
            raise
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    return None


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


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch >= 2.10 marks torch.jit.* deprecated; the TorchScript format is still offered
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated.*")
        yield


def _export_onnx(
    model: nn.Module,
    args: tuple[Tensor, ...],
    out: Path,
    *,
    n_outputs: int,
    dynamic: bool,
    exporter: str,
    opset: int | None,
    optimize: bool,
) -> str:
    input_names, output_names = _names("input", len(args)), _names("output", n_outputs)
    external = _param_bytes(model) > _ONNX_EXTERNAL_DATA_BYTES
    errors: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError as e:
            if exporter == "dynamo":
                raise UnsupportedError("the dynamo ONNX exporter needs onnxscript (pip install onnxscript)") from e
            errors.append("dynamo: onnxscript not installed")
        else:
            try:
                with _quiet_torch_onnx():
                    prog = torch.onnx.export(
                        model, args, None, dynamo=True, input_names=input_names, output_names=output_names,
                        dynamic_shapes=_dynamic_dims(args) if dynamic else None, opset_version=opset,
                        optimize=optimize, verbose=False, report=False,
                    )
                prog.save(os.fspath(out), external_data=external)
                return "dynamo"
            except Exception as e:  # fall back below
                if exporter == "dynamo":
                    raise TraceError(f"ONNX export (dynamo) of {type(model).__name__} failed: {_first_line(e)}") from e
                errors.append(f"dynamo: {_first_line(e)}")
                log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript-based exporter", errors[-1])
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise UnsupportedError(f"ONNX exporter {exporter!r}: expected 'auto', 'dynamo' or 'torchscript'")
    dyn_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic else None
    try:
        with _quiet_torch_onnx():
            torch.onnx.export(
                model, args, os.fspath(out), dynamo=False, input_names=input_names, output_names=output_names,
                dynamic_axes=dyn_axes, opset_version=opset or 17, do_constant_folding=optimize,
            )
    except Exception as e:
        errors.append(f"torchscript: {_first_line(e)}")
        raise TraceError(f"ONNX export of {type(model).__name__} failed: " + " | ".join(errors)) from e
    return "torchscript"


def _export_torchscript(model: nn.Module, args: tuple[Tensor, ...], out: Path, *, method: str) -> str:
    if method not in ("trace", "script"):
        raise UnsupportedError(f"TorchScript method {method!r}: expected 'trace' or 'script'")
    try:
        with _quiet_torch_onnx(), torch.no_grad():
            sm = torch.jit.script(model) if method == "script" else torch.jit.trace(model, args, check_trace=False)
            torch.jit.save(sm, os.fspath(out))
    except Exception as e:
        raise TraceError(f"TorchScript ({method}) of {type(model).__name__} failed: {_first_line(e)}") from e
    return method


def _export_program(model: nn.Module, args: tuple[Tensor, ...], out: Path, *, dynamic: bool) -> str:
    try:
        ep = torch.export.export(model, args, dynamic_shapes=_dynamic_dims(args) if dynamic else None)
        with open(out, "wb") as f:  # a file object: any suffix (torch warns on non-.pt2 paths)
            torch.export.save(ep, f)
    except Exception as e:
        raise TraceError(f"torch.export of {type(model).__name__} failed: {_first_line(e)}") from e
    return "torch.export"


def _loader(fmt: str, path: Path) -> Callable[..., list[Tensor]]:
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
        with _quiet_torch_onnx():
            sm = torch.jit.load(os.fspath(path), map_location="cpu")
        sm.eval()
        return lambda *args: _run(sm, args)
    with open(path, "rb") as f:
        ep = torch.export.load(f)
    mod = ep.module()
    return lambda *args: _run(mod, args)


def _compare(got: list[Tensor], ref: list[Tensor], *, rtol: float, atol: float, what: str) -> float:
    if len(got) != len(ref):
        raise VerificationError(f"{what}: {len(got)} outputs, the eager model gives {len(ref)}")
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        if tuple(g.shape) != tuple(r.shape):
            raise VerificationError(f"{what}: output {i} has shape {tuple(g.shape)}, eager {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        diff = float((g.double() - r.double()).abs().max())
        scale = float(r.double().abs().max())
        tol = atol + rtol * scale
        if not diff <= tol:  # also catches NaN
            raise VerificationError(
                f"{what}: output {i} differs from the eager model by {diff:.3g} (tolerance {tol:.3g} = "
                f"atol {atol:g} + rtol {rtol:g} x max|output| {scale:.3g})"
            )
        worst = max(worst, diff)
    return worst


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:500]


# ----------------------------------------------------------------------------------
# the API
# ----------------------------------------------------------------------------------
def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | Sequence[Tensor],
    *,
    format: str = "onnx",
    deploy: bool = True,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    opset: int | None = None,
    onnx_exporter: str = "auto",
    onnx_optimize: bool = True,
    torchscript_method: str = "trace",
    progress: bool = False,
) -> ExportResult:
    """Deploy ``model``, export it to ``path``, load the artifact back and verify it.

    Args:
        model: any ``nn.Module`` (a transformed/online model, a model with conv -> BN, or
            an already plain one). It is not modified (its train/eval flags are restored).
        path: destination file. Written atomically, and only if verification passed.
        example_inputs: one tensor or a tuple of tensors (positional ``forward`` args);
            dimension 0 of each is the batch dimension.
        format: ``"onnx"``, ``"torchscript"`` or ``"exported_program"`` (aliases ``"ts"``,
            ``"torch.export"``, ``"pt2"``).
        deploy: run ``repcompiler.deploy`` first (online blocks -> plain convs, conv -> BN
            folded). If ``repcompiler.deploy`` is unavailable a plain model is exported as
            is, and a model with online blocks raises :class:`UnsupportedError`.
        dynamic_batch: make the batch dimension dynamic (ONNX, exported program; a
            traced TorchScript module is checked to generalize). If the model cannot
            have a dynamic batch, it falls back to a static one with a logged warning
            (see ``ExportResult.dynamic_batch``).
        verify: load the artifact and compare with the eager model (and let ``deploy``
            verify its rewrite). Tolerance per output: ``atol + rtol * max|eager|``.
        opset: ONNX opset (the exporter's default if ``None``).
        onnx_exporter: ``"auto"`` (torch.export-based ``dynamo`` exporter, falling back
            to the legacy ``"torchscript"`` exporter on failure), ``"dynamo"`` or
            ``"torchscript"``.
        onnx_optimize: let the ONNX exporter optimize / constant-fold the graph.
        torchscript_method: ``"trace"`` (default; works for any traceable model) or
            ``"script"``.
        progress: show a tqdm progress bar over the stages.

    Returns:
        An :class:`ExportResult`.

    Raises:
        VerificationError: the artifact's outputs differ from the eager model's.
        TraceError: the exporter could not capture the model.
        UnsupportedError: unknown format/option, or non-tensor example inputs.
    """
    t0 = time.perf_counter()
    fmt = normalize_format(format)
    args = _as_args(example_inputs)
    dest = Path(path).expanduser()
    if dest.is_dir():
        raise IsADirectoryError(f"{dest}: is a directory (give a file name)")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest.parent}: output directory does not exist")
    stages = ["deploy", "export", "verify"] if verify else ["deploy", "export"]
    bar = _bar(len(stages), f"export {dest.name}", progress)
    try:
        with _eval_mode(model):
            bar.set_postfix_str("deploy")
            try:
                ref = _run(model, args)
            except Exception as e:
                shapes = ", ".join(str(tuple(a.shape)) for a in args)
                raise IncompatibleError(
                    f"{type(model).__name__} fails on example inputs of shape {shapes}: {_first_line(e)}"
                ) from e
            n_outputs = len(ref)
            ref_other = _run(model, _other_batch(args)) if verify and dynamic_batch else []
            target, deployed, report = _deploy(model, args, deploy=deploy, verify=verify)
            bar.update()
            with _eval_mode(target), atomic_dir(dest) as tmpdir:
                out = tmpdir / dest.name
                bar.set_postfix_str(f"export {fmt}")
                dynamic = dynamic_batch
                exporter = _export_once(
                    target, args, out, fmt=fmt, dynamic=dynamic, n_outputs=n_outputs, opset=opset,
                    onnx_exporter=onnx_exporter, onnx_optimize=onnx_optimize, torchscript_method=torchscript_method,
                )
                if exporter is None:  # dynamic batch refused by the exporter: static instead
                    dynamic = False
                    exporter = _export_once(
                        target, args, out, fmt=fmt, dynamic=False, n_outputs=n_outputs, opset=opset,
                        onnx_exporter=onnx_exporter, onnx_optimize=onnx_optimize,
                        torchscript_method=torchscript_method,
                    )
                    assert exporter is not None
                bar.update()
                batches: tuple[int, ...] = ()
                worst: float | None = None
                if verify:
                    bar.set_postfix_str("verify")
                    run = _loader(fmt, out)
                    what = f"{fmt} artifact {dest.name}"
                    worst = _compare(run(*args), ref, rtol=rtol, atol=atol, what=f"{what} (batch {args[0].shape[0]})")
                    batches = (int(args[0].shape[0]),)
                    if dynamic:
                        other = _other_batch(args)
                        try:
                            got = run(*other)
                        except Exception as e:
                            raise VerificationError(
                                f"{what}: does not accept batch {other[0].shape[0]} ({_first_line(e)}); "
                                "export with dynamic_batch=False for a fixed batch size"
                            ) from e
                        worst = max(worst, _compare(got, ref_other, rtol=rtol, atol=atol,
                                                    what=f"{what} (batch {other[0].shape[0]})"))
                        batches += (int(other[0].shape[0]),)
                    bar.update()
                companions = [p.name for p in tmpdir.iterdir() if p.name != dest.name]
    finally:
        bar.close()
    files = tuple([dest] + [dest.parent / n for n in sorted(companions)])
    result = ExportResult(
        path=dest, format=fmt, exporter=exporter, dynamic_batch=dynamic, deployed=deployed,
        verified_batches=batches, max_abs_diff=worst, seconds=time.perf_counter() - t0, files=files,
        deploy_report=report,
    )
    log.info("exported %s", result)
    return result


def _export_once(
    model: nn.Module, args: tuple[Tensor, ...], out: Path, *, fmt: str, dynamic: bool, n_outputs: int,
    opset: int | None, onnx_exporter: str, onnx_optimize: bool, torchscript_method: str,
) -> str | None:
    """Export once; ``None`` means the dynamic-batch attempt failed (caller retries static)."""
    try:
        if fmt == "onnx":
            return _export_onnx(model, args, out, n_outputs=n_outputs, dynamic=dynamic, exporter=onnx_exporter,
                                opset=opset, optimize=onnx_optimize)
        if fmt == "torchscript":
            return _export_torchscript(model, args, out, method=torchscript_method)
        return _export_program(model, args, out, dynamic=dynamic)
    except TraceError as e:
        if not dynamic or fmt == "torchscript":
            raise
        log.warning("%s export with a dynamic batch failed (%s); retrying with a static batch", fmt, e)
        for p in out.parent.iterdir():  # the private temporary directory of this export
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return None


class _NoBar:
    def set_postfix_str(self, s: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


"""Fold before export: deploy a model, export it, load the artifact back and check it.

:func:`export` (``rc.export``) is the last step of the workflow::

    train_model = rc.orepa_transform(torchvision.models.resnet18())
    ...train...
    rc.export(train_model, "resnet18.onnx", torch.randn(1, 3, 224, 224))

It

1. **checks the request** before any work (:mod:`.formats`): the format comes from
   ``format=`` or the file suffix (``.onnx``; ``.pt``/``.ts``: TorchScript; ``.pt2``:
   exported program) and an explicit format must not contradict the suffix; an option
   the format does not honour is refused; a missing package names the install command;
   a dtype the format's runtime cannot run is refused by name;
2. **deploys** the model (``repcompiler.deploy``). The caller's model is not modified;
3. **exports** it (:mod:`.writers`) as ``"onnx"`` (the torch.export-based exporter, the
   TorchScript-based one as fallback and for opsets below 17), ``"torchscript"`` or
   ``"exported_program"``; the result states the exporter and ONNX opset used;
4. **loads the artifact back** and compares its outputs with the eager *original* model
   in eval mode, on the example inputs and - with a dynamic batch - on a batch of
   another size (:func:`repcompiler.rewrite.verify.compare_outputs`: relative error first). A
   mismatch raises :class:`~repcompiler.errors.VerificationError`. The reference is
   the original model run **in float64** (a copy; the caller's model is untouched), so
   the check measures the artifact's error, not the reference's own rounding: a trained
   float32 model can be 1e-4 (relative) from its exact value, and a deployed model,
   which adds in another order, as far again. With the default ``rtol`` the tolerance
   is at least :data:`ROUNDING_FACTOR` times the reference's measured rounding (its
   float32 output against its float64 output: :attr:`ExportResult.reference_rounding`),
   the same for every format. Where the model cannot run in float64 the float32
   reference is used as it is;
5. writes the artifact **atomically** (:func:`repcompiler.io.atomic_dir`).

The module is ``repcompiler.io.export`` because ``rc.export`` is the function;
:func:`repcompiler.io.writers.onnx_op_counts` counts the ONNX node types of an artifact.

Owns :func:`export` and :class:`ExportResult`.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..transforms.deploy import deploy as deploy_model
from ..errors import TraceError, UnsupportedError, VerificationError, first_line
from ..analysis.inputs import as_inputs, check_flags, check_model, check_path, check_rules, check_tolerances, \
    check_weights, run_example
from .atomic import atomic_dir, check_output_path
from ..online.conv import OfflineBlock, OnlineConv
from ..tools.progress import Stages
from ..rewrite.verify import compare_outputs, relative_error
from ..rules.registry import RuleRegistry
from .formats import (
    FORMATS,
    check_dtypes,
    check_options,
    default_tolerances,
    format_from_suffix,
    normalize_format,
    require_packages,
    resolve_format,
)
from .writers import load_artifact, onnx_op_counts, onnx_opset, run_flat, write_artifact

__all__ = [
    "FORMATS",
    "ExportResult",
    "export",
    "normalize_format",
    "format_from_suffix",
    "has_online_blocks",
    "ROUNDING_FACTOR",
]

log = logging.getLogger(__name__)

#: With the default ``rtol``, the check's tolerance is at least this many times the
#: reference's own rounding error (its output in its dtype against float64): the
#: artifact computes in the same dtype, in another order.
ROUNDING_FACTOR = 10.0


@dataclass
class ExportResult:
    """What :func:`export` did.

    Attributes:
        path: the artifact written.
        format: ``"onnx"``, ``"torchscript"`` or ``"exported_program"``.
        exporter: which exporter produced it (``"dynamo"``/``"torchscript"`` for ONNX,
            ``"trace"``/``"script"`` for TorchScript, ``"torch.export"``).
        opset: the ONNX opset written (``None`` for the other formats).
        dynamic_batch: whether the artifact accepts any batch size (verified).
        deployed: whether ``repcompiler.deploy`` ran before exporting.
        verified_batches: batch sizes the artifact was checked on (empty: not verified).
        max_rel_error: largest relative output difference artifact vs eager model
            (``max|artifact - eager| / max|eager|`` per output).
        rtol, atol: the tolerances the check used (against the float64 reference).
        reference_rounding: the eager model's own relative error in its dtype against
            the same model in float64 on the example inputs (``None``: the model
            computes in float64, or could not run in float64 and the check compared
            with its own-dtype outputs).
        seconds: wall time of the whole call.
        files: every file written (the artifact, plus ONNX external data if any).
        deploy_report: the report returned by ``deploy`` (``None`` if not deployed).
        convs, batch_norms: convolutions and BatchNorm layers the exported graph still
            has (ONNX: ``Conv`` / ``BatchNormalization`` nodes of the artifact; the other
            formats: conv / BatchNorm modules of the exported module). A BatchNorm left
            is logged as a warning with the deploy report's reasons.
    """

    path: Path
    format: str
    exporter: str
    dynamic_batch: bool
    deployed: bool
    opset: int | None = None
    verified_batches: tuple[int, ...] = ()
    max_rel_error: float | None = None
    rtol: float | None = None
    atol: float | None = None
    seconds: float = 0.0
    files: tuple[Path, ...] = ()
    deploy_report: Any = field(default=None, repr=False)
    convs: int | None = None
    batch_norms: int | None = None
    reference_rounding: float | None = None

    def __str__(self) -> str:
        size = sum(f.stat().st_size for f in self.files if f.exists())
        check = (
            f"verified on batch {', '.join(map(str, self.verified_batches))} "
            f"(max relative error {self.max_rel_error:.3g}, rtol {self.rtol:g})"
            if self.verified_batches
            else "not verified"
        )
        via = f"{self.exporter}, opset {self.opset}" if self.opset is not None else self.exporter
        layers = (f"{self.convs} conv, {self.batch_norms} BatchNorm, "
                  if self.convs is not None and self.batch_norms is not None else "")
        return (
            f"{self.path} [{self.format} via {via}, {size / 1e6:.2f} MB, "
            f"{'dynamic' if self.dynamic_batch else 'static'} batch, "
            f"{'deployed' if self.deployed else 'exported as is'}, {layers}{check}, {self.seconds:.1f} s]"
        )


def has_online_blocks(model: nn.Module) -> bool:
    """Whether ``model`` still holds training-time blocks (``OnlineConv``/``OfflineBlock``),
    i.e. whether :func:`export` has something to deploy away."""
    return any(isinstance(m, (OnlineConv, OfflineBlock)) for m in model.modules())


def _tensor_inputs(example_inputs: Any) -> tuple[Tensor, ...]:
    args = as_inputs(example_inputs, "export", required=True)
    assert args is not None
    for i, a in enumerate(args):
        if not isinstance(a, Tensor):
            raise UnsupportedError(f"export: example input {i} is a {type(a).__name__}; export takes tensors only")
        if a.dim() == 0:
            raise UnsupportedError(f"export: example input {i} is a scalar tensor; it needs a batch dimension")
    return args


def _other_batch(args: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The example inputs with one more sample (the first repeated), for dynamic-batch checks."""
    return tuple(torch.cat([a, a[:1]], dim=0) for a in args)


def _float64_reference(model: nn.Module, batches: Sequence[tuple[Tensor, ...]]) -> list[list[Tensor]] | None:
    """``model``'s outputs on each of ``batches``, computed by a float64 copy of it (eval
    mode); ``None`` when the model already computes in float64 or cannot run so."""
    floats = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    floats |= {a.dtype for args in batches for a in args if a.is_floating_point()}
    if not floats or floats == {torch.float64}:
        return None
    try:
        exact = copy.deepcopy(model).to(torch.float64).eval()
        return [run_flat(exact, tuple(a.double() if a.is_floating_point() else a for a in args))
                for args in batches]
    except Exception as e:  # runs the user's model in float64: a model holding non-float64 tensors it creates
        # itself, a custom kernel... may fail in any way; the check then uses the model's own dtype
        log.info("export: the model does not run in float64 (%s: %s); the check compares with its own dtype",
                 type(e).__name__, first_line(e))
        return None


def _rounding(ref: list[Tensor], exact: list[Tensor]) -> float:
    """The largest relative error of the outputs ``ref`` against ``exact`` (floating only)."""
    errs = [relative_error(r, e) for r, e in zip(ref, exact) if r.is_floating_point()]
    return max(errs, default=0.0)


def _verify(run: Any, args: tuple[Tensor, ...], ref: list[Tensor], what: str, rtol: float, atol: float,
            hint: str = "") -> float:
    try:
        got = run(*args)
    except Exception as e:  # the runtime runs the exported model: its errors are of the runtime's own types
        raise VerificationError(f"{what}: the runtime cannot run it on batch {args[0].shape[0]} "
                                f"({type(e).__name__}: {first_line(e)}){hint}") from e
    return compare_outputs(ref, got, f"{what} (batch {args[0].shape[0]})", "artifact", rtol=rtol, atol=atol)


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | Sequence[Tensor],
    *,
    format: str | None = None,
    deploy: bool = True,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    opset: int | None = None,
    onnx_exporter: str | None = None,
    onnx_optimize: bool | None = None,
    torchscript_method: str | None = None,
    progress: bool = False,
    rules: RuleRegistry | None = None,
) -> ExportResult:
    """Deploy ``model``, export it to ``path``, load the artifact back and verify it.

    Args:
        model: any ``nn.Module`` (a transformed/online model, a model with conv -> BN, or
            an already plain one). It is not modified (its train/eval flags are restored).
        path: destination file. Written atomically, and only if verification passed.
        example_inputs: a tensor or a tuple of tensors (``forward``'s args), batch first.
        format: ``"onnx"``, ``"torchscript"`` or ``"exported_program"`` (or an alias); default:
            from the suffix of ``path``, else ONNX. One contradicting the suffix is refused.
        deploy: run ``repcompiler.deploy`` first (online blocks -> plain convs, BNs folded).
        dynamic_batch: make the batch dimension dynamic; a model that cannot have one
            falls back to a static batch with a ``UserWarning``.
        verify: compare the loaded artifact with the eager model (``deploy`` checks too).
        rtol, atol: an output passes when ``max|artifact - eager| <= atol + rtol *
            max|eager|``, the eager output computed in float64. Default: by the outputs'
            dtype (:func:`repcompiler.io.formats.default_tolerances`), raised to
            :data:`ROUNDING_FACTOR` times the model's own rounding (atol: rtol / 10).
        opset: ONNX only: the opset to write (default: the exporter's); checked.
        onnx_exporter: ONNX only: ``"auto"`` (default: ``"dynamo"``, ``"torchscript"`` on
            failure or for opsets below 17), ``"dynamo"`` or ``"torchscript"``.
        onnx_optimize: ONNX only: let the exporter optimize / constant-fold (default True).
        torchscript_method: TorchScript only: ``"trace"`` (default) or ``"script"``.
        progress: show a progress bar over the stages (on a terminal only).
        rules: the rule registry ``deploy`` uses (default: the global one,
            :func:`repcompiler.register_rule`).

    Returns:
        An :class:`ExportResult`.

    Raises:
        VerificationError: the artifact's outputs differ from the eager model's.
        TraceError: the exporter could not capture the model.
        UnsupportedError: a request the checks refuse (module docstring, step 1).
        IncompatibleError: the model does not run on the example inputs.
    """
    t0 = time.perf_counter()
    fmt, dest, args = _check_request(model, path, example_inputs, format=format, deploy=deploy,
                                     dynamic_batch=dynamic_batch, verify=verify, rtol=rtol, atol=atol, opset=opset,
                                     onnx_exporter=onnx_exporter, onnx_optimize=onnx_optimize,
                                     torchscript_method=torchscript_method, progress=progress, rules=rules)
    options = dict(fmt=fmt, opset=opset, onnx_exporter=onnx_exporter or "auto",
                   onnx_optimize=onnx_optimize is not False, torchscript_method=torchscript_method or "trace")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with Stages(f"export {dest.name}", ["deploy", "export"] + ["verify"] * verify, enabled=progress) as bar:
            bar.start("deploy")
            refs = _references(model, args, verify=verify, dynamic_batch=dynamic_batch, rtol=rtol, atol=atol)
            target, report = (deploy_model(model, args, inplace=False, verify=verify, return_report=True,
                                           rules=rules)
                              if deploy else (model, None))
            bar.done()
            done = _write_and_check(target.eval(), args, dest, refs, bar, options, dynamic=dynamic_batch,
                                    verify=verify)
    finally:
        for m, t in flags:
            m.training = t
    result = ExportResult(path=dest, format=fmt, deployed=deploy, rtol=refs.rtol if verify else None,
                          atol=refs.atol if verify else None, deploy_report=report, reference_rounding=refs.rounding,
                          seconds=time.perf_counter() - t0, **done)
    _log_result(result, report)
    return result


def _log_result(result: ExportResult, report: Any) -> None:
    log.info("exported %s", result)
    if result.batch_norms:
        log.warning("export: %s still has %d BatchNorm layer(s)%s", result.path.name, result.batch_norms,
                    _why_bns_left(report, result.deployed))


def _write_and_check(target: nn.Module, args: tuple[Tensor, ...], dest: Path, refs: "_References", bar: Stages,
                     options: dict[str, Any], *, dynamic: bool, verify: bool) -> dict[str, Any]:
    """Write the artifact atomically at ``dest`` (verified first, with ``verify``); the
    :class:`ExportResult` fields that say what was written and checked."""
    with atomic_dir(dest) as tmpdir:
        out = tmpdir / dest.name
        bar.start(f"export {options['fmt']}")
        exporter, dynamic = _write(target, args, out, dynamic, dict(options, n_outputs=len(refs.ref)))
        opset = onnx_opset(out) if options["fmt"] == "onnx" else None
        convs, bns = _layer_counts(options["fmt"], out, target)
        bar.done()
        worst, batches = None, ()
        if verify:
            bar.start("verify")
            worst, batches = _check_artifact(options["fmt"], out, args, refs, dynamic)
            bar.done()
        companions = sorted(p.name for p in tmpdir.iterdir() if p.name != dest.name)
    return dict(exporter=exporter, opset=opset, dynamic_batch=dynamic, verified_batches=batches, max_rel_error=worst,
                files=tuple([dest] + [dest.parent / n for n in companions]), convs=convs, batch_norms=bns)


def _check_request(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *, format: str | None,
                   deploy: bool, dynamic_batch: bool, verify: bool, rtol: float | None, atol: float | None,
                   opset: int | None, onnx_exporter: str | None, onnx_optimize: bool | None,
                   torchscript_method: str | None, progress: bool,
                   rules: RuleRegistry | None) -> tuple[str, Path, tuple[Tensor, ...]]:
    """Check an :func:`export` request before any work: ``(format, destination, inputs)``."""
    check_model(model, "export")
    check_rules(rules, "export")
    path = check_path(path, "export")
    check_flags("export", deploy=deploy, dynamic_batch=dynamic_batch, verify=verify, progress=progress,
                onnx_optimize=onnx_optimize, optional=("onnx_optimize",))
    fmt = resolve_format(path, format)
    check_options(fmt, opset=opset, onnx_exporter=onnx_exporter, onnx_optimize=onnx_optimize,
                  torchscript_method=torchscript_method)
    check_tolerances("export", rtol=rtol, atol=atol)
    require_packages(fmt, verify=verify, onnx_exporter=onnx_exporter)
    args = _tensor_inputs(example_inputs)
    dest = check_output_path(path)
    check_weights(model, "export")
    check_dtypes(fmt, [t.dtype for t in (*model.parameters(), *args)], verify=verify,
                 convs=any(isinstance(m, (nn.modules.conv._ConvNd, OnlineConv, OfflineBlock)) for m in model.modules()))
    return fmt, dest, args


@dataclass
class _References:
    """The outputs the artifact is checked against, and the tolerances of the check."""

    ref: list[Tensor]  # on the example inputs
    ref_other: list[Tensor]  # on a batch of another size (dynamic batch), else empty
    rtol: float
    atol: float
    rounding: float | None  # the eager model's own rounding (see ExportResult.reference_rounding)


def _references(model: nn.Module, args: tuple[Tensor, ...], *, verify: bool, dynamic_batch: bool,
                rtol: float | None, atol: float | None) -> _References:
    """Run the eager ``model`` (eval mode) on the example inputs (and, to verify a dynamic
    batch, on a batch of another size); with ``verify``, the float64 reference where the
    model runs in float64, and the tolerances scaled to its rounding."""
    eager = run_example(model, args, "export")
    ref = run_flat(lambda *a: eager, args)
    if not ref:
        raise UnsupportedError(f"export: {type(model).__name__} returns no tensor (its output is "
                               f"{type(eager).__name__}); an artifact would have no outputs - make forward "
                               "return the tensors to export")
    ref_other = run_flat(lambda *a: run_example(model, a, "export"), _other_batch(args)) if verify and dynamic_batch \
        else []
    d_rtol, d_atol = default_tolerances(t.dtype for t in ref)
    rounding = None
    if verify:
        exact = _float64_reference(model, [args, _other_batch(args)] if dynamic_batch else [args])
        if exact is not None:
            rounding = max(_rounding(ref, exact[0]), _rounding(ref_other, exact[1]) if ref_other else 0.0)
            ref, ref_other = exact[0], (exact[1] if ref_other else [])
            d_rtol = max(d_rtol, ROUNDING_FACTOR * rounding)
            d_atol = d_rtol / 10
    return _References(ref, ref_other, d_rtol if rtol is None else rtol, d_atol if atol is None else atol, rounding)


def _write(target: nn.Module, args: tuple[Tensor, ...], out: Path, dynamic: bool,
           options: dict[str, Any]) -> tuple[str, bool]:
    """Write ``target`` to ``out``: ``(exporter, dynamic batch)``. A dynamic-batch export
    that fails is retried with a static batch, with a ``UserWarning``."""
    fmt = options["fmt"]
    # torch.export specialises a dimension of size 1: a batch-1 example is
    # traced as a batch of two (its first sample repeated) for a dynamic batch
    traced = _other_batch(args) if dynamic and int(args[0].shape[0]) == 1 else args
    try:
        return write_artifact(target, traced, out, dynamic=dynamic, **options), dynamic
    except TraceError as e:
        if not dynamic or fmt == "torchscript":
            raise
        warnings.warn(f"export: {fmt} export of {out.name} with a dynamic batch failed ({e}); "
                      "retrying with a static batch (the artifact will accept batch "
                      f"{int(args[0].shape[0])} only)", UserWarning, stacklevel=4)  # export's caller
        for p in out.parent.iterdir():
            p.unlink()
        return write_artifact(target, args, out, dynamic=False, **options), False


def _check_artifact(fmt: str, out: Path, args: tuple[Tensor, ...], refs: _References,
                    dynamic: bool) -> tuple[float, tuple[int, ...]]:
    """Load the artifact and compare it with the references: ``(largest relative error,
    batch sizes checked)``; :class:`VerificationError` on a mismatch."""
    what = f"{fmt} artifact {out.name}"
    try:
        run = load_artifact(fmt, out)
    except Exception as e:  # the runtimes (onnxruntime, torch.jit, torch.export) raise their own error types
        raise VerificationError(f"{what}: the runtime cannot load it ({type(e).__name__}: "
                                f"{first_line(e)})") from e
    worst = _verify(run, args, refs.ref, what, refs.rtol, refs.atol)
    batches = (int(args[0].shape[0]),)
    if dynamic:
        other = _other_batch(args)
        worst = max(worst, _verify(run, other, refs.ref_other, what, refs.rtol, refs.atol,
                                   "; export with dynamic_batch=False for a fixed batch size"))
        batches += (int(other[0].shape[0]),)
    return worst, batches


def _layer_counts(fmt: str, artifact: Path, target: nn.Module) -> tuple[int, int]:
    """``(convs, batch norms)`` of the exported graph (see :class:`ExportResult`)."""
    if fmt == "onnx":
        counts = onnx_op_counts(artifact)
        return counts["Conv"] + counts["ConvTranspose"], counts["BatchNormalization"]
    mods = list(target.modules())
    return (sum(isinstance(m, nn.modules.conv._ConvNd) for m in mods),
            sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods))


def _why_bns_left(report: Any, deployed: bool) -> str:
    if not deployed:
        return " (exported with deploy=False)"
    if report is None:
        return ""
    reasons = [f"{e.name}: {e.reason}" for e in report.entries if e.action != "folded" and e.reason]
    reasons += [f"{path}: {why}" for path, why in getattr(report, "skipped", [])]
    if not reasons:
        return " (no fold was refused: BNs with no conv to fold into, see deploy's report)"
    more = f"; and {len(reasons) - 3} more in the deploy report" if len(reasons) > 3 else ""
    return " that fold could not remove: " + "; ".join(reasons[:3]) + more


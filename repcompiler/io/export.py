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
``rc.export.onnx_op_counts`` (the helper counting ONNX node types) is an attribute of
that function, so the README's spelling works.

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
    "onnx_op_counts",
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
    except Exception as e:  # a model holding non-float64 tensors it creates itself, a custom kernel...
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
    except Exception as e:
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
        example_inputs: one tensor or a tuple of tensors (positional ``forward`` args);
            dimension 0 of each is the batch dimension.
        format: ``"onnx"``, ``"torchscript"`` or ``"exported_program"`` (aliases ``"ts"``,
            ``"torch.export"``, ``"pt2"``); default: from the suffix of ``path``
            (``.onnx``; ``.pt``/``.ts``/``.torchscript``; ``.pt2``), else ONNX. A format
            contradicting the suffix is refused.
        deploy: run ``repcompiler.deploy`` first (online blocks -> plain convs, conv -> BN
            folded).
        dynamic_batch: make the batch dimension dynamic (ONNX, exported program; a
            traced TorchScript module is checked to generalize). If the model cannot
            have a dynamic batch, it falls back to a static one with a ``UserWarning``
            (see ``ExportResult.dynamic_batch``).
        verify: load the artifact and compare with the eager model (and let ``deploy``
            verify its rewrite).
        rtol, atol: an output passes when ``max|artifact - eager| <= atol + rtol *
            max|eager|``, the eager output computed in float64 (see the module
            docstring). Default: scaled to the outputs' dtype (float32: 1e-4 / 1e-5;
            float16/bfloat16: 2e-2 / 2e-3; float64: 1e-9 / 1e-10), raised to
            :data:`ROUNDING_FACTOR` times the model's own measured rounding where that
            is larger (atol: rtol / 10). Must be >= 0.
        opset: ONNX only: the opset to write (default: the exporter's). Opsets below 17
            use the TorchScript-based exporter (with ``onnx_exporter="auto"``) or are
            refused (``"dynamo"``); the written opset is checked.
        onnx_exporter: ONNX only: ``"auto"`` (default: torch.export-based ``dynamo``
            exporter, the legacy ``"torchscript"`` one on failure), ``"dynamo"`` or
            ``"torchscript"``.
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
        UnsupportedError: unknown format/option, an option the format does not honour,
            a missing package, a dtype the runtime cannot run, non-tensor or missing
            example inputs, negative tolerances, NaN/inf or meta weights.
        IncompatibleError: the model does not run on the example inputs.
    """
    t0 = time.perf_counter()
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
    flags = [(m, m.training) for m in model.modules()]
    stages = ["deploy", "export", "verify"] if verify else ["deploy", "export"]
    try:
        model.eval()
        with Stages(f"export {dest.name}", stages, enabled=progress) as bar:
            bar.start("deploy")
            eager = run_example(model, args, "export")
            ref = run_flat(lambda *a: eager, args)
            if not ref:
                raise UnsupportedError(f"export: {type(model).__name__} returns no tensor (its output is "
                                       f"{type(eager).__name__}); an artifact would have no outputs - make forward "
                                       "return the tensors to export")
            ref_other = run_flat(lambda *a: run_example(model, a, "export"), _other_batch(args)) if verify and dynamic_batch else []
            d_rtol, d_atol = default_tolerances(t.dtype for t in ref)
            rounding = None
            if verify:
                exact = _float64_reference(model, [args, _other_batch(args)] if dynamic_batch else [args])
                if exact is not None:
                    rounding = max(_rounding(ref, exact[0]), _rounding(ref_other, exact[1]) if ref_other else 0.0)
                    ref, ref_other = exact[0], (exact[1] if ref_other else [])
                    d_rtol = max(d_rtol, ROUNDING_FACTOR * rounding)
                    d_atol = d_rtol / 10
            rtol, atol = (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)
            target, report = (deploy_model(model, args, inplace=False, verify=verify, return_report=True,
                                             rules=rules)
                              if deploy else (model, None))
            bar.done()
            target.eval()
            with atomic_dir(dest) as tmpdir:
                out = tmpdir / dest.name
                bar.start(f"export {fmt}")
                options = dict(fmt=fmt, n_outputs=len(ref), opset=opset, onnx_exporter=onnx_exporter or "auto",
                               onnx_optimize=True if onnx_optimize is None else onnx_optimize,
                               torchscript_method=torchscript_method or "trace")
                dynamic = dynamic_batch
                # torch.export specialises a dimension of size 1: a batch-1 example is
                # traced as a batch of two (its first sample repeated) for a dynamic batch
                traced = _other_batch(args) if dynamic and int(args[0].shape[0]) == 1 else args
                try:
                    exporter = write_artifact(target, traced, out, dynamic=dynamic, **options)
                except TraceError as e:
                    if not dynamic or fmt == "torchscript":
                        raise
                    warnings.warn(f"export: {fmt} export of {dest.name} with a dynamic batch failed ({e}); "
                                  "retrying with a static batch (the artifact will accept batch "
                                  f"{int(args[0].shape[0])} only)", UserWarning, stacklevel=2)
                    for p in tmpdir.iterdir():
                        p.unlink()
                    dynamic = False
                    exporter = write_artifact(target, args, out, dynamic=False, **options)
                written_opset = onnx_opset(out) if fmt == "onnx" else None
                convs, bns = _layer_counts(fmt, out, target)
                bar.done()
                batches: tuple[int, ...] = ()
                worst: float | None = None
                if verify:
                    bar.start("verify")
                    what = f"{fmt} artifact {dest.name}"
                    try:
                        run = load_artifact(fmt, out)
                    except Exception as e:
                        raise VerificationError(f"{what}: the runtime cannot load it ({type(e).__name__}: "
                                                f"{first_line(e)})") from e
                    worst = _verify(run, args, ref, what, rtol, atol)
                    batches = (int(args[0].shape[0]),)
                    if dynamic:
                        other = _other_batch(args)
                        worst = max(worst, _verify(run, other, ref_other, what, rtol, atol,
                                                   "; export with dynamic_batch=False for a fixed batch size"))
                        batches += (int(other[0].shape[0]),)
                    bar.done()
                companions = [p.name for p in tmpdir.iterdir() if p.name != dest.name]
    finally:
        for m, t in flags:
            m.training = t
    files = tuple([dest] + [dest.parent / n for n in sorted(companions)])
    result = ExportResult(
        path=dest, format=fmt, exporter=exporter, opset=written_opset, dynamic_batch=dynamic, deployed=deploy,
        verified_batches=batches, max_rel_error=worst, rtol=rtol if verify else None, atol=atol if verify else None,
        seconds=time.perf_counter() - t0, files=files, deploy_report=report, convs=convs, batch_norms=bns,
        reference_rounding=rounding,
    )
    log.info("exported %s", result)
    if bns:
        log.warning("export: %s still has %d BatchNorm layer(s)%s", dest.name, bns, _why_bns_left(report, deploy))
    return result


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


export.onnx_op_counts = onnx_op_counts  # type: ignore[attr-defined]  # rc.export.onnx_op_counts(path)

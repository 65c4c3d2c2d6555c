"""The CLI's model commands: ``demo``, ``transform``, ``deploy``/``fold``, ``export``,
``inspect``. Each takes the parsed arguments and returns an exit code.

Owns :func:`cmd_demo`, :func:`cmd_transform`, :func:`cmd_deploy`, :func:`cmd_export`
and :func:`cmd_inspect`.
"""

from __future__ import annotations

import argparse
import inspect as _inspect
import sys
from typing import Any, Callable

from torch import nn

from ..tools import demo
from ..transforms.deploy import deploy
from ..errors import RepCompilerError
from ..io.export import export, has_online_blocks
from ..transforms.fold import fold
from ..io import save_atomic
from ..tools.progress import Stages
from ..explain.report import count_convs, count_params
from ..transforms.orepa import orepa_transform
from .common import EXIT_OK, example_input, load_model_arg, out, transform_kwargs

__all__ = ["cmd_demo", "cmd_transform", "cmd_deploy", "cmd_export", "cmd_inspect"]


def cmd_demo(args: argparse.Namespace) -> int:
    """``repcompiler demo``: run :func:`repcompiler.tools.demo.run_demo` with the given options."""
    params = _inspect.signature(demo.run_demo).parameters
    # CLI option -> the demo's parameter name(s), first one it accepts wins
    wanted = {
        ("steps",): args.steps,
        ("batch", "batch_size"): args.batch_size,
        ("size", "image_size"): args.image_size,
        ("seed",): args.seed,
        ("device",): args.device,
        ("measure",): False if args.no_measure else None,
        ("progress",): False if args.quiet else None,
    }
    kwargs: dict[str, Any] = {}
    for names, value in wanted.items():
        if value is None:
            continue
        name = next((n for n in names if n in params), None)
        if name is None:
            raise RepCompilerError(f"this demo does not take --{names[-1].replace('_', '-')}")
        kwargs[name] = value
    printed = "out" in params
    if printed:
        kwargs["out"] = sys.stdout
    result = demo.run_demo(**kwargs)
    if result is not None and not printed:
        out(str(result))
    return EXIT_OK


def _load_apply_write(
    args: argparse.Namespace, stage: str, apply: Callable[[nn.Module], Any], *, orepa: bool, whole: bool
) -> tuple[nn.Module, int, int]:
    """The load -> ``stage`` -> write body of ``transform``, ``fold`` and ``deploy``.

    Load MODEL (``orepa``: transformed before ``--weights`` load, see :func:`~.common.load_model_arg`), run
    ``apply`` on it (it may edit the model in place; its result is a model or a
    ``(model, report)`` pair), write the result to ``--output`` (pickled ``whole`` or its
    state dict) and print the report unless ``--quiet``. Returns the result and the
    loaded model's parameter and conv counts (taken before ``apply``).
    """
    with Stages(stage, ["load", stage, "write"], enabled=not args.quiet) as st:
        st.start("load")
        model = load_model_arg(args, orepa=orepa)
        n_before, c_before = count_params(model), count_convs(model)
        st.done()
        st.start(stage)
        result, report = apply(model)
        st.done()
        st.start("write")
        save_atomic(result if whole else result.state_dict(), args.output)
        st.done()
    if report is not None and not args.quiet:
        out(str(report))
    return result, n_before, c_before


def cmd_transform(args: argparse.Namespace) -> int:
    """``repcompiler transform``: write the OREPA training form of MODEL."""
    model, n_before, _ = _load_apply_write(
        args, "transform",
        # pretrained --weights: each block starts as the conv it replaces (never discarded)
        lambda m: orepa_transform(m, inplace=True, return_report=True, **transform_kwargs(args),
                                  init="from_conv" if args.weights else "fresh"),
        orepa=False, whole=args.whole_model,
    )
    what = "whole model (pickled)" if args.whole_model else "state dict"
    out(f"wrote {what} of the transformed model to {args.output} "
         f"(params {n_before:,} plain -> {count_params(model):,} training form)")
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    """``repcompiler deploy`` / ``repcompiler fold``: write the folded model."""
    fn = fold if args.command == "fold" else deploy
    deployed, n_train, c_train = _load_apply_write(
        args, args.command,
        lambda m: fn(m, example_input(args, None), inplace=True, verify=not args.no_verify, return_report=True),
        orepa=args.orepa, whole=not args.state_dict,
    )
    what = "state dict" if args.state_dict else "whole model (pickled; load with torch.load(..., weights_only=False))"
    out(f"wrote {what} of the deployed model to {args.output} "
         f"(params {n_train:,} -> {count_params(deployed):,}, convs {c_train} -> {count_convs(deployed)})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``repcompiler export``: deploy, export, load back and verify."""
    with Stages("export", ["load"], enabled=not args.quiet) as st:
        st.start("load")
        model = load_model_arg(args, orepa=args.orepa)
        example = example_input(args, (1, 3, 224, 224))
        st.done()
    result = export(
        model, args.output, example, format=args.format, deploy=not args.no_deploy,
        dynamic_batch=not args.static_batch,
        verify=not args.no_verify, rtol=args.rtol, atol=args.atol, opset=args.opset,
        onnx_exporter=args.onnx_exporter, torchscript_method=args.torchscript_method, progress=not args.quiet,
    )
    if result.deploy_report is not None and args.verbose:
        out(str(result.deploy_report))
    out(f"wrote {result}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """``repcompiler inspect``: what each conv becomes and what folds, nothing written."""
    with Stages("inspect", ["load", "transform", "deploy"], enabled=not args.quiet) as st:
        st.start("load")
        model = load_model_arg(args, orepa=args.orepa)
        example = example_input(args, None)
        st.done()
        plain_params, plain_convs = count_params(model), count_convs(model)
        st.start("transform")
        transform_report = None
        if has_online_blocks(model):
            train = model
            plain_params = plain_convs = None  # the plain form is not known here
        elif args.no_transform:
            train = model
        else:
            train, transform_report = orepa_transform(model, inplace=True, return_report=True,
                                                      **transform_kwargs(args))
        st.done()
        st.start("deploy")
        deployed, deploy_report = deploy(train, example, inplace=False, verify=not args.no_verify,
                                         return_report=True)
        st.done()
    if transform_report is not None:
        out(f"== transform ({args.block}, {args.mode}): what each conv became ==")
        out(str(transform_report))
    if deploy_report is not None:
        out("== deploy: regions folded / refused ==")
        out(str(deploy_report))
    rows = [("form", "params", "convs")]
    if plain_params is not None:
        rows.append(("plain (as loaded)", f"{plain_params:,}", str(plain_convs)))
    if train is not model or has_online_blocks(train) or plain_params is None:
        rows.append(("training form", f"{count_params(train):,}", "-"))
    rows.append(("deployed", f"{count_params(deployed):,}", str(count_convs(deployed))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    out("== parameters ==")
    for r in rows:
        out(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
    return EXIT_OK

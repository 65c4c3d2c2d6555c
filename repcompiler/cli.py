"""The ``repcompiler`` command line (also ``python -m repcompiler``).

Subcommands: ``demo``, ``transform``, ``deploy`` (alias ``fold``), ``export``,
``inspect``, ``bench``. Run ``repcompiler COMMAND --help`` for each one's options.

Models are named as ``torchvision:resnet50``, ``timm:repvgg_a0`` (timm installed;
never pretrained) or ``package.module:factory``, or given as a file holding a whole
pickled model (only with ``--trust-pickle``: unpickling runs code from the file).
``--weights FILE`` loads a state dict safely (``weights_only=True``). Every output is
written atomically. Errors print one line, ``repcompiler: error: ...``, on stderr;
exit codes: 0 success, 1 error, 2 bad usage, 3 verification failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect as _inspect
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import RepCompilerError, VerificationError
from .report import count_convs, count_params

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)

PROG = "repcompiler"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY, EXIT_INTERRUPT = 0, 1, 2, 3, 130

_EPILOG = """\
models:
  torchvision:NAME          torchvision.models.get_model(NAME, weights=None)
  timm:NAME                 timm.create_model(NAME, pretrained=False)   (timm installed)
  package.module:factory    any importable callable returning an nn.Module
  FILE                      a whole pickled model (torch.save(model)); needs --trust-pickle

examples:
  repcompiler demo
  repcompiler inspect torchvision:resnet18
  repcompiler transform torchvision:resnet18 -o resnet18_orepa.pt
  repcompiler deploy torchvision:resnet18 --orepa --weights trained.pt -o resnet18_deploy.pt
  repcompiler export torchvision:resnet18 --orepa --weights trained.pt -o resnet18.onnx
  repcompiler bench --quick

exit codes: 0 ok, 1 error, 2 bad usage, 3 verification failed, 130 interrupted
"""


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
class _Stages:
    """A tqdm bar over the named stages of a command (auto-off when stderr is not a TTY)."""

    def __init__(self, desc: str, stages: Sequence[str], quiet: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=len(stages), desc=desc, unit="stage", leave=False, disable=True if quiet else None,
                         file=sys.stderr)

    def start(self, name: str) -> None:
        self._bar.set_postfix_str(name)

    def done(self) -> None:
        self._bar.update()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "_Stages":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _out(text: str = "") -> None:
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
    sys.stdout.flush()


def _json_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RepCompilerError(f"--model-kwargs {text!r}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise RepCompilerError(f"--model-kwargs {text!r}: expected a JSON object like '{{\"num_classes\": 10}}'")
    return value


def _transform_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        block=args.block,
        mode=args.mode,
        scaling=args.scaling,
        post_bn=not args.no_post_bn,
        insert_bn=not args.no_insert_bn,
    )
    if args.policy and args.skip:
        raise RepCompilerError("give either --policy or --skip, not both (--policy can map a pattern to null)")
    if args.policy:
        try:
            policy = json.loads(args.policy)
        except json.JSONDecodeError as e:
            raise RepCompilerError(f"--policy {args.policy!r}: not valid JSON ({e.msg})") from None
        if not isinstance(policy, dict) or not all(isinstance(v, (str, type(None))) for v in policy.values()):
            raise RepCompilerError(f"--policy {args.policy!r}: expected a JSON object of pattern -> block name or null")
        kwargs["policy"] = policy
    elif args.skip:
        kwargs["policy"] = list(args.skip)
    return kwargs


def _orepa_transform() -> Callable[..., Any]:
    try:
        from .transform import orepa_transform
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.transform":
            raise RepCompilerError("repcompiler.orepa_transform is not available in this installation") from None
        raise
    return orepa_transform


def _deploy_fn(name: str = "deploy") -> Callable[..., Any]:
    """``repcompiler.fold`` or ``repcompiler.deploy`` (``deploy`` falls back to ``fold``)."""
    import importlib

    for candidate in ((name, "fold") if name == "deploy" else (name,)):
        try:
            mod = importlib.import_module(f".{candidate}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{candidate}":
                continue
            raise
        return getattr(mod, candidate)
    raise RepCompilerError(f"repcompiler.{name} is not available in this installation")


def _split(result: Any) -> tuple[Any, Any]:
    """``(model, report)`` from a function called with ``return_report=True``."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result[0], result[1]
    return result, None


def _load(args: argparse.Namespace, *, orepa: bool) -> nn.Module:
    """Build/load the MODEL argument; with ``orepa``, transform before loading ``--weights``."""
    from .io import check_output_path, load_model

    if getattr(args, "output", None):
        check_output_path(args.output)  # fail before the expensive work

    prepare = None
    if orepa:
        transform = _orepa_transform()

        def prepare(m: nn.Module) -> nn.Module:
            return _split(transform(m, inplace=True, **_transform_kwargs(args)))[0]

    return load_model(
        args.model,
        weights=args.weights,
        trust_pickle=args.trust_pickle,
        model_kwargs=_json_kwargs(args.model_kwargs),
        prepare=prepare,
    )


def _example(args: argparse.Namespace, default: str | None) -> torch.Tensor | None:
    from .io import parse_shape

    text = args.input_shape or default
    if text is None:
        return None
    g = torch.Generator().manual_seed(args.seed)
    return torch.randn(parse_shape(text), generator=g)


# ----------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.demo":
            raise RepCompilerError("the demo is not available in this installation") from None
        raise
    params = _inspect.signature(run_demo).parameters
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
    result = run_demo(**kwargs)
    if result is not None and not printed:
        _out(str(result))
    return EXIT_OK


def _load_apply_write(
    args: argparse.Namespace, stage: str, apply: Callable[[nn.Module], Any], *, orepa: bool, whole: bool
) -> tuple[nn.Module, int, int]:
    """The load -> ``stage`` -> write body of ``transform``, ``fold`` and ``deploy``.

    Load MODEL (``orepa``: transformed before ``--weights`` load, see :func:`_load`), run
    ``apply`` on it (it may edit the model in place; its result is a model or a
    ``(model, report)`` pair), write the result to ``--output`` (pickled ``whole`` or its
    state dict) and print the report unless ``--quiet``. Returns the result and the
    loaded model's parameter and conv counts (taken before ``apply``).
    """
    from .io import save_atomic

    with _Stages(stage, ["load", stage, "write"], args.quiet) as st:
        st.start("load")
        model = _load(args, orepa=orepa)
        n_before, c_before = count_params(model), count_convs(model)
        st.done()
        st.start(stage)
        result, report = _split(apply(model))
        st.done()
        st.start("write")
        save_atomic(result if whole else result.state_dict(), args.output)
        st.done()
    if report is not None and not args.quiet:
        _out(str(report))
    return result, n_before, c_before


def cmd_transform(args: argparse.Namespace) -> int:
    transform = _orepa_transform()
    model, n_before, _ = _load_apply_write(
        args, "transform",
        lambda m: transform(m, inplace=True, return_report=True, **_transform_kwargs(args)),
        orepa=False, whole=args.whole_model,
    )
    what = "whole model (pickled)" if args.whole_model else "state dict"
    _out(f"wrote {what} of the transformed model to {args.output} "
         f"(params {n_before:,} plain -> {count_params(model):,} training form)")
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    fn = _deploy_fn("fold" if args.command == "fold" else "deploy")
    deployed, n_train, c_train = _load_apply_write(
        args, args.command,
        lambda m: fn(m, _example(args, None), inplace=True, verify=not args.no_verify, return_report=True),
        orepa=args.orepa, whole=not args.state_dict,
    )
    what = "state dict" if args.state_dict else "whole model (pickled; load with torch.load(..., weights_only=False))"
    _out(f"wrote {what} of the deployed model to {args.output} "
         f"(params {n_train:,} -> {count_params(deployed):,}, convs {c_train} -> {count_convs(deployed)})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, format_from_suffix

    fmt = args.format or format_from_suffix(args.output) or "onnx"
    with _Stages("export", ["load"], args.quiet) as st:
        st.start("load")
        model = _load(args, orepa=args.orepa)
        example = _example(args, "1,3,224,224")
        st.done()
    result = export(
        model, args.output, example, format=fmt, deploy=not args.no_deploy, dynamic_batch=not args.static_batch,
        verify=not args.no_verify, rtol=args.rtol, atol=args.atol, opset=args.opset,
        onnx_exporter=args.onnx_exporter, torchscript_method=args.torchscript_method, progress=not args.quiet,
    )
    if result.deploy_report is not None and args.verbose:
        _out(str(result.deploy_report))
    _out(f"wrote {result}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .export import has_online_blocks

    with _Stages("inspect", ["load", "transform", "deploy"], args.quiet) as st:
        st.start("load")
        model = _load(args, orepa=args.orepa)
        example = _example(args, None)
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
            transform = _orepa_transform()
            train, transform_report = _split(
                transform(model, inplace=True, return_report=True, **_transform_kwargs(args))
            )
        st.done()
        st.start("deploy")
        deployed, deploy_report = _split(
            _deploy_fn("deploy")(train, example, inplace=False, verify=not args.no_verify, return_report=True)
        )
        st.done()
    if transform_report is not None:
        _out(f"== transform ({args.block}, {args.mode}): what each conv became ==")
        _out(str(transform_report))
    if deploy_report is not None:
        _out("== deploy: regions folded / refused ==")
        _out(str(deploy_report))
    rows = [("form", "params", "convs")]
    if plain_params is not None:
        rows.append(("plain (as loaded)", f"{plain_params:,}", str(plain_convs)))
    if train is not model or has_online_blocks(train) or plain_params is None:
        rows.append(("training form", f"{count_params(train):,}", "-"))
    rows.append(("deployed", f"{count_params(deployed):,}", str(count_convs(deployed))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    _out("== parameters ==")
    for r in rows:
        _out(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
    return EXIT_OK


def _bench_script() -> Path | None:
    env = os.environ.get("REPCOMPILER_BENCH_SCRIPT")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "benchmarks" / "train_cost.py"
    return here if here.is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    extra = list(args.script_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    script = None if args.quick else _bench_script()
    if script is not None:
        if not script.is_file():
            raise FileNotFoundError(f"{script}: benchmark script not found")
        cmd = [sys.executable, os.fspath(script), *extra]
        log.info("running %s", " ".join(cmd))
        return subprocess.call(cmd)
    if extra:
        raise RepCompilerError("extra benchmark arguments need benchmarks/train_cost.py (not found, or --quick given)")
    if not args.quick:
        _out("benchmarks/train_cost.py not found (installed without the source tree); running the quick timing")
    return _quick_bench(args)


def _quick_bench(args: argparse.Namespace) -> int:
    """Median train-step time of plain vs OREPA online vs offline, one process, one batch size."""
    from tqdm.auto import tqdm

    from .io import build_model

    torch.manual_seed(args.seed)
    transform = _orepa_transform()
    kwargs = _json_kwargs(args.model_kwargs)
    forms: list[tuple[str, Callable[[], nn.Module]]] = [
        ("plain", lambda: build_model(args.model, **kwargs)),
        ("orepa online", lambda: _split(transform(build_model(args.model, **kwargs), block=args.block,
                                                  mode="online"))[0]),
        ("orepa offline", lambda: _split(transform(build_model(args.model, **kwargs), block=args.block,
                                                   mode="offline"))[0]),
    ]
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rows = []
    total = len(forms) * (args.warmup + args.steps)
    with tqdm(total=total, desc="bench", unit="step", leave=False, disable=True if args.quiet else None) as bar:
        for name, make in forms:
            model = make().train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            times = []
            for i in range(args.warmup + args.steps):
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                model(x).float().mean().backward()
                opt.step()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t)
                bar.set_postfix_str(name)
                bar.update()
            times.sort()
            rows.append((name, times[len(times) // 2], count_params(model)))
    base = rows[0][1]
    _out(f"train step, {args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
         f"median of {args.steps} (threads {torch.get_num_threads()})")
    _out(f"{'form':<14} {'time [s]':>9} {'x plain':>8} {'params':>12}")
    for name, t, p in rows:
        _out(f"{name:<14} {t:>9.4f} {t / base:>8.2f} {p:>12,}")
    return EXIT_OK


# ----------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------
def _model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("model", metavar="MODEL",
                   help="torchvision:NAME, timm:NAME, package.module:factory, or a pickled model FILE")
    g.add_argument("--weights", metavar="FILE",
                   help="state dict to load (safely, weights_only=True; strict key match)")
    g.add_argument("--model-kwargs", metavar="JSON", help='keyword arguments for the model factory, e.g. \'{"num_classes": 10}\'')
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a whole pickled model file (unpickling runs code from the file)")
    return p


def _transform_parent(with_orepa_flag: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("OREPA transform")
    if with_orepa_flag:
        g.add_argument("--orepa", action="store_true",
                       help="MODEL was trained in OREPA form: transform it (with the options below) "
                            "before loading --weights")
    g.add_argument("--block", default="orepa", help="block for kxk convs (default: %(default)s)")
    g.add_argument("--mode", choices=["online", "offline"], default="online",
                   help="online: one conv per block per forward; offline: every branch runs (default: %(default)s)")
    g.add_argument("--scaling", choices=["vector", "scalar", "none"], default="vector",
                   help="per-branch scaling (default: %(default)s)")
    g.add_argument("--no-post-bn", action="store_true", help="no BN after the branches are added")
    g.add_argument("--no-insert-bn", action="store_true", help="do not insert a BN where no BN follows a conv")
    g.add_argument("--skip", action="append", metavar="PATTERN",
                   help="leave convs whose qualified name matches this fnmatch pattern as they are (repeatable)")
    g.add_argument("--policy", metavar="JSON",
                   help='per-layer blocks by name pattern, first match wins, e.g. \'{"layer4.*": "dbb", "fc": null}\'')
    return p


def _input_parent(default: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("input")
    extra = f" (default: {default})" if default else " (optional: enables a whole-model check)"
    g.add_argument("--input-shape", metavar="N,C,H,W", default=None,
                   help="shape of a random example input" + extra)
    g.add_argument("--seed", type=int, default=0, help="random seed for example inputs (default: %(default)s)")
    return p


def _common_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output control")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or reports, only the result line")
    g.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("repcompiler")
    except Exception:  # not installed (running from a source tree)
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``repcompiler`` (exposed for docs and tests)."""
    common = _common_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Structural re-parameterization compiler: OREPA online training for any CNN, "
                    "exact folding for deployment, verified export.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", parents=[common], allow_abbrev=False,
                       help="OREPA on ResNet-18: transform, train a few steps, deploy, check (under a minute)",
                       description="Builds torchvision ResNet-18, transforms it with OREPA, trains a few steps, "
                                   "deploys it, checks equivalence and prints a table of parameters, step time, "
                                   "memory and the output difference.")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the demo's)")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the demo's)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--no-measure", action="store_true", help="skip the step time / memory measurements")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("transform", parents=[common, _model_parent(), _transform_parent(False)], allow_abbrev=False,
                       help="replace every eligible conv by an online OREPA block; write the training-form model",
                       description="Transform MODEL (--weights are the plain model's, loaded before transforming) "
                                   "and write the transformed model's state dict (or, with --whole-model, the "
                                   "pickled model).")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write (atomically)")
    p.add_argument("--whole-model", action="store_true",
                   help="write the whole model with torch.save(model) instead of its state dict")
    p.set_defaults(func=cmd_transform)

    for name, aliases, helptext in (
        ("deploy", ["fold"], "fold online blocks and conv->BN (and other linear) regions into plain convs"),
    ):
        p = sub.add_parser(name, aliases=aliases, parents=[common, _model_parent(), _transform_parent(True),
                                                           _input_parent(None)],
                           allow_abbrev=False, help=helptext,
                           description="Deploy MODEL: every online/offline block becomes one plain conv and every "
                                       "exactly foldable linear region (conv -> BN, parallel branches, ...) is "
                                       "squeezed into one conv; prints the report. 'fold' runs repcompiler.fold, "
                                       "'deploy' runs repcompiler.deploy (same machinery).")
        p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write (atomically)")
        p.add_argument("--state-dict", action="store_true",
                       help="write only the deployed state dict (keys follow the deployed structure)")
        p.add_argument("--no-verify", action="store_true", help="skip the equivalence checks")
        p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("export", parents=[common, _model_parent(), _transform_parent(True),
                                          _input_parent("1,3,224,224")],
                       allow_abbrev=False,
                       help="deploy, export to ONNX / TorchScript / torch.export, load back and verify",
                       description="Deploy MODEL, export it, load the artifact back (onnxruntime, torch.jit.load, "
                                   "torch.export.load) and compare with the eager model on the example input and "
                                   "on another batch size. The artifact is written only if the check passes.")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="artifact path; the suffix picks the format when --format is not given "
                        "(.onnx, .pt2 = exported_program, .ts/.torchscript)")
    p.add_argument("--format", choices=["onnx", "torchscript", "exported_program"], default=None,
                   help="artifact format (default: from the suffix, else onnx)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic batch")
    p.add_argument("--no-verify", action="store_true", help="do not load the artifact back and compare")
    p.add_argument("--no-deploy", action="store_true", help="export the model as it is (no folding)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance, times max|output| (default: %(default)g)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default: %(default)g)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--onnx-exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="ONNX exporter; auto = torch.export-based, the legacy TorchScript-based one as fallback (default: %(default)s)")
    p.add_argument("--torchscript-method", choices=["trace", "script"], default="trace",
                   help="how to make TorchScript (default: %(default)s)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", parents=[common, _model_parent(), _transform_parent(True), _input_parent(None)],
                       allow_abbrev=False,
                       help="per-layer report: what each conv becomes, what folds and why not, params",
                       description="Transform MODEL with OREPA (unless --no-transform or it is already in "
                                   "training form), deploy it, and print what each conv became, the regions "
                                   "folded or refused (with the reason) and parameters plain / training / "
                                   "deployed. Nothing is written.")
    p.add_argument("--no-transform", action="store_true", help="only show what fold/deploy does to MODEL as is")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence checks")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", parents=[common], allow_abbrev=False,
                       help="training-cost benchmark (benchmarks/train_cost.py) or a quick in-process timing",
                       description="Without --quick, runs benchmarks/train_cost.py (each configuration in its own "
                                   "process; pass its options after '--', e.g. 'repcompiler bench -- --help'). "
                                   "With --quick, times one train step of plain vs OREPA online vs offline here.")
    p.add_argument("--quick", action="store_true", help="quick in-process timing instead of the full benchmark")
    p.add_argument("--model", default="torchvision:resnet18", help="model for --quick (default: %(default)s)")
    p.add_argument("--model-kwargs", metavar="JSON", help="factory keyword arguments for --quick")
    p.add_argument("--block", default="orepa", help="block for --quick (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for --quick (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=112, help="input resolution for --quick (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps for --quick (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps for --quick (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/train_cost.py (after --)")
    p.set_defaults(func=cmd_bench)
    return parser


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so redirected/captured streams work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def _cli_logging(verbose: int) -> Iterator[None]:
    """Route the library's log records to stderr for one CLI run; restore the logger after."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    pkg = logging.getLogger(__package__)
    saved = (pkg.level, pkg.propagate)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    pkg.setLevel(level)
    pkg.addHandler(handler)
    pkg.propagate = False
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(saved[0])
        pkg.propagate = saved[1]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        with _cli_logging(args.verbose):
            return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPT
    except VerificationError as e:
        if args.debug:
            raise
        sys.stderr.write(f"{PROG}: error: verification failed: {_one_line(e)}\n")
        return EXIT_VERIFY
    except (RepCompilerError, OSError) as e:
        if args.debug:
            raise
        sys.stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line, the traceback with --debug
        if args.debug:
            raise
        sys.stderr.write(f"{PROG}: error: unexpected {type(e).__name__}: {_one_line(e)} (rerun with --debug "
                         "for the traceback)\n")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``repcompiler`` argument parser: subcommands, options, help text.

Owns :func:`build_parser`. Malformed option values (``--input-shape``,
``--model-kwargs``, ``--policy``) are rejected here by argparse, as usage errors
(exit 2, with the subcommand's usage line).
"""

from __future__ import annotations

import argparse
from importlib import metadata

from .. import __version__
from ..blocks import SCALINGS
from ..io.formats import FORMATS, ONNX_EXPORTERS, TORCHSCRIPT_METHODS
from .bench import cmd_bench
from .commands import cmd_demo, cmd_deploy, cmd_export, cmd_inspect, cmd_transform
from .common import PROG, json_object_arg, policy_arg, shape_arg
from .quant import add_quant_report_parser

__all__ = ["build_parser"]

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
  repcompiler quant-report torchvision:resnet18 --input-shape 8,3,224,224 --per-channel
  repcompiler bench --quick

exit codes: 0 ok, 1 error, 2 bad usage, 3 verification failed, 130 interrupted
"""



def _model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("model", metavar="MODEL",
                   help="torchvision:NAME, timm:NAME, package.module:factory, or a pickled model FILE")
    g.add_argument("--weights", metavar="FILE",
                   help="state dict to load (safely, weights_only=True; strict key match)")
    g.add_argument("--model-kwargs", metavar="JSON", type=json_object_arg, help='keyword arguments for the model factory, e.g. \'{"num_classes": 10}\'')
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
    g.add_argument("--scaling", choices=list(SCALINGS), default="vector",
                   help="per-branch scaling: learnable per channel / per branch, fixed at the init values, or none "
                        "(default: %(default)s)")
    g.add_argument("--no-post-bn", action="store_true", help="no BN after the branches are added")
    g.add_argument("--no-insert-bn", action="store_true", help="do not insert a BN where no BN follows a conv (with transform --weights none is inserted anyway)")
    choice = g.add_mutually_exclusive_group()
    choice.add_argument("--skip", action="append", metavar="PATTERN",
                        help="leave convs whose qualified name matches this fnmatch pattern as they are (repeatable)")
    choice.add_argument("--policy", metavar="NAME|JSON", type=policy_arg,
                        help='"paper" (default: basic-block shortcut 1x1s stay plain, large-kernel stem block for k>=7), '
                             '"all" (every eligible conv), or per-layer blocks by name pattern, first match wins '
                             '(not with --skip), e.g. \'{"layer4.*": "dbb", "fc": null}\'')
    return p


def _input_parent(default: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("input")
    extra = f" (default: {default})" if default else " (optional: enables a whole-model check)"
    g.add_argument("--input-shape", metavar="N,C,H,W", default=None, type=shape_arg,
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
        return metadata.version("repcompiler")
    except metadata.PackageNotFoundError:  # not installed (running from a source tree)
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
                       description="Transform MODEL (--weights are the plain model's, loaded before transforming; "
                                   "each block then starts as the conv it replaces: init='from_conv') and write the transformed model's state dict (or, with --whole-model, the "
                                   "pickled model).")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write (atomically)")
    p.add_argument("--whole-model", action="store_true",
                   help="write the whole model with torch.save(model) instead of its state dict")
    p.set_defaults(func=cmd_transform)

    for name, helptext in (
        ("deploy", "fold online blocks and conv->BN (and other linear) regions into plain convs"),
        ("fold", "like deploy, with repcompiler.fold (the same machinery)"),
    ):
        p = sub.add_parser(name, parents=[common, _model_parent(), _transform_parent(True),
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
                        "(.onnx; .pt2 = exported_program; .pt/.ts/.torchscript = TorchScript); a --format contradicting it "
                        "is refused")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="artifact format (default: from the suffix, else onnx)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic batch")
    p.add_argument("--no-verify", action="store_true", help="do not load the artifact back and compare")
    p.add_argument("--no-deploy", action="store_true", help="export the model as it is (no folding)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance, times max|output| (default: by dtype, 1e-4 for float32, 2e-2 for float16)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: rtol / 10)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX only: the opset to write, checked in the artifact (default: the exporter's)")
    p.add_argument("--onnx-exporter", choices=ONNX_EXPORTERS, default=None,
                   help="ONNX only; auto = torch.export-based, the legacy TorchScript-based one as fallback and for "
                        "opsets < 17 (default: auto)")
    p.add_argument("--torchscript-method", choices=TORCHSCRIPT_METHODS, default=None,
                   help="TorchScript only: how to make it (default: trace)")
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

    add_quant_report_parser(sub, [common, _model_parent(), _transform_parent(True)])

    p = sub.add_parser("bench", parents=[common], allow_abbrev=False,
                       help="training-cost benchmark (benchmarks/train_cost.py) or a quick in-process timing",
                       description="Without --quick, runs benchmarks/train_cost.py (each configuration in its own "
                                   "process; pass its options after '--', e.g. 'repcompiler bench -- --help'). "
                                   "With --quick, times one train step of plain vs OREPA online vs offline here.")
    p.add_argument("--quick", action="store_true", help="quick in-process timing instead of the full benchmark")
    p.add_argument("--model", default="torchvision:resnet18", help="model for --quick (default: %(default)s)")
    p.add_argument("--model-kwargs", metavar="JSON", type=json_object_arg, help="factory keyword arguments for --quick")
    p.add_argument("--block", default="orepa", help="block for --quick (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for --quick (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=112, help="input resolution for --quick (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps for --quick (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps for --quick (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/train_cost.py (after --)")
    p.set_defaults(func=cmd_bench)
    return parser

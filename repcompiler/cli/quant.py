"""The CLI's ``quant-report`` command: will MODEL survive INT8?

Owns :func:`add_quant_report_parser` (the subcommand's options) and
:func:`cmd_quant_report`: load MODEL (as ``deploy`` does), deploy it unless
``--no-deploy``, run :func:`repcompiler.quant.quant_report` on calibration batches
(``--calibration-data FILE``, else ``--calibration`` random batches of
``--input-shape``, said so in the output), print the table and the worst layers,
optionally write the report as JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import torch

from ..transforms.deploy import deploy
from ..errors import UnsupportedError
from ..io import atomic_write_bytes, check_output_path
from .common import EXIT_OK, load_model_arg, out, shape_arg

__all__ = ["add_quant_report_parser", "cmd_quant_report"]


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (a usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
        return value
    return parse


def _calibration(args: argparse.Namespace) -> tuple[list[torch.Tensor], str]:
    """The calibration batches and a line saying where they come from."""
    batch = args.input_shape[0]
    if args.calibration_data:
        data = torch.load(args.calibration_data, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor) or data.dim() == 0 or not data.is_floating_point():
            raise UnsupportedError(f"--calibration-data {args.calibration_data}: expected a floating tensor of "
                                   f"inputs saved with torch.save, got {type(data).__name__}")
        batches = list(data.split(batch))[: args.calibration]  # None: all
        return batches, (f"calibration: {len(batches)} batch(es) of {batch} from {args.calibration_data} "
                         f"({data.shape[0]} inputs of shape {tuple(data.shape[1:])})")
    n = args.calibration or 4
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randn(args.input_shape, generator=g) for _ in range(n)]
    return batches, (f"calibration: {n} batch(es) of RANDOM inputs of shape {args.input_shape} "
                     f"(seed {args.seed}; no --calibration-data given: activation ranges of real data differ)")


def cmd_quant_report(args: argparse.Namespace) -> int:
    """``repcompiler quant-report``: print (and optionally write) MODEL's INT8 report."""
    from ..quant import quant_report  # torch.ao.quantization, only for this command

    if args.json:
        check_output_path(args.json)
    model = load_model_arg(args, orepa=args.orepa)
    batches, origin = _calibration(args)
    if not args.no_deploy:
        model = deploy(model, batches[0][:1], inplace=True, verify=not args.no_verify)
    report = quant_report(model, batches, bits=args.bits, weight_mode="per_channel" if args.per_channel else
                          "per_tensor", max_layers=args.max_layers)
    out(origin)
    out(("model: as given (--no-deploy)" if args.no_deploy else "model: deployed (repcompiler.deploy)"))
    if not args.quiet:
        out(str(report))
    worst = report.worst(args.top)
    out(f"worst {len(worst)} layer(s) ({'per-channel' if args.per_channel else 'per-tensor'} weights):")
    for r in worst:
        share = "-" if r.error_share is None else f"{100 * r.error_share:.0f}%"
        why = "; ".join(r.flags) if r.flags else "no flag"
        out(f"  {r.name} ({r.kind}): error share {share}, channel range ratio {r.channel_range_ratio:.1f}x: {why}")
    if args.json:
        data = {"model": args.model, "calibration": origin, "deployed": not args.no_deploy, **report.to_dict()}
        atomic_write_bytes(args.json, json.dumps(data, indent=1, allow_nan=False).encode())
        out(f"wrote the report to {args.json}")
    return EXIT_OK


def add_quant_report_parser(sub: Any, parents: list[argparse.ArgumentParser],
                            handler: Callable[[argparse.Namespace], int] = cmd_quant_report) -> None:
    """Add ``quant-report`` to the subparsers ``sub`` (``parents``: the shared option groups)."""
    p = sub.add_parser(
        "quant-report", parents=parents, allow_abbrev=False,
        help="will MODEL survive INT8? per-layer ranges, SQNR, simulated INT8 error, flagged layers",
        description="Deploy MODEL (unless --no-deploy), then simulate symmetric INT8 (weights per tensor and per "
                    "channel, activations per tensor with ranges from calibration) and print, per conv/linear "
                    "layer, the weight and activation ranges, the weight SQNRs, the end-to-end error when only "
                    "that layer is quantized, and flags with reasons; then the end-to-end error of the whole "
                    "INT8 model and the worst layers. Nothing is written unless --json.")
    g = p.add_argument_group("calibration")
    g.add_argument("--input-shape", metavar="N,C,H,W", required=True, type=shape_arg,
                   help="shape of one calibration batch")
    g.add_argument("--calibration", metavar="N", type=_int_in(1), default=None,
                   help="number of calibration batches (default: 4 random ones, or all of --calibration-data)")
    g.add_argument("--calibration-data", metavar="FILE",
                   help="a tensor of inputs saved with torch.save (loaded with weights_only=True), split into "
                        "batches of N")
    g.add_argument("--seed", type=int, default=0, help="seed of the random calibration inputs (default: %(default)s)")
    g = p.add_argument_group("report")
    g.add_argument("--per-channel", action="store_true",
                   help="rank and flag by per-channel weights (what the runtime will use); default per tensor")
    g.add_argument("--bits", type=_int_in(2, 16), default=8, help="integer width, 2..16 (default: %(default)s)")
    g.add_argument("--top", metavar="K", type=_int_in(1), default=3, help="worst layers to list (default: %(default)s)")
    g.add_argument("--max-layers", metavar="N", type=_int_in(0), default=64,
                   help="measure the per-layer sensitivity of at most N layers (default: %(default)s)")
    g.add_argument("--json", metavar="OUT", help="write the report as JSON (atomically)")
    g.add_argument("--no-deploy", action="store_true", help="report on MODEL as it is, without deploying it")
    g.add_argument("--no-verify", action="store_true", help="skip deploy's equivalence checks")
    p.set_defaults(func=handler)

"""``repcompiler bench``: the training-cost benchmark script, or a quick in-process timing.

Owns :func:`cmd_bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import RepCompilerError
from ..io import build_model
from ..tools.profiling import step_times
from ..tools.progress import Stages
from ..explain.report import count_params
from ..transforms.orepa import orepa_transform
from .common import EXIT_OK, out

__all__ = ["cmd_bench"]

log = logging.getLogger(__name__)


def _bench_script() -> Path | None:
    env = os.environ.get("REPCOMPILER_BENCH_SCRIPT")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "benchmarks" / "train_cost.py"
    return here if here.is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    """``repcompiler bench``: the benchmark script (its options after ``--``) or ``--quick``."""
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
        out("benchmarks/train_cost.py not found (installed without the source tree); running the quick timing")
    return _quick_bench(args)


def _forms(args: argparse.Namespace) -> list[tuple[str, Callable[[], nn.Module]]]:
    kwargs = args.model_kwargs or {}
    return [
        ("plain", lambda: build_model(args.model, **kwargs)),
        ("orepa online", lambda: orepa_transform(build_model(args.model, **kwargs), block=args.block, mode="online")),
        ("orepa offline", lambda: orepa_transform(build_model(args.model, **kwargs), block=args.block,
                                                  mode="offline")),
    ]


def _quick_bench(args: argparse.Namespace) -> int:
    """Median train-step time of plain vs OREPA online vs offline, one process, one batch size.

    Progress: a bar on a terminal; otherwise one line per form on stderr (``-q``: none)."""
    torch.manual_seed(args.seed)
    forms = _forms(args)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rows = []
    total = len(forms) * (args.warmup + args.steps)
    with Stages("bench", [name for name, _ in forms], enabled=not args.quiet, lines=True, total=total,
                unit="step") as bar:
        for name, make in forms:
            bar.start(f"{name} ({args.warmup} warm-up + {args.steps} timed steps)")
            model = make().train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                model(x).float().mean().backward()
                opt.step()
                bar.done()

            times = step_times(step, args.warmup, args.steps)
            rows.append((name, statistics.median(times), count_params(model)))
    base = rows[0][1]
    extra = f", model kwargs {json.dumps(args.model_kwargs)}" if args.model_kwargs else ""
    out(f"train step (SGD on the mean output), {args.model}{extra}, block {args.block}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, median of {args.steps} after {args.warmup} warm-up, seed {args.seed}, "
        f"threads {torch.get_num_threads()}")
    out(f"{'form':<14} {'time [s]':>9} {'x plain':>8} {'params':>12}")
    for name, t, p in rows:
        out(f"{name:<14} {t:>9.4f} {t / base:>8.2f} {p:>12,}")
    return EXIT_OK

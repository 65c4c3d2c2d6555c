"""The demo: OREPA on torchvision's ResNet-18, end to end, in well under a minute.

``python -m repcompiler.demo`` (or ``repcompiler demo``) builds ResNet-18, turns every
conv into an online OREPA block (:func:`repcompiler.orepa_transform`), trains a few
steps on a fixed random batch with a progress bar, deploys it to plain convs
(:func:`repcompiler.deploy`), checks that the deployed model computes what the trained
one does, and prints a short table: parameters of the training and deployed forms,
one training step of the plain model vs OREPA online vs the same blocks offline (a BN
per branch, every branch on the feature map) in time and peak CPU-allocator memory,
and the largest output difference.

Peak memory of one step = bytes live at its start (parameters, gradients, optimizer
state, batch) + the maximum running sum of the allocator events recorded by
``torch.profiler`` during the step.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

from .profiling import sgd_step, step_peak_bytes, step_times

__all__ = ["run_demo", "DemoResult", "measure_step", "main"]

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What the demo measured (``str()`` is the printed table)."""

    params_plain: int = 0
    params_train: int = 0
    params_deployed: int = 0
    params_plain_folded: int = 0  # the plain model with its BNs folded: what deploy must match
    convs_plain: int = 0
    convs_deployed: int = 0
    step: dict[str, tuple[float, int]] = field(default_factory=dict)  # form -> (seconds, peak bytes)
    losses: list[float] = field(default_factory=list)
    max_abs_diff: float = float("nan")
    rel_diff: float = float("nan")
    deployed: bool = False
    seconds: float = 0.0

    def table(self) -> str:
        rows = [
            ("parameters: plain model", f"{self.params_plain:,}"),
            ("parameters: OREPA training form", f"{self.params_train:,}"),
            ("parameters: deployed", f"{self.params_deployed:,}" if self.deployed else "(deploy unavailable)"),
            ("parameters: plain model, BN folded", f"{self.params_plain_folded:,}" if self.deployed else "-"),
            ("convs: plain / deployed", f"{self.convs_plain} / {self.convs_deployed}" if self.deployed else "-"),
        ]
        for form, (sec, peak) in self.step.items():
            rows.append((f"one train step: {form}", f"{sec * 1000:8.1f} ms   peak {peak / 2**20:7.1f} MB"))
        if self.losses:
            rows.append(("training loss (first -> last)", f"{self.losses[0]:.4f} -> {self.losses[-1]:.4f}"))
        if self.deployed:
            rows.append(("deployed vs trained (eval), max diff", f"relative {self.rel_diff:.2e} (absolute {self.max_abs_diff:.2e})"))
        rows.append(("demo wall time", f"{self.seconds:.1f} s"))
        w = max(len(r[0]) for r in rows)
        line = "-" * (w + 36)
        return "\n".join([line] + [f"{a.ljust(w)}  {b}" for a, b in rows] + [line])

    def __str__(self) -> str:
        return self.table()


def measure_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int = 1) -> tuple[float, int]:
    """``(seconds, peak bytes)`` of one SGD train step (see the module docstring)."""

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = sgd_step(model, opt, x, y)
    (sec,) = step_times(step, warmup, 1)
    peak, _ = step_peak_bytes(step, model, opt, x, y)
    return sec, peak


def run_demo(
    *,
    steps: int = 10,
    batch: int = 8,
    size: int = 64,
    num_classes: int = 10,
    seed: int = 0,
    measure: bool = True,
    progress: bool = True,
    out: TextIO | None = sys.stdout,
) -> DemoResult:
    """Run the demo (see the module docstring) and return what it measured; the table
    is written to ``out`` (``None``: silent)."""
    import torchvision

    from . import orepa_transform
    from .report import count_convs, count_params

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    res = DemoResult()
    plain = torchvision.models.resnet18(num_classes=num_classes)
    model = orepa_transform(plain)
    res.params_plain, res.params_train = count_params(plain), count_params(model)
    res.convs_plain = count_convs(plain)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch,))

    # train a few steps
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    try:
        from tqdm.auto import tqdm

        it = tqdm(range(steps), desc="training OREPA ResNet-18", disable=not progress, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        it = range(steps)
    for _ in it:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        res.losses.append(loss.item())
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{loss.item():.3f}")

    if measure:
        res.step["plain"] = measure_step(plain, x, y)
        res.step["OREPA online"] = measure_step(orepa_transform(plain), x, y)
        res.step["OREPA offline"] = measure_step(orepa_transform(plain, mode="offline"), x, y)

    # deploy and check
    model.eval()
    try:
        from . import deploy
    except ImportError:  # pragma: no cover - deploy is part of the package now
        deploy = None  # type: ignore[assignment]
    if deploy is not None:
        deployed = deploy(model, (x[:2],))
        with torch.no_grad():
            want, got = model(x), deployed(x)
        res.deployed = True
        res.params_deployed = count_params(deployed)
        res.params_plain_folded = count_params(deploy(plain.eval(), (x[:2],), verify=False))
        res.convs_deployed = count_convs(deployed)
        res.max_abs_diff = (want - got).abs().max().item()
        res.rel_diff = res.max_abs_diff / max(want.abs().max().item(), 1e-30)
    res.seconds = time.perf_counter() - t0
    if out is not None:
        print(res.table(), file=out)
    return res


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m repcompiler.demo``)."""
    ap = argparse.ArgumentParser(prog="repcompiler demo", description="OREPA on ResNet-18: transform, train, deploy, check.")
    ap.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    ap.add_argument("--size", type=int, default=64, help="input resolution (default 64)")
    ap.add_argument("--no-measure", action="store_true", help="skip the plain/online/offline step measurement")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    res = run_demo(steps=args.steps, batch=args.batch, size=args.size, measure=not args.no_measure,
                   progress=not args.no_progress)
    return 0 if (not res.deployed or res.rel_diff < 1e-5) else 1


if __name__ == "__main__":
    raise SystemExit(main())

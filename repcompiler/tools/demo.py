"""The demo: OREPA on torchvision's ResNet-18, end to end, in well under a minute.

``python -m repcompiler.tools.demo`` (or ``repcompiler demo``) builds ResNet-18, turns every
conv into an online OREPA block (:func:`repcompiler.orepa_transform`), trains a few
steps on a fixed random batch with a progress bar, deploys it to plain convs
(:func:`repcompiler.deploy`), checks that the deployed model computes what the trained
one does, and prints a short table: parameters of the training and deployed forms,
the largest output difference, and the cost of one training step of the plain model vs
OREPA online vs the same blocks offline (a BN per branch, every branch on the feature
map) at two batch sizes, split into a fixed part and a per-sample part, with the peak
memory of a step. Each time is a median of ``repeats`` steps, more (up to four times as
many) while their times spread by over 10%; the split is a fit whose parts cannot go
negative; rows timed on a machine too busy for steady timings are marked ``~`` and the
table says so.

Why two batch sizes: OREPA online adds a *fixed* cost per step (every kernel generated
from its branches and backpropagated once), independent of the batch. At a small batch
it dominates a single timing, which says little about training at a real batch size,
where the ratio approaches the per-sample one.

Peak memory of one step on the CPU = bytes live at its start (parameters, gradients,
optimizer state, batch) + the maximum running sum of the allocator events recorded by
``torch.profiler`` during the step (:mod:`repcompiler.tools.profiling`); on CUDA, the caching
allocator's peak. Runs on ``device`` (CUDA when present). The profiler's own log lines
are kept out of the output (logged at DEBUG level).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .profiling import sgd_step, spread, steady_times, step_peak_bytes
from .progress import stderr_is_terminal

__all__ = ["run_demo", "DemoResult", "StepCost", "measure_step", "resolve_device", "main"]

log = logging.getLogger(__name__)


#: Timings whose spread (median absolute deviation / median) stays above this after the
#: extra repeats are flagged as measured on a noisy machine.
NOISY_SPREAD = 0.1


@dataclass
class StepCost:
    """One form's training-step cost: median seconds per batch size, the spread of each
    median's timings, the fit ``seconds = fixed + per_sample * batch`` through the batch
    sizes, and the peak memory of one step at the largest size (bytes).

    The fit is least squares with both parts non-negative (a step cannot cost less than
    nothing): where the timings fall with the batch (noise) the per-sample part is 0 and
    the fixed part their mean; where they grow faster than linearly the fixed part is 0.
    :attr:`clamped` says which bound was hit, :attr:`noisy` whether the numbers are
    rough."""

    seconds: dict[int, float] = field(default_factory=dict)
    peak: int = 0
    spreads: dict[int, float] = field(default_factory=dict)

    def _fit(self) -> tuple[float, float, str]:
        pts = sorted(self.seconds.items())
        n = len(pts)
        if n < 2:
            return (pts[0][1] if pts else 0.0), 0.0, ""
        mb = sum(b for b, _ in pts) / n
        mt = sum(t for _, t in pts) / n
        sbb = sum((b - mb) ** 2 for b, _ in pts)
        slope = sum((b - mb) * (t - mt) for b, t in pts) / sbb if sbb > 0 else 0.0
        if slope < 0:
            return mt, 0.0, "per_sample"
        fixed = mt - slope * mb
        if fixed < 0:  # through the origin
            return 0.0, sum(b * t for b, t in pts) / sum(b * b for b, _ in pts), "fixed"
        return fixed, slope, ""

    @property
    def fixed(self) -> float:
        """Seconds per step whatever the batch (>= 0)."""
        return self._fit()[0]

    @property
    def per_sample(self) -> float:
        """Seconds per sample (>= 0)."""
        return self._fit()[1]

    @property
    def clamped(self) -> str:
        """``"per_sample"`` (the step was not slower at the larger batch: noise),
        ``"fixed"`` (it grew faster than linearly) or ``""`` (an unconstrained fit)."""
        return self._fit()[2]

    @property
    def noisy(self) -> bool:
        """Some median's timings spread more than :data:`NOISY_SPREAD`, or the step was
        not slower at the larger batch."""
        return self.clamped == "per_sample" or any(v > NOISY_SPREAD for v in self.spreads.values())


MEANING = ("A step costs fixed + per sample x batch. OREPA online adds a fixed cost per step (every kernel generated "
           "and backpropagated once, whatever the batch) and keeps about the plain per-sample cost, so its ratio "
           "to plain falls as the batch grows; offline (DBB-style) pays per sample for every branch. Deployed, all "
           "three are the same plain model.")


@dataclass
class DemoResult:
    """What the demo measured (``str()`` is the printed table)."""

    params_plain: int = 0
    params_train: int = 0
    params_deployed: int = 0
    params_plain_folded: int = 0  # the plain model with its BNs folded: what deploy must match
    convs_plain: int = 0
    convs_deployed: int = 0
    device: str = "cpu"
    repeats: int = 0
    cost: dict[str, StepCost] = field(default_factory=dict)  # form -> its step cost
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
        if self.losses:
            rows.append(("training loss (first -> last)", f"{self.losses[0]:.4f} -> {self.losses[-1]:.4f}"))
        if self.deployed:
            rows.append(("deployed vs trained (eval), max diff", f"relative {self.rel_diff:.2e} (absolute {self.max_abs_diff:.2e})"))
        rows.append(("demo wall time", f"{self.seconds:.1f} s"))
        w = max(len(r[0]) for r in rows)
        lines = [f"{a.ljust(w)}  {b}" for a, b in rows]
        if self.cost:
            lines += ["", *self._cost_lines()]
        width = max(len(line) for line in lines)
        rule = "-" * width
        return "\n".join([rule, *lines, rule])

    def _cost_lines(self) -> list[str]:
        batches = sorted(next(iter(self.cost.values())).seconds)
        head = ["train step (SGD)"] + [f"batch {b}" for b in batches] + ["fixed", "per sample", f"peak (batch {batches[-1]})"]
        body = []
        for form, c in self.cost.items():
            mark = "~" if c.noisy else ""
            body.append([form + (" ~" if c.noisy else "")] + [f"{c.seconds[b] * 1000:.0f} ms" for b in batches]
                        + [f"{mark}{c.fixed * 1000:.0f} ms" if c.clamped != "fixed" else "n/a*",
                           f"{mark}{c.per_sample * 1000:.1f} ms", f"{c.peak / 2**20:.0f} MB"])
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        fmt = [" | ".join(cell.ljust(wd) if i == 0 else cell.rjust(wd) for i, (cell, wd) in enumerate(zip(r, widths)))
               for r in [head] + body]
        note = (f"medians of {self.repeats} or more steps per cell on {self.device} (more where the steps' times "
                "spread); fixed + per sample: the line through the two batch sizes (neither part below 0)")
        lines = [*fmt, note]
        if any(c.clamped == "fixed" for c in self.cost.values()):
            lines.append("* n/a: this form's step grew faster than linearly in the batch here (memory-bound), "
                         "so the line has no meaningful fixed part")
        noisy = [c for c in self.cost.values() if c.noisy]
        if noisy:
            worst = max((v for c in noisy for v in c.spreads.values()), default=0.0)
            lines.append(f"~ the machine was too busy for steady timings (step times varied by {worst:.0%} around "
                         "their median, or a step was no slower at the larger batch): these rows are rough; run "
                         "the demo on an idle machine for the split")
        return [*lines, *textwrap.wrap(MEANING, max(len(f) for f in fmt))]

    def __str__(self) -> str:
        return self.table()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int = 1,
                 repeats: int = 1) -> tuple[float, int, float]:
    """``(median seconds, peak bytes, spread)`` of an SGD train step of ``model`` on
    ``(x, y)`` (on their device): ``warmup`` untimed steps, ``repeats`` timed ones - more,
    up to ``4 * repeats``, while their spread exceeds :data:`NOISY_SPREAD`
    (:func:`repcompiler.tools.profiling.steady_times`) - then one step for the peak memory
    (CPU: see the module docstring; CUDA: the caching allocator's peak)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = sgd_step(model, opt, x, y)
    device = x.device

    def synced() -> None:
        step()
        _sync(device)

    times = steady_times(synced, warmup, repeats, limit=NOISY_SPREAD)
    sec = statistics.median(times)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        synced()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak, _ = step_peak_bytes(step, model, opt, x, y)
    return sec, peak, spread(times)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when present and CPU otherwise (``None``); an unusable device
    raises :class:`~repcompiler.errors.UnsupportedError`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UnsupportedError(f"demo: device {str(device)!r} is not usable here ({str(e).splitlines()[0]})") from None
    return dev


def run_demo(
    *,
    steps: int = 10,
    batch: int = 8,
    size: int = 64,
    num_classes: int = 10,
    seed: int = 0,
    measure: bool = True,
    repeats: int = 3,
    device: str | torch.device | None = None,
    progress: bool = True,
    out: TextIO | None = sys.stdout,
) -> DemoResult:
    """Run the demo (see the module docstring) and return what it measured; the table
    is written to ``out`` (``None``: silent). Step costs are measured at ``batch`` and
    ``4 * batch``, medians of ``repeats`` steps (more on a busy machine, see
    :func:`measure_step`); ``device``: CUDA when present, else CPU. The progress bar is
    drawn only when ``progress`` and stderr is a terminal."""
    import torchvision

    from .. import orepa_transform
    from ..explain.report import count_convs, count_params

    if steps < 1 or batch < 1 or size < 8 or repeats < 1:
        raise UnsupportedError(f"demo: steps, batch and repeats must be >= 1 and size >= 8, got steps={steps}, "
                               f"batch={batch}, size={size}, repeats={repeats}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    res = DemoResult(device=str(dev), repeats=repeats)
    plain = torchvision.models.resnet18(num_classes=num_classes).to(dev)
    model = orepa_transform(plain, init="fresh")
    res.params_plain, res.params_train = count_params(plain), count_params(model)
    res.convs_plain = count_convs(plain)
    x = torch.randn(4 * batch, 3, size, size, device=dev)
    y = torch.randint(0, num_classes, (4 * batch,), device=dev)
    res.losses = _train(model, x[:batch], y[:batch], steps, progress)
    if measure:
        _measure(plain, x, y, batch, repeats, res)
    _deploy_and_check(model, plain, x[:batch], res)
    res.seconds = time.perf_counter() - t0
    if out is not None:
        print(res.table(), file=out)
    return res


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, progress: bool) -> list[float]:
    """Train ``model`` ``steps`` SGD steps on one batch; the losses."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    try:
        from tqdm.auto import tqdm

        it = tqdm(range(steps), desc="training OREPA ResNet-18", disable=not (progress and stderr_is_terminal()),
                  file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        it = range(steps)
    losses = []
    for _ in it:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def _measure(plain: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, repeats: int, res: DemoResult) -> None:
    """The step cost of the plain model and its online and offline forms at ``batch`` and
    ``4 * batch``, into ``res.cost``."""
    from .. import orepa_transform

    forms = {"plain": plain, "OREPA online": orepa_transform(plain, init="fresh"),
             "OREPA offline (DBB-style)": orepa_transform(plain, init="fresh", mode="offline")}
    for form, m in forms.items():
        cost = res.cost[form] = StepCost()
        for b in (batch, 4 * batch):
            log.info("measuring %s at batch %d", form, b)
            cost.seconds[b], cost.peak, cost.spreads[b] = measure_step(m, x[:b], y[:b], warmup=1, repeats=repeats)


def _deploy_and_check(model: nn.Module, plain: nn.Module, xs: torch.Tensor, res: DemoResult) -> None:
    """Deploy the trained ``model``, compare it with itself on ``xs``, into ``res``."""
    from .. import deploy
    from ..explain.report import count_convs, count_params

    model.eval()
    deployed = deploy(model, (xs[:2],))
    with torch.no_grad():
        want, got = model(xs), deployed(xs)
    res.deployed = True
    res.params_deployed = count_params(deployed)
    res.params_plain_folded = count_params(deploy(plain.eval(), (xs[:2],), verify=False))
    res.convs_deployed = count_convs(deployed)
    res.max_abs_diff = (want - got).abs().max().item()
    res.rel_diff = res.max_abs_diff / max(want.abs().max().item(), 1e-30)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m repcompiler.tools.demo``)."""
    ap = argparse.ArgumentParser(prog="repcompiler demo", description="OREPA on ResNet-18: transform, train, deploy, check.")
    ap.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    ap.add_argument("--batch", type=int, default=8, help="batch size; costs are measured at it and 4x it (default 8)")
    ap.add_argument("--size", type=int, default=64, help="input resolution (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per measurement, median (default 3)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    ap.add_argument("--no-measure", action="store_true", help="skip the plain/online/offline step measurement")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    args = ap.parse_args(argv)
    res = run_demo(steps=args.steps, batch=args.batch, size=args.size, measure=not args.no_measure,
                   repeats=args.repeats, device=args.device, progress=not args.no_progress)
    return 0 if res.rel_diff < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())

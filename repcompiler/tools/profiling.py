"""One training step, its time and its peak CPU-allocator memory (shared by the demo and
the benchmarks).

:func:`sgd_step` builds the step every measurement runs (zero_grad, forward,
cross-entropy, backward, optimizer step); :func:`step_times` times it after warm-up;
:func:`steady_times` keeps timing (up to a cap) while the timings spread too much
(:func:`spread`: median absolute deviation / median), for medians a busy machine
disturbs less.

The peak is the bytes live when the step starts (parameters, buffers, gradients,
optimizer state and the given tensors, each storage counted once) plus the maximum
running sum of the allocation/free events that
``torch.profiler.profile(profile_memory=True)`` records during the step. The profiler
does not record frees of blocks allocated before it started, so whatever the step frees
of what was live at its start (the gradients its ``zero_grad(set_to_none=True)`` drops)
stays counted while the step allocates their successors: for an exact peak, clear the
gradients before calling :func:`step_peak_bytes` (``benchmarks/accumulate.py`` does). The profiler's
native library (kineto) writes its own log lines to the process's stderr (``USDT: ...
profiler_start``, ``ERROR: ... gpuGetDeviceCount failed`` on machines without a GPU,
allocator warnings) whatever Python's logging says; :func:`step_peak_bytes` routes file
descriptor 2 to a temporary file while it profiles and re-emits those lines on this
module's logger at DEBUG level, so measurements print nothing of their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sgd_step", "measure_sgd_step", "step_times", "steady_times", "spread", "alternated_times", "live_bytes", "step_peak_bytes"]

log = logging.getLogger(__name__)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A function running one classification train step of ``model`` on ``(x, y)`` with ``opt``."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def measure_sgd_step(model: nn.Module, batch: int, size: int, *, warmup: int, steps: int,
                     weight_decay: float = 0.0, classes: int = 1000) -> dict[str, Any]:
    """Time and measure one SGD (momentum 0.9) classification step of ``model`` in train mode
    on a random ``batch x 3 x size x size`` input. Returns the median and every step time
    (``time_s``, ``times_s``, after ``warmup`` untimed steps), the step's peak and starting
    live bytes (:func:`step_peak_bytes`), the parameter count, the intra-op thread count
    and the load average before and after timing."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=weight_decay)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, classes, (batch,))
    step = sgd_step(model, opt, x, y)
    load0 = os.getloadavg()[0]
    times = step_times(step, warmup, steps)
    peak, base = step_peak_bytes(step, model, opt, x, y)
    return {
        "batch": batch, "size": size,
        "time_s": statistics.median(times), "times_s": times,
        "peak_bytes": peak, "live_at_start_bytes": base,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "load_before": load0, "load_after": os.getloadavg()[0],
    }


def step_times(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Wall-clock seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def spread(times: list[float]) -> float:
    """The relative spread of ``times``: median absolute deviation / median (0 for fewer
    than two; robust to one outlier among three)."""
    if len(times) < 2:
        return 0.0
    med = statistics.median(times)
    return statistics.median(abs(t - med) for t in times) / med if med > 0 else 0.0


def steady_times(step: Callable[[], None], warmup: int, steps: int, *, max_steps: int | None = None,
                 limit: float = 0.1) -> list[float]:
    """Like :func:`step_times`, but while the timings' :func:`spread` exceeds ``limit``,
    time ``steps`` more, up to ``max_steps`` in all (default ``4 * steps``). The caller
    reads ``spread`` of the result to tell whether the machine was steady enough."""
    cap = max(steps, max_steps if max_steps is not None else 4 * steps)
    times = step_times(step, warmup, steps)
    while spread(times) > limit and len(times) < cap:
        times += step_times(step, 0, min(steps, cap - len(times)))
    return times


def alternated_times(steps: dict[str, Callable[[], None]], rounds: int,
                     report: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Wall-clock seconds of each named step, the steps alternated round by round (one call
    of each per round, in order), so a machine that drifts slows every form alike. Warm-up
    is the caller's. ``report`` (e.g. a print to stderr) gets one line per round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            times[name] += step_times(step, 0, 1)
        if report is not None:
            report(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return times


def live_bytes(model: nn.Module, opt: torch.optim.Optimizer, *tensors: torch.Tensor) -> int:
    """Bytes of the CPU storages held by ``model``, its gradients, ``opt``'s state and ``tensors``."""
    items: list[Any] = []
    for p in model.parameters():
        items += [p, p.grad]
    items += list(model.buffers())
    for state in opt.state.values():
        items += list(state.values())
    items += list(tensors)
    seen: set[int] = set()
    total = 0
    for t in items:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def step_peak_bytes(
    step: Callable[[], None], model: nn.Module, opt: torch.optim.Optimizer, *tensors: torch.Tensor
) -> tuple[int, int]:
    """Run ``step`` once under the profiler; return ``(peak_bytes, live_bytes_at_start)``."""
    from torch.profiler import ProfilerActivity, profile

    base = live_bytes(model, opt, *tensors)
    with _native_stderr_to_log():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
    run = peak = 0
    for _, n in events:
        run += n
        peak = max(peak, run)
    return base + peak, base


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Route file descriptor 2 (where native libraries write) to a temporary file for the
    duration, then log what was written at DEBUG level (see the module docstring)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):  # pragma: no cover
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip():
                    log.debug("native stderr: %s", line)

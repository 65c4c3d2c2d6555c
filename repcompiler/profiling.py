"""One training step, its time and its peak CPU-allocator memory (shared by the demo and
the benchmarks).

:func:`sgd_step` builds the step every measurement runs (zero_grad, forward,
cross-entropy, backward, optimizer step); :func:`step_times` times it after warm-up.

The peak is the bytes live when the step starts (parameters, buffers, gradients,
optimizer state and the given tensors, each storage counted once) plus the maximum
running sum of the allocation/free events that
``torch.profiler.profile(profile_memory=True)`` records during the step.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sgd_step", "step_times", "live_bytes", "step_peak_bytes"]


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A function running one classification train step of ``model`` on ``(x, y)`` with ``opt``."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


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

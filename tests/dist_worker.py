"""Worker for tests/online/test_distributed.py, launched as

    torchrun --nproc_per_node 2 tests/dist_worker.py OUTDIR [MODE ...]

(gloo, CPU). Every rank trains the same transformed model for a few SGD steps on its
half of a fixed batch, in each MODE:

* ``ddp``             - DistributedDataParallel, one forward/backward per step;
* ``ddp_accumulate``  - DDP, each rank's half split in two micro-batches inside
  ``rc.accumulate(model)``, ``no_sync()`` around the first;
* ``fsdp``            - FSDP2 (``torch.distributed.fsdp.fully_shard`` on every online
  block and the root), the model as ``orepa_transform`` returns it;
* ``fsdp_accumulate`` - FSDP2 with ``rc.accumulate`` (gradient sync only on the last
  micro-batch, ``set_requires_gradient_sync``).

Each rank writes ``OUTDIR/MODE_rankR.pt`` (the full parameters after training) or
``OUTDIR/MODE_rankR.err`` (the exception). The model runs in eval mode (BN with its
running statistics, as when fine-tuning with frozen BN statistics) so that per-rank and
per-micro-batch batches compute exactly what one process computes on the whole batch;
float64, so the comparison can be tight. :func:`reference` is that single-process run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import repcompiler as rc  # noqa: E402

STEPS = 3
BATCH = 8  # the combined batch; each of 2 ranks gets 4


def build() -> nn.Module:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    model = rc.orepa_transform(plain).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rc.testing.randomize_bn(model, torch.Generator().manual_seed(1))
    return model.eval()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, 10, 10, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g)


def reference() -> dict[str, torch.Tensor]:
    """One process, the whole batch, no wrapper."""
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(mode: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    model = build()
    if mode.startswith("ddp"):
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():
            if isinstance(m, rc.OnlineConv):
                fully_shard(m)
        wrapped = fully_shard(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    accumulate = mode.endswith("accumulate")
    for step in range(STEPS):
        x, y = data(step)
        xr, yr = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        micro = list(zip(xr.chunk(2), yr.chunk(2))) if accumulate else [(xr, yr)]
        with rc.accumulate(wrapped) if accumulate else contextlib.nullcontext():
            for i, (xm, ym) in enumerate(micro):
                last = i == len(micro) - 1
                if mode.startswith("ddp"):
                    sync = contextlib.nullcontext() if last else wrapped.no_sync()
                else:
                    wrapped.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext()
                with sync:
                    (F.cross_entropy(wrapped(xm), ym) * len(ym) / len(yr)).backward()
        opt.step()
    out = {}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = full.detach().clone()
    return out


def main() -> int:
    import torch.distributed as dist

    outdir, modes = sys.argv[1], sys.argv[2:] or ["ddp", "ddp_accumulate", "fsdp", "fsdp_accumulate"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for mode in modes:
        try:
            params = _train(mode, rank, world)
            torch.save(params, os.path.join(outdir, f"{mode}_rank{rank}.pt"))
        except Exception:
            with open(os.path.join(outdir, f"{mode}_rank{rank}.err"), "w") as f:
                f.write(traceback.format_exc())
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-process OREPA training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

The transformed model is sharded as ``orepa_transform`` returns it: every online block
is its own FSDP unit (its branch parameters are gathered for the kernel generation and
freed again), the root holds the rest. Each process trains on its share of every batch;
``rc.accumulate`` splits a share into micro-batches, with gradient reduction only on the
last one. At the end rank 0 gathers the full parameters, deploys the model to plain
convs and checks the deployed model against the trained one.

    torchrun --nproc_per_node 2 examples/train_fsdp.py            # CPU (gloo)
    torchrun --nproc_per_node 4 examples/train_fsdp.py --steps 50  # one GPU per process (nccl)

A few seconds on a CPU with the defaults.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import repcompiler as rc


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 1), *block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def batch(step: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch (the same on every rank): 10 classes of noisy patterns."""
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, 10, (size,), generator=g)
    patterns = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(-1))
    x = patterns[y] + 0.5 * torch.randn(size, 3, 16, 16, generator=g)
    return x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="global batch, split across the processes")
    ap.add_argument("--micro-batches", type=int, default=2, help="per process, inside rc.accumulate")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = rc.orepa_transform(small_cnn(), init="fresh").to(device)
    for m in model.modules():
        if isinstance(m, rc.OnlineConv):
            fully_shard(m)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    losses = []
    for step in range(args.steps):
        x, y = batch(step, args.batch, device)
        xr, yr = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        total = 0.0
        with rc.accumulate(model):
            parts = list(zip(xr.chunk(args.micro_batches), yr.chunk(args.micro_batches)))
            for i, (xm, ym) in enumerate(parts):
                model.set_requires_gradient_sync(i == len(parts) - 1)  # reduce once per step
                loss = F.cross_entropy(model(xm), ym) * len(ym) / len(yr)
                loss.backward()
                total += loss.item()
        opt.step()
        losses.append(total)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {total:.4f} (rank 0's share)")

    # every rank takes part in gathering the full state dict; rank 0 deploys
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"first_loss": losses[0], "last_loss": losses[-1]}
    if rank == 0:
        plain = rc.orepa_transform(small_cnn(), init="fresh")
        plain.load_state_dict(full)
        plain.eval()
        deployed = rc.deploy(plain)
        x, _ = batch(10_000, 8, torch.device("cpu"))
        with torch.no_grad():
            diff = rc.rewrite.verify.relative_error(deployed(x), plain(x))
        print(f"deployed: {rc.explain.count_convs(deployed)} plain convs, relative difference to the trained "
              f"model {diff:.2e}")
        result["deploy_diff"] = diff
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()

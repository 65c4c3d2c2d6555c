"""A custom training-time block, declared in a few lines and used like a built-in.

The block: a 3x3 conv becomes four parallel branches during training,

    3x3  +  1x3  +  3x1  +  dilated 3x3 (dilation 2)

each ending in a learnable per-channel scale (the OREPA linearization), followed by
the conv's BatchNorm. In online mode the four branches are folded into **one**
kernel inside autograd at every step, so the feature map sees one conv. The
dilated branch widens the receptive field to 5x5, so this block deploys as a 5x5
conv (a block whose branches fit in the conv's window deploys at the original size).

Steps: declare + register the block, run the library's equivalence properties on it
(`repcompiler.testing.check_block`), transform a small CNN with
`orepa_transform(model, block=...)`, train a few steps, deploy to plain convs, and
check the deployed model computes what the trained one does.

    python examples/custom_block.py        # a few seconds on a CPU
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import repcompiler as rc
from repcompiler.config import BlockConfig, Branch

# -- 1. declare the topology and register it ---------------------------------------------
CROSS_DILATED = (
    BlockConfig("cross_dilated")
    .describe("3x3 + 1x3 + 3x1 + dilated 3x3")
    .requires(lambda g: g.dims == 2 and g.kernel_size == (3, 3), "made for 3x3 2-d convs")
    .branch(Branch.conv(), name="square")  # the conv's own 3x3 kernel
    .branch(Branch.conv((1, 3)), name="horizontal")  # a line, centred in the window
    .branch(Branch.conv((3, 1)), name="vertical")
    .branch(Branch.conv(3, dilation=2), name="dilated", init=0.5)  # a dilated 3x3: 5x5 receptive field
    .register(override=True)  # override: re-running the script in one session is fine
)


# -- 2. a small CNN -----------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),  # 1x1: not this block's
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def count(model: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return params, convs


def main(steps: int = 12, check_examples: int = 6) -> float:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(CROSS_DILATED)

    # -- 3. the same proof the built-in blocks get: online == unfolded == deployed,
    #       gradients, geometry, exactness, on hypothesis-generated 3x3 convs
    print(rc.testing.check_block("cross_dilated", max_examples=check_examples, dims=(2,), kernel_size=3))

    # -- 4. transform: every 3x3 conv gets the block; the 1x1 conv is left (reported)
    plain = SmallCNN()
    model, report = rc.orepa_transform(plain, block="cross_dilated", return_report=True)
    print(report)
    # parameters are named after the declared branches: features.0.branches.square.weight, ...
    print([n for n, _ in model.named_parameters() if n.startswith("features.0.")])

    # -- 5. train a few steps on a fixed batch (the loss falls)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"train: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")

    # -- 6. deploy: every block becomes one plain conv, the BN folds into it
    model.eval()
    deployed, dreport = rc.deploy(model, x[:4], return_report=True)
    print(dreport)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    kernels = sorted({tuple(m.kernel_size) for m in deployed.modules() if isinstance(m, nn.Conv2d)})
    for label, m in (("plain", plain), ("train-form", model), ("deployed", deployed)):
        p, c = count(m)
        print(f"{label:>10}: {p:>7,} parameters, {c} plain convs")
    print(f"deployed kernels: {kernels}; max relative difference deployed vs trained: {err:.2e}")
    assert err < 1e-5, f"deployed model differs from the trained one (relative {err:.2e})"
    assert losses[-1] < losses[0], "training did not reduce the loss"
    assert not any(isinstance(m, rc.online.OnlineConv) for m in deployed.modules())
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return err


if __name__ == "__main__":
    main()

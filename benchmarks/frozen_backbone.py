"""Fine-tuning a head on a frozen backbone: OREPA online vs plain, in one process.

ResNet-18 (torchvision, random weights) at 112x112, training mode (the backbone's BNs
keep using batch statistics), every parameter but ``fc`` frozen; SGD train steps on a
fixed random batch. An online block none of whose parameters needs a gradient caches
its kernel, so its step should cost what the plain model's does; without that cache
every step regenerates every kernel. Three forms, alternated round by round (robust to
the machine's load drift), medians:

* ``plain``  - the torchvision model;
* ``online`` - ``orepa_transform(model)``, frozen: the kernel cache serves every step;
* ``online, regenerated`` - the same model with the cache disabled (its ``kernel()``
  regenerates every step, as before the cache covered training mode).

Usage::

    python benchmarks/frozen_backbone.py [--batch 16] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "frozen_backbone.json")
    args = ap.parse_args(argv)

    import torch
    import torchvision

    sys.path.insert(0, str(HERE.parent))
    import repcompiler as rc
    from repcompiler.online.conv import OnlineConv
    from repcompiler.tools.profiling import alternated_times, sgd_step, step_times

    torch.manual_seed(0)
    plain = torchvision.models.resnet18().train()
    online = rc.orepa_transform(plain).train()
    regen = rc.orepa_transform(plain).train()
    for block in regen.modules():
        if isinstance(block, OnlineConv):
            block.kernel = block.generate  # no cache: every forward regenerates
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    steps = {}
    for name, model in (("plain", plain), ("online", online), ("online, regenerated", regen)):
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.startswith("fc."))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        steps[name] = sgd_step(model, opt, x, y)
        step_times(steps[name], 2, 0)
    times = alternated_times(steps, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "batch": args.batch, "size": args.size,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "median_s": med,
              "online/plain": med["online"] / med["plain"],
              "regenerated/plain": med["online, regenerated"] / med["plain"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for k, v in med.items():
        print(f"{k:22s} {v * 1e3:8.1f} ms  ({v / med['plain']:.2f} x plain)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

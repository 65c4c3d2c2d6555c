"""Fig. 8: training cost per step as the OREPA block gains branches, online vs offline.

ResNet-18 (torchvision, 1000 classes) at a fixed batch (default 32 at 112x112). Every
3x3 conv gets a block built with the public declaration API
(:class:`repcompiler.config.BlockConfig`), cumulatively:

======  ===================================================  ======================
stage   branch added (scale init as the built-in ``orepa``)   declared with
======  ===================================================  ======================
1       origin kxk (0.25)                                    ``Branch.conv()``
2       + 1x1 -> kxk average (0.25)                          ``"1x1>avg"`` alias
3       + 1x1 x fixed frequency prior (0.0)                  ``Branch.custom`` (algebra)
4       + 1x1 (identity-init) -> kxk (0.5)                   ``"1x1>kxk"`` alias
5       + 1x1, centred (1.0)                                 ``Branch.pointwise()``
6       + depthwise kxk (x8) -> pointwise 1x1 (0.5)          ``Branch.custom`` (algebra)
======  ===================================================  ======================

The prior and the depthwise-multiplier branch have no ``Branch`` constructor, so they
are ``Branch.custom`` expressions written with :mod:`repcompiler.algebra` (the prior
pattern is :func:`repcompiler.blocks.frequency_prior`). The stem (7x7) and the 1x1
projections stay plain convs (the blocks ``require`` a 3x3 kernel), and so do they in
the two references: ``plain`` (no block) and ``builtin`` (the library's ``orepa`` block
on the same 3x3 convs, whose online form uses the specialised kernel generator, where
the declared blocks use the generic algebra fold).

``online``: one conv per block per forward (branch scales, the model's BN after the
block as post-BN). ``offline``: every branch on the feature map, a BN at the end of each
branch, the model's BN kept after the sum.

Each (stage, mode) runs in its own process (``python cost.py --worker ...``): SGD
(momentum 0.9, weight decay 1e-4) steps on a fixed random batch; ``warmup`` untimed
steps, then the **median** of ``steps`` step times. Memory, per process:

* ``rss_peak_mb`` - the process's resident-set high-water mark
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the timed steps: everything
  the process ever held (interpreter, torch, model, optimizer state, the steps). The
  kernel updates that mark from per-thread RSS counters it folds in lazily, so it can
  trail the resident set ``psutil`` reads from ``/proc`` by a few pages: the peak
  recorded is the larger of the two (never below ``rss_base_mb``);
* ``rss_base_mb`` - resident set (``psutil``) just before the first step (model,
  optimizer and batch built, no step run yet), so ``rss_peak_mb - rss_base_mb`` is
  what training steps added to the high-water mark;
* ``alloc_peak_mb`` - peak of torch's CPU allocator over one step
  (:func:`repcompiler.tools.profiling.step_peak_bytes`: live bytes at the step's start plus
  the maximum running sum of the profiler's allocation events).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

STAGES = ("origin", "+avg", "+prior", "+1x1>kxk", "+1x1", "+dw")
MODES = ("online", "offline")


def declare(stage: int):
    """The block with the first ``stage`` branches (1..6), registered as ``fig8_<stage>``."""
    import torch
    from torch import nn

    from repcompiler import algebra as A
    from repcompiler.blocks import frequency_prior
    from repcompiler.config import BlockConfig, Branch

    def fresh(*shape: int) -> nn.Parameter:
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))
        return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

    def prior(g):
        O, C, G = g.out_channels, g.in_channels, g.groups
        pattern = frequency_prior(O, g.kernel_size)
        fixed = A.Conv(pattern.reshape(O, 1, *g.kernel_size), stride=g.stride, padding=g.padding,
                       dilation=g.dilation, groups=O)  # a plain tensor: a buffer, not trained
        return A.Seq(A.Conv(fresh(O, C // G, *(1,) * g.dims), groups=G), fixed)

    def depthwise(g, expand: int = 8):
        O, C, G = g.out_channels, g.in_channels, g.groups
        dw = A.Conv(fresh(expand * C, 1, *g.kernel_size), stride=g.stride, padding=g.padding,
                    dilation=g.dilation, groups=C)
        return A.Seq(dw, A.Conv(fresh(O, expand * C // G, *(1,) * g.dims), groups=G))

    branches = [(Branch.conv(), 0.25), ("1x1>avg", 0.25), (Branch.custom(prior, "prior"), 0.0),
                ("1x1>kxk", 0.5), (Branch.pointwise(), 1.0), (Branch.custom(depthwise, "dw x8 -> pw"), 0.5)]
    cfg = BlockConfig(f"fig8_{stage}").describe(f"OREPA's first {stage} branches")
    cfg.requires(lambda g: g.kernel_size == (3, 3), "3x3 convs only (as the paper's kxk block)")
    for b, init in branches[:stage]:
        cfg.branch(b, init=init)
    return cfg.register(override=True)


def worker(form: str, mode: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    import psutil
    import torch
    import torchvision

    sys.path.insert(0, str(ROOT))
    import repcompiler as rc
    from repcompiler.tools.profiling import sgd_step, step_peak_bytes, step_times

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    if form == "builtin":
        model = rc.orepa_transform(model, mode=mode, policy=lambda n, c: "orepa" if c.kernel_size == (3, 3) else None)
    elif form != "plain":
        stage = STAGES.index(form) + 1
        declare(stage)
        model = rc.orepa_transform(model, block=f"fig8_{stage}", mode=mode)
    blocks = sum(isinstance(m, (rc.OnlineConv, rc.OfflineBlock)) for m in model.modules())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    step = sgd_step(model, opt, x, y)
    rss_base = psutil.Process().memory_info().rss
    load0 = os.getloadavg()[0]
    times = step_times(step, warmup, steps)
    rss_now = psutil.Process().memory_info().rss
    rss_peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_base, rss_now)  # kB -> bytes
    alloc_peak, _ = step_peak_bytes(step, model, opt, x, y)
    mb = 1024 * 1024
    return {"form": form, "mode": mode, "batch": batch, "size": size, "blocks": blocks,
            "time_s": statistics.median(times), "times_s": times,
            "rss_peak_mb": rss_peak / mb, "rss_base_mb": rss_base / mb, "alloc_peak_mb": alloc_peak / mb,
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
            "load_before": load0, "load_after": os.getloadavg()[0]}


def cells(quick: bool = False) -> list[tuple[str, str]]:
    """The (form, mode) cells, references first."""
    out = [("plain", "online"), ("builtin", "online"), ("builtin", "offline")]
    stages = ("origin", "+prior", "+dw") if quick else STAGES
    return out + [(s, m) for s in stages for m in MODES]


def run(batch: int, size: int, steps: int, warmup: int, quick: bool = False, progress: bool = True,
        log: Path | None = None, recorded_only: bool = False) -> list[dict]:
    """Every cell in its own process (``nice`` is inherited from the caller). With
    ``log`` (JSON lines) finished cells are appended and cells already there (same batch
    and size) are not measured again; ``recorded_only`` measures nothing new."""
    from tqdm import tqdm

    done = {}
    if log is not None and log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if (r["batch"], r["size"]) == (batch, size):
                done[(r["form"], r["mode"])] = r
    rows = []
    for form, mode in tqdm(cells(quick), desc="fig8 cost (one process each)", disable=not progress):
        if (form, mode) in done or recorded_only:
            if (form, mode) in done:
                rows.append(done[(form, mode)])
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", form, mode, "--batch", str(batch),
               "--size", str(size), "--steps", str(steps), "--warmup", str(warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode:
            raise RuntimeError(f"cost worker {form}/{mode} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("FORM", "MODE"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.size, args.steps, args.warmup)))
        return 0
    t0 = time.perf_counter()
    rows = run(args.batch, args.size, args.steps, args.warmup, args.quick)
    for r in rows:
        print(f"{r['form']:>9} {r['mode']:>7}: {r['time_s']:.3f} s/step, RSS peak {r['rss_peak_mb']:.0f} MB, "
              f"allocator peak {r['alloc_peak_mb']:.0f} MB")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

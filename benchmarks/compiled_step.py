"""torch.compile of a whole training step: plain vs OREPA online, eager vs compiled.

ResNet-18 (torchvision, 1000 classes) on the CPU; the step (zero_grad, forward,
cross-entropy, backward, SGD step with momentum) is one function, compiled with
``torch.compile`` as a whole (the backward runs as dynamo's compiled autograd graph or
after a graph break, whichever this torch does). Four forms, alternated round by round,
medians; compilation happens in the warm-up steps and its time is reported apart.

Usage::

    python benchmarks/compiled_step.py [--batch 16] [--size 112] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compiled_step.json")
    args = ap.parse_args(argv)

    import torch
    import torchvision

    sys.path.insert(0, str(HERE.parent))
    import repcompiler as rc
    from repcompiler.profiling import sgd_step

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    plain = torchvision.models.resnet18().train()
    steps, compile_s = {}, {}
    for name, online, compiled in (("plain, eager", False, False), ("online, eager", True, False),
                                   ("plain, compiled", False, True), ("online, compiled", True, True)):
        model = rc.orepa_transform(plain).train() if online else plain
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        step = sgd_step(model, opt, x, y)
        if compiled:
            step = torch.compile(step)
        t = time.perf_counter()
        step()
        step()  # warm-up (compilation for the compiled forms)
        compile_s[name] = time.perf_counter() - t
        steps[name] = step
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": now, "batch": args.batch, "size": args.size, "times_s": times,
                                    "median_s": med, "warmup_incl_compile_s": compile_s}, indent=1))
    lines = [f"# Compiled training step: ResNet-18, batch {args.batch}, {args.size}x{args.size}, CPU", "",
             f"Measured {now}; {args.rounds} rounds alternated, medians.", "",
             "| form | step (s) | vs plain eager | first two steps (s, incl. compile) |", "|---|---|---|---|"]
    for name in steps:
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / med['plain, eager']:.2f} | {compile_s[name]:.1f} |")
    md = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""torch.compile of a whole training step: plain vs OREPA online, eager vs compiled.

ResNet-18 (torchvision, 1000 classes) on the CPU; the step (zero_grad, forward,
cross-entropy, backward, SGD step with momentum) is one function, compiled with
``torch.compile`` as a whole (the backward runs as dynamo's compiled autograd graph or
after a graph break, whichever this torch does). Four forms, alternated round by round,
medians of the time per step. Compilation happens in the two warm-up steps; its cost is
reported apart (the warm-up steps' time minus two median steps).

Writes ``benchmarks/results/compiled_step.json`` and ``.md`` (date, command, torch,
threads, load average, the table).

Usage::

    python benchmarks/compiled_step.py [--batch 16] [--size 112] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
    from repcompiler.tools.profiling import alternated_times, sgd_step

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
    load = [os.getloadavg()[0]]
    times = alternated_times(steps, args.rounds, lambda line: print(line, file=sys.stderr))
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    compile_only = {k: max(0.0, compile_s[k] - 2 * med[k]) for k in steps}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = ("python benchmarks/compiled_step.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": now, "command": cmd, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "loadavg_before_after": load,
        "times_s": times, "median_s": med, "warmup_incl_compile_s": compile_s, "compile_s": compile_only,
    }, indent=1))
    base = med["plain, eager"]
    lines = [
        f"# Compiled training step: ResNet-18, batch {args.batch}, {args.size}x{args.size}, CPU",
        "",
        f"Measured {now} with `{cmd}` (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load[0]:.1f} -> {load[1]:.1f}); forms alternated over {args.rounds} rounds, medians. "
        "The whole step (zero_grad, forward, loss, backward, SGD step) is one `torch.compile`d function.",
        "",
        "| form | time per step (s) | vs plain eager | compile (s, once) |",
        "|---|---|---|---|",
    ]
    for name in steps:
        comp = f"{compile_only[name]:.0f}" if name.endswith("compiled") else "-"
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / base:.2f} | {comp} |")
    lines += [
        "",
        f"Compiling pays off for the online model when (online eager - online compiled) x steps exceeds its "
        f"compile time: here {med['online, eager'] - med['online, compiled']:+.3f} s per step.",
    ]
    md = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training cost of a RepVGG model in its original training form vs ``linearize``d.

timm ``repvgg_a0`` (``pretrained=False``, 1000 classes) at 64x64 on this machine's CPU,
batch sizes 8 and 32. Forms:

* ``original``   - timm's training form: every block runs its 3x3+BN, 1x1+BN and
  identity-BN branches on the feature map (a BN with batch statistics per branch);
* ``linearized`` - ``repcompiler.linearize(model)``: each block is one online conv
  (kernel generated from the branch parameters every forward) followed by one post-BN;
* ``plain``      - ``repcompiler.deploy(linearized)`` trained as is: the inference
  network (one conv per block, no BN), the lower bound of the cost.

Each configuration runs in its own process (no allocator or cache state leaks between
measurements), with one intra-op thread (the machine is shared). Per configuration:
SGD (momentum 0.9) train steps on a fixed random batch; 2 warm-up steps, then the
**median of 5** step times (zero_grad + forward + cross-entropy + backward + step).
**Peak memory** of torch's CPU allocator over one step = bytes live at the start of
the step (parameters, buffers, gradients, optimizer state, the batch) plus the maximum
running sum of the allocation/free events recorded by
``torch.profiler.profile(profile_memory=True)`` during that step (the method of
``benchmarks/train_cost.py``).

Usage::

    python benchmarks/linearize_cost.py            # writes results/linearize_cost.{json,md}
    python benchmarks/linearize_cost.py --batches 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMS = ("original", "linearized", "plain")


def worker(form: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    import torch
    import timm

    sys.path.insert(0, str(HERE.parent))
    import repcompiler as rc
    from repcompiler.tools.profiling import measure_sgd_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False)
    t0 = time.perf_counter()
    if form in ("linearized", "plain"):
        model = rc.linearize(model)
    if form == "plain":
        model = rc.deploy(model)
    convert_s = time.perf_counter() - t0
    return {"form": form, **measure_sgd_step(model, batch, size, warmup=warmup, steps=steps), "convert_s": convert_s}


def markdown(results: list[dict], batches: list[int], meta: dict) -> str:
    by = {(r["form"], r["batch"]): r for r in results}
    mb = 1024 ** 2
    lines = [
        "# Training cost: timm repvgg_a0, original training form vs linearized",
        "",
        f"Measured {meta['date']} on {meta['cpus']} CPU cores (shared; load average in the json), "
        f"torch {meta['torch']}, timm {meta['timm']}, 1 intra-op thread, input {meta['size']}x{meta['size']}. "
        f"Each cell is its own process: median of {meta.get('steps', 5)} SGD steps after {meta.get('warmup', 2)} "
        "warm-up steps; peak = live bytes "
        "at step start + max running sum of the profiler's allocator events during one step "
        "(see `linearize_cost.py`). `plain` is the deployed network trained as is (lower bound).",
        "",
        "| batch | form | params | step time (s) | peak memory (MiB) | time / original | memory / original |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for b in batches:
        base = by.get(("original", b))
        for form in FORMS:
            r = by.get((form, b))
            if r is None:
                continue
            tr = f"{r['time_s'] / base['time_s']:.2f}" if base else ""
            mr = f"{r['peak_bytes'] / base['peak_bytes']:.2f}" if base else ""
            lines.append(f"| {b} | {form} | {r['params']:,} | {r['time_s']:.3f} | {r['peak_bytes'] / mb:.1f} | {tr} | {mr} |")
    if len(batches) >= 2:
        b0, b1 = min(batches), max(batches)
        lines += ["", f"Two-point fit `cost(batch) = fixed + per_sample * batch` (batches {b0} and {b1}):", "",
                  "| form | per-sample time (ms) | fixed time (s) | per-sample memory (MiB) | fixed memory (MiB) |",
                  "|---|---:|---:|---:|---:|"]
        for form in FORMS:
            r0, r1 = by.get((form, b0)), by.get((form, b1))
            if r0 is None or r1 is None:
                continue
            ts = (r1["time_s"] - r0["time_s"]) / (b1 - b0)
            ms = (r1["peak_bytes"] - r0["peak_bytes"]) / (b1 - b0)
            lines.append(f"| {form} | {1000 * ts:.1f} | {r0['time_s'] - ts * b0:.3f} | {ms / mb:.2f} | "
                         f"{(r0['peak_bytes'] - ms * b0) / mb:.1f} |")
    load = max(max(r["load_before"], r["load_after"]) for r in results)
    if load > (meta.get("cpus") or 1):
        lines += ["", f"Note: the machine was shared (load average up to {load:.1f} on {meta.get('cpus')} cores): "
                  "step times are noisy and the two-point time fits only indicative; the memory figures are "
                  "deterministic (identical across runs)."]
    conv = by.get(("linearized", batches[0]))
    if conv:
        lines += ["", f"`linearize(repvgg_a0)` itself took {conv['convert_s']:.1f} s (trace, rewrite, per-block verification)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", nargs=2, metavar=("FORM", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--from-json", type=Path, help="rewrite the markdown from a results json")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        batches = sorted({r["batch"] for r in data["results"]})
        md = markdown(data["results"], batches, data["meta"])
        (args.out / "linearize_cost.md").write_text(md)
        print(md)
        return 0
    if args.worker:
        form, batch = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(form, batch, args.size, args.steps, args.warmup)))
        return 0
    results = []
    for b in args.batches:
        for form in args.forms:
            cmd = [sys.executable, __file__, "--worker", form, str(b), "--size", str(args.size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"worker {form} batch {b} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{form:>10} batch {b:>3}: {r['time_s']:.3f} s/step, peak {r['peak_bytes'] / 2**20:.1f} MiB "
                  f"(load {r['load_before']:.1f})", flush=True)
    import torch
    import timm

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "torch": torch.__version__, "timm": timm.__version__, "size": args.size,
            "steps": args.steps, "warmup": args.warmup}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linearize_cost.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = markdown(results, args.batches, meta)
    (args.out / "linearize_cost.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

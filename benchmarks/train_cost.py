"""Training cost of OREPA online vs plain vs DBB offline (the paper's Table/Fig. on cost).

ResNet-18 (torchvision, 1000 classes) at 112x112 on this machine's CPU. Each
configuration (form x batch size) runs in its own process, so allocator state and
caches never leak between measurements. Forms:

* ``plain``   - the torchvision model as is;
* ``online``  - ``orepa_transform(model)`` (OREPA blocks, one conv per block);
* ``dbb``     - ``orepa_transform(model, block="dbb", mode="offline", post_bn=False)``:
  the DBB training form, a BN in every branch, every branch run on the feature map
  (the following BN of each conv is replaced by the branch BNs, as in DBB).

Per configuration (the fastest of ``--repeat`` interleaved runs, default 2): SGD (momentum 0.9, weight decay 1e-4) train steps on a fixed random
batch; 3 warm-up steps, then the **median of 10** step times (zero_grad + forward +
cross-entropy + backward + optimizer step). **Peak memory** of torch's CPU allocator
over one step = bytes live at the start of the step (parameters, buffers, gradients,
optimizer state, the batch: summed from the tensors themselves) plus the maximum of
the running sum of the allocation/free events the profiler records during that step
(``torch.profiler.profile(profile_memory=True)``, kineto ``[memory]`` events in time
order). For ``online`` the worker also times kernel generation alone (forward +
backward of every block's kernel, no feature map).

Fit: ``cost(batch) = fixed + per_sample * batch`` by least squares over the batch
sizes, for time and memory. Reported: per-sample ratios online/plain (targets: time
<= 1.10, memory <= 1.05), OREPA's extra fixed time ``fixed_online - fixed_plain``
in "samples of plain training" (``/ per_sample_plain``; target <= 12), and at batch 64
online/plain time (<= 1.3), online/DBB time (<= 0.45) and peak memory (<= 0.7).

Usage::

    python benchmarks/train_cost.py                 # all configurations, writes results/
    python benchmarks/train_cost.py --batches 8 16  # a subset
    python benchmarks/train_cost.py --paired 64     # plain vs online alternated in one process
    python benchmarks/train_cost.py --paired 8 16 32 64   # ... per batch size, fitted (robust to load drift)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMS = ("plain", "online", "dbb")
TARGETS = {
    "per_sample_time_online/plain": 1.10,
    "per_sample_mem_online/plain": 1.05,
    "fixed_online_extra_in_plain_samples": 12,
    "b64_time_online/plain": 1.3,
    "b64_time_online/dbb": 0.45,
    "b64_mem_online/dbb": 0.7,
}


def worker(form: str, batch: int, size: int, steps: int, warmup: int, threads: int = 0) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    import torchvision

    sys.path.insert(0, str(HERE.parent))
    import repcompiler as rc
    from repcompiler.tools.profiling import measure_sgd_step, step_times

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    if form == "online":
        model = rc.orepa_transform(model)
    elif form == "dbb":
        model = rc.orepa_transform(model, block="dbb", mode="offline", post_bn=False)
    out = {"form": form, **measure_sgd_step(model, batch, size, warmup=warmup, steps=steps, weight_decay=1e-4)}
    if form == "online":
        out["kernel_gen_s"] = statistics.median(step_times(kernel_generation(model), 1, 5))
    return out


def kernel_generation(model):
    """A function generating every online block's kernel, forward and backward (no feature map)."""
    from repcompiler.online.conv import OnlineConv

    blocks = [m for m in model.modules() if isinstance(m, OnlineConv)]

    def gen() -> None:
        total = 0
        for b in blocks:
            total = total + b.generate().weight.sum()
        total.backward()

    return gen


def paired(batch: int, size: int, rounds: int, threads: int = 0) -> dict:
    """Plain and online steps alternated in ONE process (robust to a drifting machine
    load): medians, and the online fixed cost implied by ``online - plain`` at the same
    batch, in samples of plain training (assumes equal per-sample cost)."""
    import torch
    import torchvision

    sys.path.insert(0, str(HERE.parent))
    import repcompiler as rc
    from repcompiler.tools.profiling import sgd_step, step_times

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    plain = torchvision.models.resnet18().train()
    online = rc.orepa_transform(plain).train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    step_plain, step_online = (
        sgd_step(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4), x, y)
        for m in (plain, online))
    gen = kernel_generation(online)
    step_times(step_plain, 2, 0)
    step_times(step_online, 2, 0)
    tp, to, tg = [], [], []
    for _ in range(rounds):
        tp += step_times(step_plain, 0, 1)
        to += step_times(step_online, 0, 1)
        tg += step_times(gen, 0, 1)
    mp, mo, mg = statistics.median(tp), statistics.median(to), statistics.median(tg)
    return {"batch": batch, "size": size, "rounds": rounds, "plain_s": mp, "online_s": mo, "kernel_gen_s": mg,
            "online/plain": mo / mp, "implied_fixed_in_plain_samples": (mo - mp) / (mp / batch),
            "kernel_gen_in_plain_samples": mg / (mp / batch), "threads": torch.get_num_threads(),
            "load": os.getloadavg()[0]}


def paired_sweep(args: argparse.Namespace) -> int:
    """Plain and online alternated in one process per batch size; fit ``plain(b)`` and the
    difference ``online(b) - plain(b)`` over batch. Differences taken inside one process
    cancel the machine's load drift, which the one-process-per-cell sweep cannot."""
    rows = []
    for b in args.paired:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--paired", str(b), "--size", str(args.size),
               "--rounds", str(args.rounds), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"b={b:3d}: plain {r['plain_s']:.3f} s, online {r['online_s']:.3f} s, "
              f"kernel generation {r['kernel_gen_s']:.3f} s", flush=True)
    bs = [r["batch"] for r in rows]
    p0, p1 = fit(bs, [r["plain_s"] for r in rows])
    d0, d1 = fit(bs, [r["online_s"] - r["plain_s"] for r in rows])
    summary = {
        "plain_fixed_s": p0, "plain_per_sample_s": p1, "extra_fixed_s": d0, "extra_per_sample_s": d1,
        "per_sample_time_online/plain": (p1 + d1) / p1,
        "fixed_online_extra_in_plain_samples": d0 / p1,
        "kernel_gen_s": statistics.median(r["kernel_gen_s"] for r in rows),
        "kernel_gen_in_plain_samples": statistics.median(r["kernel_gen_s"] for r in rows) / p1,
        f"b{max(bs)}_time_online/plain": next(r["online/plain"] for r in rows if r["batch"] == max(bs)),
    }
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = ["# Training cost, paired: ResNet-18, 112x112, CPU", "",
             f"Measured {date}; plain and online steps alternated in one process per batch size, "
             f"{args.rounds} rounds, medians (see `paired()` in `train_cost.py`).", "",
             "| batch | plain (s) | online (s) | online / plain | kernel generation (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['plain_s']:.3f} | {r['online_s']:.3f} | {r['online/plain']:.3f} | "
              f"{r['kernel_gen_s']:.3f} |" for r in rows]
    lines += ["", "Fit over batch: plain = fixed + per_sample x b, online - plain = extra_fixed + extra_per_sample x b.",
              "", "| quantity | measured | target |", "|---|---|---|"]
    lines += target_rows(summary, ".4g")
    out = args.out.with_name(args.out.name + "_paired")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"date": date, "rows": rows, "summary": summary}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def target_rows(values: dict[str, float], fmt: str) -> list[str]:
    """Markdown rows ``| name | value | target (met/missed) |`` (targets from ``TARGETS``)."""
    rows = []
    for k, v in values.items():
        t = TARGETS.get(k)
        ok = "" if t is None else (" (met)" if v <= t else " (missed)")
        rows.append(f"| {k} | {v:{fmt}} | {'' if t is None else f'<= {t}'}{ok} |")
    return rows


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def summarize(results: list[dict], batches: list[int]) -> dict:
    by = {(r["form"], r["batch"]): r for r in results}
    fits = {}
    for form in FORMS:
        bs = [b for b in batches if (form, b) in by]
        if len(bs) >= 2:
            fits[form] = {
                "time": fit(bs, [by[form, b]["time_s"] for b in bs]),
                "mem": fit(bs, [by[form, b]["peak_bytes"] for b in bs]),
            }
    ratios = {}
    if "plain" in fits and "online" in fits:
        ratios["per_sample_time_online/plain"] = fits["online"]["time"][1] / fits["plain"]["time"][1]
        ratios["per_sample_mem_online/plain"] = fits["online"]["mem"][1] / fits["plain"]["mem"][1]
        ratios["fixed_online_extra_in_plain_samples"] = (fits["online"]["time"][0] - fits["plain"]["time"][0]) / fits["plain"]["time"][1]
        ratios["fixed_online_total_in_plain_samples"] = fits["online"]["time"][0] / fits["plain"]["time"][1]
    if "dbb" in fits and "plain" in fits:
        ratios["per_sample_time_dbb/plain"] = fits["dbb"]["time"][1] / fits["plain"]["time"][1]
        ratios["per_sample_mem_dbb/plain"] = fits["dbb"]["mem"][1] / fits["plain"]["mem"][1]
    b = max(batches)
    if ("online", b) in by and ("plain", b) in by:
        ratios[f"b{b}_time_online/plain"] = by["online", b]["time_s"] / by["plain", b]["time_s"]
        ratios[f"b{b}_mem_online/plain"] = by["online", b]["peak_bytes"] / by["plain", b]["peak_bytes"]
    if ("online", b) in by and ("dbb", b) in by:
        ratios[f"b{b}_time_online/dbb"] = by["online", b]["time_s"] / by["dbb", b]["time_s"]
        ratios[f"b{b}_mem_online/dbb"] = by["online", b]["peak_bytes"] / by["dbb", b]["peak_bytes"]
    return {"fits": fits, "ratios": ratios}


def markdown(results: list[dict], summary: dict, batches: list[int], meta: dict) -> str:
    by = {(r["form"], r["batch"]): r for r in results}
    lines = [
        "# Training cost: ResNet-18, 112x112, CPU",
        "",
        f"Measured {meta['date']} on {meta['cpus']} CPU cores, torch {meta['torch']}, "
        f"{meta['threads']} intra-op threads; load average before/after each run in the json. "
        f"Each cell is its own process: median of 10 SGD steps after 3 warm-up steps, the fastest of "
        f"{meta.get('repeat', 1)} interleaved repeats; peak = live "
        "bytes at step start + max running sum of the profiler's allocator events during one step "
        "(see `train_cost.py`).",
        "",
        "| form | " + " | ".join(f"b={b} time (s)" for b in batches) + " | " + " | ".join(f"b={b} peak (MB)" for b in batches) + " |",
        "|---|" + "---|" * (2 * len(batches)),
    ]
    for form in FORMS:
        cells = [f"{by[form, b]['time_s']:.3f}" if (form, b) in by else "-" for b in batches]
        cells += [f"{by[form, b]['peak_bytes'] / 2**20:.0f}" if (form, b) in by else "-" for b in batches]
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    lines += ["", "Fit `cost = fixed + per_sample * batch`:", "",
              "| form | fixed time (s) | per-sample time (ms) | fixed mem (MB) | per-sample mem (MB) |", "|---|---|---|---|---|"]
    for form, f in summary["fits"].items():
        lines.append(f"| {form} | {f['time'][0]:.3f} | {1000 * f['time'][1]:.2f} | {f['mem'][0] / 2**20:.0f} | {f['mem'][1] / 2**20:.2f} |")
    lines += ["", "| ratio | measured | target |", "|---|---|---|"]
    lines += target_rows(summary["ratios"], ".3f")
    gen = [r.get("kernel_gen_s") for r in results if r.get("kernel_gen_s")]
    if gen:
        lines += ["", f"Kernel generation alone (all OREPA blocks, forward + backward): median {statistics.median(gen):.3f} s per step."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--form", choices=FORMS, default="plain")
    ap.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per worker (0: torch's default)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_cost")
    ap.add_argument("--paired", type=int, nargs="+", default=[], metavar="BATCH",
                    help="alternate plain and online steps in one process per batch size (each its own "
                         "process); with several sizes, fit the online - plain difference over batch")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2,
                    help="run every cell this many times (interleaved) and keep the fastest median: "
                         "robust to other load drifting in and out")
    args = ap.parse_args(argv)
    if len(args.paired) == 1:
        print(json.dumps(paired(args.paired[0], args.size, args.rounds, args.threads)))
        return 0
    if args.paired:
        return paired_sweep(args)
    if args.worker:
        print(json.dumps(worker(args.form, args.batch, args.size, args.steps, args.warmup, args.threads)))
        return 0
    best: dict[tuple[str, int], dict] = {}  # per cell: the repeat with the fastest median step
    for batch, form in [(b, f) for _ in range(args.repeat) for b in args.batches for f in args.forms]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--form", form, "--batch", str(batch),
               "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        prev = best.get((form, batch))
        r["repeat_medians_s"] = (prev["repeat_medians_s"] if prev else []) + [r["time_s"]]
        if prev is None or r["time_s"] < prev["time_s"]:
            best[form, batch] = r
        else:
            prev["repeat_medians_s"] = r["repeat_medians_s"]
        print(f"{form:7s} b={batch:3d}: {r['time_s']:.3f} s, peak {r['peak_bytes'] / 2**20:.0f} MB"
              f" (load {r['load_before']:.1f}->{r['load_after']:.1f})", flush=True)
    import torch

    results = [best[f, b] for b in args.batches for f in args.forms]
    summary = summarize(results, args.batches)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": results[0]["threads"], "repeat": args.repeat}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, **summary}, indent=1))
    md = markdown(results, summary, args.batches, meta)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

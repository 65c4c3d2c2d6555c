"""Gradient accumulation: OREPA online with and without ``rc.accumulate``, in one process.

ResNet-18 (torchvision, 1000 classes) at 112x112 on the CPU, one optimizer step (SGD,
momentum 0.9, weight decay 1e-4) over 4 micro-batches of 16, against one step on a
single batch of 64:

* ``plain, 4 x 16``                 - the torchvision model, micro-batch loop;
* ``plain, 1 x 64``                 - the torchvision model, one batch;
* ``online, 4 x 16``                - ``orepa_transform(model)``, micro-batch loop: every
  micro-batch regenerates every kernel and backpropagates through its generator;
* ``online, 4 x 16, rc.accumulate`` - the same loop inside ``rc.accumulate(model)``:
  kernels generated and backpropagated once per step;
* ``online, 1 x 64``                - one online step on the whole batch.

The forms are alternated round by round (robust to the machine's load drift) and the
time per optimizer step is the median over the rounds. Peak memory of one step is
measured once per form afterwards (:func:`repcompiler.tools.profiling.step_peak_bytes`: bytes
live at the step's start plus the running peak of the allocator events; the gradients
are cleared before, as the step's own ``zero_grad`` would, so that their frees are not
missed by the profiler and counted twice). ``kept``
is what ``rc.accumulate`` keeps across the micro-batches: every online kernel and its
accumulated gradient.

Targets (issue 17): accumulated step <= 1.05 x the online 1 x 64 step; its peak memory
<= the peak of one online micro-batch step (``online, 1 x 16``) + the kept kernels.

Usage::

    python benchmarks/accumulate.py [--rounds 7] [--micro 16] [--n-micro 4] [--size 112]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=16, help="micro-batch size (default 16)")
    ap.add_argument("--n-micro", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "accumulate.json")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    import torchvision

    sys.path.insert(0, str(HERE.parent))
    import repcompiler as rc
    from repcompiler.online.conv import OnlineConv
    from repcompiler.tools.profiling import alternated_times, step_peak_bytes

    torch.manual_seed(0)
    n, b = args.n_micro, args.micro
    x = torch.randn(n * b, 3, args.size, args.size)
    y = torch.randint(0, 1000, (n * b,))
    micro = list(zip(x.split(b), y.split(b)))
    plain = torchvision.models.resnet18().train()

    def make_step(model, opt, batches, accumulate: bool):
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with rc.accumulate(model) if accumulate else contextlib.nullcontext():
                for xb, yb in batches:
                    (F.cross_entropy(model(xb), yb) / len(batches)).backward()
            opt.step()

        return step

    forms = {}
    for name, online, batches, acc in (
        (f"plain, {n} x {b}", False, micro, False),
        (f"plain, 1 x {n * b}", False, [(x, y)], False),
        (f"online, {n} x {b}", True, micro, False),
        (f"online, {n} x {b}, rc.accumulate", True, micro, True),
        (f"online, 1 x {n * b}", True, [(x, y)], False),
    ):
        model = rc.orepa_transform(plain).train() if online else plain
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        forms[name] = (model, opt, batches, make_step(model, opt, batches, acc))

    for _, _, _, step in forms.values():  # warm-up
        step()
    load = [os.getloadavg()[0]]
    times = alternated_times({name: f[3] for name, f in forms.items()}, args.rounds,
                             lambda line: print(line, file=sys.stderr))
    load.append(os.getloadavg()[0])

    def peak(step, model, opt, batches) -> int:
        # every step starts with zero_grad(set_to_none=True); done here first, the gradients
        # it frees are out of the base (the profiler drops frees of blocks allocated before it
        # started, so freeing them inside the profile would count them twice)
        opt.zero_grad(set_to_none=True)
        return step_peak_bytes(step, model, opt, *[t for xy in batches for t in xy])[0]

    peaks = {name: peak(step, model, opt, batches) for name, (model, opt, batches, step) in forms.items()}
    online_model, online_opt = forms[f"online, 1 x {n * b}"][:2]
    micro_step = make_step(online_model, online_opt, micro[:1], False)
    micro_step()  # warm-up, as every form had
    peaks[f"online, 1 x {b}"] = peak(micro_step, online_model, online_opt, micro[:1])
    with torch.no_grad():
        generated = [m.generate() for m in online_model.modules() if isinstance(m, OnlineConv)]
        kernels = sum(k.weight.numel() + (k.bias.numel() if k.bias is not None else 0) for k in generated)
    kept = 2 * kernels * 4  # float32 kernel + its accumulated gradient

    med = {k: statistics.median(v) for k, v in times.items()}
    acc_name, big = f"online, {n} x {b}, rc.accumulate", f"online, 1 x {n * b}"
    ratio = med[acc_name] / med[big]
    mem_limit = peaks[f"online, 1 x {b}"] + kept
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/accumulate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "date": now, "command": cmd.strip(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "size": args.size, "micro": b, "n_micro": n, "rounds": args.rounds, "loadavg_before_after": load,
        "times_s": times, "median_s": med, "peak_bytes": peaks, "kept_bytes": kept,
        "accumulated_over_online_big": ratio, "accumulated_peak_limit_bytes": mem_limit,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    mb = 2 ** 20
    lines = [
        f"# Gradient accumulation: ResNet-18, {args.size}x{args.size}, CPU",
        "",
        f"Measured {now} with `{cmd.strip()}` (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load[0]:.1f} -> {load[1]:.1f}); forms alternated over {args.rounds} rounds, medians.",
        "",
        f"| optimizer step ({n * b} samples) | time (s) | vs online 1 x {n * b} | peak memory (MB) |",
        "|---|---|---|---|",
    ]
    for name in forms:
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / med[big]:.2f} | {peaks[name] / mb:.0f} |")
    lines += [
        "",
        f"One online micro-batch step (1 x {b}): peak {peaks[f'online, 1 x {b}'] / mb:.0f} MB; kernels kept by "
        f"rc.accumulate (kernel + gradient): {kept / mb:.0f} MB.",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| accumulated / online 1 x {n * b} time <= 1.05 | {ratio:.3f} | {'met' if ratio <= 1.05 else 'missed'} |",
        f"| accumulated peak <= online 1 x {b} peak + kept ({mem_limit / mb:.0f} MB) | {peaks[acc_name] / mb:.0f} MB "
        f"| {'met' if peaks[acc_name] <= mem_limit else 'missed'} |",
    ]
    md = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reproduce the paper's evidence (Tab. 3, Fig. 7, Fig. 8) on real data.

One command trains every Tab. 3 configuration on scikit-learn digits and MNIST-1D (a
learning-rate search that brackets each configuration's best rate, then more seeds at
that rate; one process of one thread, see :func:`train_all`), computes Fig. 7 from
those runs, measures the Fig. 8 cost on ResNet-18 (one process per configuration), and
rewrites ``figures/*.png``, ``results.md`` and ``results.json`` here::

    nice -n 15 python benchmarks/paper/run_all.py --quick   # smoke run, a few minutes
    nice -n 15 python benchmarks/paper/run_all.py --skip-cost --deadline 09:40   # the recorded runs
    python benchmarks/paper/run_all.py --report-only        # figures and tables from the recorded runs

See :mod:`ablation` (Tab. 3 / Fig. 7) and :mod:`cost` (Fig. 8) for what is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import ablation  # noqa: E402
import common  # noqa: E402
import cost  # noqa: E402

#: the learning-rate ladder (half-decade steps) the grid search moves on
LADDER = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)

PRESETS = {
    # start: the first grid of every configuration; select: the seeds that choose the rate;
    # seeds: the seeds run at each configuration's chosen rate; epochs per data set;
    # cost: Fig. 8 (batch, size, steps, warmup, quick cells)
    "full": dict(start=[0.03, 0.1, 0.3], select=2, seeds=6, epochs={"digits": 30, "mnist1d": 30}, batch=128,
                 cost=(16, 64, 3, 1, False)),
    "quick": dict(start=[0.03, 0.1, 0.3], select=1, seeds=2, epochs={"digits": 2, "mnist1d": 1}, batch=128,
                  cost=(8, 64, 2, 1, True)),
    "tiny": dict(start=[0.05], select=1, seeds=1, epochs={"digits": 1}, batch=64, cost=None, bracket=False),
}

#: the order the sweep runs the configurations in
PRIORITY = ("plain", "orepa_vector", "plain_no_bn", "orepa_no_postbn", "orepa_fixed", "orepa_none", "orepa_scalar",
            "dbb_offline")

_DATA: dict[str, common.Split] = {}


def _init(data: dict[str, common.Split]) -> None:
    torch.set_num_threads(1)
    _DATA.update(data)


def _key(r: dict) -> tuple:
    return (r["dataset"], r["config"], r["lr"], r["seed"], r["epochs"], r.get("batch"))


def next_rate(runs: list[dict], ds: str, cfg: str, seeds: int) -> float | None:
    """The rate to try next for (``ds``, ``cfg``) so that the grid brackets its best rate:
    the ladder's neighbour beyond the best tried rate when that rate is at an edge of the
    tried grid (by mean validation accuracy over the first ``seeds`` seeds, a rate with a
    diverged seed ranking below every rate without); ``None`` when the best rate has a
    tried neighbour on both sides or the ladder ends."""
    mine = [r for r in runs if r["dataset"] == ds and r["config"] == cfg and r["seed"] < seeds]
    tried = sorted({r["lr"] for r in mine})
    if not tried:
        return None
    best = ablation.best_rate(mine)
    pos = LADDER.index(best) if best in LADDER else None
    if pos is None:
        return None
    if best == tried[0] and pos > 0:
        return LADDER[pos - 1]
    if best == tried[-1] and pos < len(LADDER) - 1:
        return LADDER[pos + 1]
    return None


def train_all(datasets: list[str], configs: list[str], preset: dict, progress: bool = True,
              log: Path | None = None, deadline: float | None = None) -> list[dict]:
    """The whole sweep, in one process (one thread), in this order:

    1. every (data set, configuration) on the ``start`` grid with the ``select`` seeds;
    2. rounds that extend each grid by one ladder step beyond its best rate while that
       rate is at an edge (:func:`next_rate`), so every chosen rate is bracketed;
    3. the remaining seeds at each configuration's chosen rate, seed by seed (a sweep
       stopped by ``deadline``, a ``time.time()``, has every configuration at the same
       number of seeds, give or take the last round).

    With ``log`` (JSON lines) finished runs are appended as they end and runs already
    there are not repeated (resume)."""
    from tqdm import tqdm

    done: dict[tuple, dict] = {}
    if log is not None and log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[_key(r)] = r
    data = {ds: common.load(ds) for ds in datasets}
    _init(data)
    epochs, batch, sel = preset["epochs"], preset["batch"], preset["select"]
    runs: list[dict] = []
    bar = tqdm(desc="Tab. 3 / Fig. 7 training runs", disable=not progress)

    def run(ds: str, cfg: str, lr: float, seed: int) -> bool:
        if deadline is not None and time.time() > deadline:
            return False
        k = (ds, cfg, lr, seed, epochs[ds], batch)
        if k in done:
            r = done[k]
        else:
            r = ablation.train_run(_DATA[ds], cfg, lr, seed, epochs[ds], batch)
            if log is not None:
                with log.open("a") as f:
                    f.write(json.dumps(r, default=_nan_safe) + "\n")
        runs.append(r)
        bar.update()
        return True

    # the configurations most of the comparison rests on first (a sweep cut short by the
    # deadline loses the last ones), the data sets interleaved
    cells = [(ds, cfg) for cfg in PRIORITY if cfg in configs for ds in datasets]
    for ds, cfg in cells:
        for lr in preset["start"]:
            for seed in range(sel):
                run(ds, cfg, lr, seed)
    while preset.get("bracket", True):
        todo = [(ds, cfg, lr) for ds, cfg in cells if (lr := next_rate(runs, ds, cfg, sel)) is not None]
        if not todo:
            break
        for ds, cfg, lr in todo:
            for seed in range(sel):
                if not run(ds, cfg, lr, seed):
                    break
        if deadline is not None and time.time() > deadline:
            break
    for seed in range(sel, preset["seeds"]):
        for ds, cfg in cells:
            lr = ablation.best_rate([r for r in runs if r["dataset"] == ds and r["config"] == cfg and r["seed"] < sel])
            run(ds, cfg, lr, seed)
    bar.close()
    return runs


def _nan_safe(o: object) -> object:
    return str(o)


def _jsonable(summary: dict) -> dict:
    return {"grid": [{"dataset": k[0], "config": k[1], "lr": k[2], **v} for k, v in summary["grid"].items()],
            "best": [{"dataset": k[0], "config": k[1], "lr": v} for k, v in summary["best"].items()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs, a reduced cost sweep")
    g.add_argument("--tiny", action="store_true", help="one digits run per configuration, no cost (for tests)")
    p.add_argument("--out", type=Path, default=HERE, help="where figures/, results.md, results.json go")
    p.add_argument("--deadline", default=None, help="UTC time HH:MM after which no new training run starts")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore runs recorded by an earlier (interrupted) run")
    p.add_argument("--report-only", action="store_true",
                   help="no new runs: rewrite the figures and results from the recorded runs (runs_/cost_<preset>.jsonl)")
    args = p.parse_args(argv)
    preset_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    datasets = list(preset["epochs"])
    t0 = time.perf_counter()
    deadline = None
    if args.deadline:
        hh, mm = (int(v) for v in args.deadline.split(":"))
        now = time.gmtime()
        deadline = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    runs: list[dict] = []
    summary: dict = {"grid": {}, "best": {}}
    times = {}
    if not args.skip_train:
        args.out.mkdir(parents=True, exist_ok=True)
        log = args.out / f"runs_{preset_name}.jsonl"
        if args.fresh and log.exists():
            log.unlink()
        if args.report_only:
            runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        else:
            runs = train_all(datasets, list(ablation.CONFIGS), preset, not args.no_progress, log, deadline)
        summary = ablation.summarize(runs, preset["select"])
        key = "training (Tab. 3 + Fig. 7), sum of the runs' own times" if args.report_only else \
            "training (Tab. 3 + Fig. 7)"
        times[key] = sum(r["train_seconds"] for r in runs) if args.report_only else time.perf_counter() - t0
    cost_rows: list[dict] = []
    if preset["cost"] and not args.skip_cost:
        t1 = time.perf_counter()
        batch, size, steps, warmup, quick = preset["cost"]
        cost_log = args.out / f"cost_{preset_name}.jsonl"
        if args.fresh and cost_log.exists():
            cost_log.unlink()
        cost_rows = cost.run(batch, size, steps, warmup, quick, not args.no_progress, cost_log, args.report_only)
        times["cost (Fig. 8)"] = time.perf_counter() - t1
    import figures

    paths = figures.write_all(args.out, runs, summary, cost_rows, datasets, preset["select"])
    times["total"] = time.perf_counter() - t0
    write_results(args.out, preset_name, preset, runs, summary, cost_rows, datasets, times, paths)
    print(f"wrote {args.out / 'results.md'} and {len(paths)} figures in {times['total']:.0f} s")
    return 0


def write_results(out: Path, preset_name: str, preset: dict, runs: list[dict], summary: dict, cost_rows: list[dict],
                  datasets: list[str], times: dict, paths: list[Path]) -> None:
    import figures

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sizes = {ds: common.load(ds).sizes() for ds in datasets} if runs else {}
    sel = preset["select"]
    lines = [f"# Paper experiments on real data ({preset_name} run)", "",
             f"Generated by `python benchmarks/paper/run_all.py{'' if preset_name == 'full' else ' --' + preset_name}` "
             f"on {date}; torch {torch.__version__}, {os.cpu_count()} CPU cores shared with other jobs "
             f"(load average at the end {os.getloadavg()[0]:.1f}), Python {platform.python_version()}.", "",
             "Run time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + ".", ""]
    if runs:
        dsz = "; ".join(f"{ds}: {s}" for ds, s in sizes.items())
        n_div = sum(r["diverged"] for r in runs)
        lines += ["## Setup", "",
                  f"Data: {dsz}. Epochs {preset['epochs']}, batch {preset['batch']}, SGD momentum 0.9, weight decay "
                  "1e-4 on every parameter, cosine decay to 0, one process of one thread. Learning rates: each "
                  f"configuration starts on {preset['start']} with seeds 0-{sel - 1}; while its best rate (mean "
                  "validation accuracy; a rate with a diverged seed ranks below every rate without) is at an edge "
                  f"of its grid, the next rate of the ladder {list(LADDER)} beyond it is added; then seeds "
                  f"{sel}-{preset['seeds'] - 1} run at the chosen rate (as far as the time budget allowed: the "
                  "seeds column says how many). Diverged = a non-finite loss or test accuracy < 0.2 (chance 0.1). "
                  f"{len(runs)} runs recorded, {n_div} diverged.", "",
                  "## Tab. 3: linear scaling and post-BN", "",
                  "Test accuracy at each configuration's chosen rate (mean ± std over its seeds); `bracketed`: a "
                  "tried rate on each side of the chosen one.", ""]
        lines += figures.tab3_markdown(summary, runs, datasets, sel)
        lines += ["", "## Paired differences", "",
                  "Per seed (same seed: same data order, same initialisation of the shared layers where the "
                  "configurations share them), test accuracy of the configuration minus its control, each at its "
                  "own chosen rate; a diverged run counts as chance (10%). 95% CI: two-sided t interval of the "
                  "mean difference.", ""]
        lines += figures.paired_markdown(summary, runs, datasets)
        mism = sum(r.get("deployed_pred_mismatches", 0) for r in runs)
        errs = [r["deployed_max_rel_logit_err"] for r in runs if "deployed_max_rel_logit_err" in r]
        lines += ["", f"Deploy check: {len(errs)} of {len(runs)} runs deployed (the others had a non-finite loss), "
                  f"{mism} test predictions differ between trained and deployed, largest relative logit difference "
                  f"{max(errs) if errs else float('nan'):.1e}.", "",
                  "![paired differences](figures/paired_differences.png)", "",
                  "## Learning-rate grid", ""]
        lines += figures.grid_markdown(runs, summary, datasets, sel)
        lines += ["", "![grid](figures/tab3_lr_grid.png)", "", "![loss curves](figures/loss_curves.png)", "",
                  "## Fig. 7: how differently the branches are updated", "",
                  f"Each online block's branches as equivalent kernels (scale included), at initialisation W_0 and "
                  f"after training W_T; cosine similarity of the updates W_T - W_0, mean over the four blocks and "
                  f"the seeds, every configuration at lr {figures.FIG7_LR}. Branch order: origin, 1x1>avg, prior, "
                  "1x1>kxk, 1x1, dw>pw. With fixed scales the prior branch's scale stays 0: its update is zero "
                  "(no direction).", ""]
        lines += figures.fig7_markdown(runs, datasets)
        lines += ["", "![Fig. 7](figures/fig7_update_similarity.png)", ""]
    if cost_rows:
        b = cost_rows[0]
        lines += ["## Fig. 8: cost as the block gains branches", "",
                  f"ResNet-18, batch {b['batch']} at {b['size']}x{b['size']}, {b['threads']} threads; every 3x3 conv "
                  "gets the block (declared with `BlockConfig`; see `cost.py`), each row its own process, median of "
                  f"{len(b['times_s'])} steps. RSS high-water: `getrusage(RUSAGE_SELF).ru_maxrss` after the steps; "
                  "RSS before steps: `psutil` before the first step; allocator peak: torch's CPU allocator over one "
                  "step (profiler events).", ""]
        lines += figures.fig8_markdown(cost_rows)
        lines += ["", "![Fig. 8](figures/fig8_cost.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"date": date, "preset": preset_name, "times_s": times, "runs": runs, "summary": _jsonable(summary),
         "cost": cost_rows}, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))


if __name__ == "__main__":
    sys.exit(main())

"""The figures and the results tables of the paper experiments (matplotlib, Agg).

Everything here is computed from the recorded runs (``runs_full.jsonl``, ``cost_full.jsonl``):

* Tab. 3: each configuration at its best learning rate (chosen on validation accuracy
  with the selection seeds), test accuracy mean ± std over the seeds run there;
* paired differences: per seed, configuration minus its control (``ablation.CONTROL``)
  at their own best rates, with a two-sided 95% t interval of the mean difference;
* the learning-rate grid (validation accuracy per rate, the selection seeds) and whether
  the chosen rate is bracketed (a tried rate on each side);
* loss curves (mean training loss per epoch) at each configuration's best rate;
* Fig. 7: cosine similarity of the branches' updates ``W_T - W_0`` (equivalent kernels,
  scale included) at one learning rate shared by every online configuration;
* Fig. 8: the recorded cost rows.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from ablation import CONFIGS, CONTROL, ONLINE  # noqa: E402
from cost import STAGES  # noqa: E402

BRANCHES = ("origin", "1x1>avg", "prior", "1x1>kxk", "1x1", "dw>pw")
LABELS = {"plain": "plain", "plain_no_bn": "plain no BN", "orepa_vector": "OREPA vector",
          "orepa_scalar": "OREPA scalar", "orepa_fixed": "OREPA fixed scales", "orepa_none": "OREPA no scales",
          "orepa_no_postbn": "OREPA no post-BN", "dbb_offline": "DBB offline"}
#: the learning rate at which Fig. 7 compares the online configurations (in every start grid)
FIG7_LR = 0.1


def _cell(runs: list[dict], ds: str, cfg: str, lr: float | None) -> list[dict]:
    return sorted((r for r in runs if r["dataset"] == ds and r["config"] == cfg and r["lr"] == lr),
                  key=lambda r: r["seed"])


def paired(runs: list[dict], best: dict, ds: str, cfg: str, control: str) -> dict[str, Any] | None:
    """Per-seed test-accuracy differences ``cfg - control`` (each at its best rate), a
    diverged run counting with its accuracy (NaN -> chance 0.1); mean, two-sided 95% t
    interval, wins/losses."""
    a = {r["seed"]: r for r in _cell(runs, ds, cfg, best.get((ds, cfg)))}
    b = {r["seed"]: r for r in _cell(runs, ds, control, best.get((ds, control)))}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None

    def acc(r: dict) -> float:
        return 0.1 if math.isnan(r["test_acc"]) else r["test_acc"]

    d = np.array([acc(a[s]) - acc(b[s]) for s in seeds])
    mean = float(d.mean())
    if len(d) > 1 and d.std(ddof=1) > 0:
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    else:
        half = float("nan")
    return {"seeds": seeds, "diffs": d.tolist(), "mean": mean, "lo": mean - half, "hi": mean + half,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def bracketed(runs: list[dict], best: dict, ds: str, cfg: str, select: int) -> bool:
    lr = best.get((ds, cfg))
    tried = sorted({r["lr"] for r in runs if r["dataset"] == ds and r["config"] == cfg and r["seed"] < select})
    return lr is not None and tried[0] < lr < tried[-1]


def _pm(v: tuple[float, float]) -> str:
    m, s = v
    return "n/a" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


def _ms(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# -- Tab. 3 ----------------------------------------------------------------------------------


def tab3_markdown(summary: dict, runs: list[dict], datasets: list[str], select: int) -> list[str]:
    best = summary["best"]
    out = ["| data | configuration | best lr (bracketed) | seeds | epochs | final train loss | train acc % | "
           "test acc % | diverged at best lr | deployed = trained |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ds in datasets:
        for cfg in CONFIGS:
            lr = best.get((ds, cfg))
            rs = _cell(runs, ds, cfg, lr)
            if not rs:
                continue
            loss = _ms([r["losses"][-1] if r["losses"] else float("nan") for r in rs])
            ok = sum(r.get("deploy") == "ok" and r.get("deployed_equal_acc", False) for r in rs)
            out.append(f"| {ds} | {LABELS[cfg]} | {lr} ({'yes' if bracketed(runs, best, ds, cfg, select) else 'no'})"
                       f" | {len(rs)} | {rs[0]['epochs']} | {loss[0]:.3f} | "
                       f"{_pm(_ms([r['train_acc'] for r in rs]))} | {_pm(_ms([r['test_acc'] for r in rs]))} | "
                       f"{sum(r['diverged'] for r in rs)}/{len(rs)} | {ok}/{len(rs)} |")
    return out


def paired_markdown(summary: dict, runs: list[dict], datasets: list[str]) -> list[str]:
    out = ["| data | configuration | minus | seeds | mean difference (points) | 95% CI | better / worse |",
           "|---|---|---|---|---|---|---|"]
    for ds in datasets:
        for cfg, control in CONTROL.items():
            p = paired(runs, summary["best"], ds, cfg, control)
            if p is None:
                continue
            ci = "n/a" if math.isnan(p["lo"]) else f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]"
            out.append(f"| {ds} | {LABELS[cfg]} | {LABELS[control]} | {len(p['seeds'])} | {100 * p['mean']:+.1f} | "
                       f"{ci} | {p['wins']} / {p['losses']} |")
    return out


def grid_markdown(runs: list[dict], summary: dict, datasets: list[str], select: int) -> list[str]:
    lrs = sorted({r["lr"] for r in runs})
    out = [f"Validation accuracy % (mean over the {select} selection seeds; `d`: a diverged run) per learning "
           "rate; **bold**: the chosen rate.", "",
           "| data | configuration | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for ds in datasets:
        for cfg in CONFIGS:
            cells = []
            for lr in lrs:
                rs = [r for r in _cell(runs, ds, cfg, lr) if r["seed"] < select]
                if not rs:
                    cells.append("")
                    continue
                v = _ms([r["val_acc"] for r in rs])[0]
                txt = ("n/a" if math.isnan(v) else f"{100 * v:.1f}") + ("d" * sum(r["diverged"] for r in rs))
                cells.append(f"**{txt}**" if summary["best"].get((ds, cfg)) == lr else txt)
            out.append(f"| {ds} | {LABELS[cfg]} | " + " | ".join(cells) + " |")
    return out


def fig_grid(runs: list[dict], summary: dict, datasets: list[str], select: int, path: Path) -> None:
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for i, cfg in enumerate(CONFIGS):
            lrs = sorted({r["lr"] for r in runs if r["dataset"] == ds and r["config"] == cfg and r["seed"] < select})
            if not lrs:
                continue
            ys = [_ms([r["val_acc"] for r in _cell(runs, ds, cfg, lr) if r["seed"] < select])[0] for lr in lrs]
            ax.plot(lrs, [100 * (0.1 if math.isnan(y) else y) for y in ys], "-o", ms=3, color=f"C{i}",
                    label=LABELS[cfg])
            b = summary["best"].get((ds, cfg))
            if b in lrs:
                y = ys[lrs.index(b)]
                ax.plot([b], [100 * y], "*", ms=12, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation accuracy % (selection seeds)")
        ax.set_title(ds)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
    fig.suptitle("Learning-rate grid per configuration (star: chosen rate; a diverged run counts as 10%)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_losses(runs: list[dict], summary: dict, datasets: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for i, cfg in enumerate(CONFIGS):
            rs = [r for r in _cell(runs, ds, cfg, summary["best"].get((ds, cfg))) if r["losses"]]
            if not rs:
                continue
            n = min(len(r["losses"]) for r in rs)
            curves = np.array([r["losses"][:n] for r in rs])
            ax.plot(range(1, n + 1), curves.mean(0), color=f"C{i}",
                    label=f"{LABELS[cfg]} (lr {summary['best'][(ds, cfg)]:g})")
            ax.fill_between(range(1, n + 1), curves.min(0), curves.max(0), color=f"C{i}", alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss (band: min-max over seeds)")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.suptitle("Training loss at each configuration's chosen learning rate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_paired(runs: list[dict], summary: dict, datasets: list[str], path: Path) -> None:
    cfgs = list(CONTROL)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for i, cfg in enumerate(cfgs):
            p = paired(runs, summary["best"], ds, cfg, CONTROL[cfg])
            if p is None:
                continue
            ax.plot([i] * len(p["diffs"]), 100 * np.array(p["diffs"]), "o", ms=4, alpha=0.6, color="C0")
            if not math.isnan(p["lo"]):
                ax.errorbar([i + 0.15], [100 * p["mean"]], yerr=[[100 * (p["mean"] - p["lo"])],
                                                                  [100 * (p["hi"] - p["mean"])]],
                            fmt="s", color="C3", capsize=4)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(cfgs)), [f"{LABELS[c]}\n- {LABELS[CONTROL[c]]}" for c in cfgs], fontsize=6,
                      rotation=30)
        ax.set_ylabel("test accuracy difference (points)")
        ax.set_title(ds)
    fig.suptitle("Paired per-seed differences against the control (dots: seeds; red: mean and 95% t interval)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- Fig. 7 ----------------------------------------------------------------------------------


def update_matrix(rs: list[dict]) -> np.ndarray | None:
    """Mean (over blocks, then seeds) cosine matrix of the branches' updates."""
    mats = []
    for r in rs:
        us = r.get("update_similarity")
        if not us:
            continue
        mats.append(np.nanmean(np.stack([np.array(v["cos"], dtype=float) for v in us.values()]), 0))
    return np.nanmean(np.stack(mats), 0) if mats else None


def _off(m: np.ndarray) -> float:
    return float(np.nanmean(m[~np.eye(len(m), dtype=bool)]))


def fig7(runs: list[dict], datasets: list[str], path: Path) -> None:
    fig, axes = plt.subplots(len(datasets), len(ONLINE), figsize=(3.1 * len(ONLINE), 3.1 * len(datasets)),
                             squeeze=False)
    for row, ds in enumerate(datasets):
        for col, cfg in enumerate(ONLINE):
            ax = axes[row, col]
            m = update_matrix(_cell(runs, ds, cfg, FIG7_LR))
            if m is None:
                ax.axis("off")
                continue
            ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
            for i in range(len(m)):
                for j in range(len(m)):
                    if not math.isnan(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5)
            ax.set_xticks(range(len(m)), BRANCHES[:len(m)], rotation=60, fontsize=6)
            ax.set_yticks(range(len(m)), BRANCHES[:len(m)], fontsize=6)
            ax.set_title(f"{ds}: {LABELS[cfg]}\nmean off-diag. {_off(m):.2f}", fontsize=7)
    fig.suptitle(f"Fig. 7: cosine similarity of the branches' updates W_T - W_0 (equivalent kernels, scale "
                 f"included), lr {FIG7_LR} for every configuration; mean over blocks and seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig7_markdown(runs: list[dict], datasets: list[str]) -> list[str]:
    out = [f"| data | configuration | seeds (lr {FIG7_LR}) | mean off-diag. cosine of updates | origin vs 1x1 | "
           "origin vs 1x1>kxk | mean off-diag. cosine of final kernels |", "|---|---|---|---|---|---|---|"]
    for ds in datasets:
        for cfg in ONLINE:
            rs = [r for r in _cell(runs, ds, cfg, FIG7_LR) if r.get("update_similarity")]
            m = update_matrix(rs)
            if m is None:
                continue
            final = [np.nanmean([_off(np.array(v, dtype=float)) for v in r["similarity"].values()]) for r in rs]
            out.append(f"| {ds} | {LABELS[cfg]} | {len(rs)} | {_off(m):.3f} | {m[0, 4]:.3f} | {m[0, 3]:.3f} | "
                       f"{np.mean(final):.3f} |")
    return out


# -- Fig. 8 ----------------------------------------------------------------------------------


def fig8(rows: list[dict], path: Path) -> None:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    stages = [s for s in STAGES if any(r["form"] == s for r in rows)]
    for mode, style, color in (("online", "-o", "C0"), ("offline", "-s", "C1")):
        pts = [next((r for r in rows if r["form"] == s and r["mode"] == mode), None) for s in stages]
        xs = [i for i, p in enumerate(pts) if p]
        ax_t.plot(xs, [pts[i]["time_s"] for i in xs], style, color=color, label=f"{mode} (declared blocks)")
        ax_m.plot(xs, [pts[i]["rss_peak_mb"] for i in xs], style, color=color, label=f"{mode}: RSS high-water")
        ax_m.plot(xs, [pts[i]["alloc_peak_mb"] for i in xs], style.replace("-", ":"), color=color, alpha=0.6,
                  label=f"{mode}: allocator peak / step")
    refs = {(r["form"], r["mode"]): r for r in rows if r["form"] in ("plain", "builtin")}
    for (form, mode), r in refs.items():
        name = "plain" if form == "plain" else f"built-in orepa {mode}"
        ax_t.axhline(r["time_s"], ls="--", lw=0.8, color="gray" if form == "plain" else ("C2" if mode == "online" else "C3"))
        ax_t.annotate(name, (0, r["time_s"]), fontsize=7, va="bottom")
        ax_m.axhline(r["rss_peak_mb"], ls="--", lw=0.8, color="gray" if form == "plain" else ("C2" if mode == "online" else "C3"))
        ax_m.annotate(name, (0, r["rss_peak_mb"]), fontsize=7, va="bottom")
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(stages)), stages)
        ax.set_xlabel("branches of the block (cumulative)")
        ax.legend(fontsize=7)
    b = rows[0]
    ax_t.set_ylabel("seconds per SGD step (median)")
    ax_m.set_ylabel("MB")
    ax_t.set_title(f"ResNet-18, batch {b['batch']} at {b['size']}x{b['size']}, CPU", fontsize=9)
    ax_m.set_title("peak memory per process", fontsize=9)
    fig.suptitle("Fig. 8: training cost as the OREPA block gains branches, online vs offline", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig8_markdown(rows: list[dict]) -> list[str]:
    out = ["| block | mode | 3x3 blocks | params | time / step (s) | RSS high-water (MB) | RSS before steps (MB) | "
           "allocator peak / step (MB) | load avg. before |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['form']} | {r['mode']} | {r['blocks']} | {r['params'] / 1e6:.2f} M | {r['time_s']:.3f} | "
                   f"{r['rss_peak_mb']:.0f} | {r['rss_base_mb']:.0f} | {r['alloc_peak_mb']:.0f} | {r['load_before']:.1f} |")
    return out


def write_all(out_dir: Path, runs: list[dict], summary: dict[str, Any], cost_rows: list[dict],
              datasets: list[str], select: int) -> list[Path]:
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if runs:
        names = ("tab3_lr_grid.png", "loss_curves.png", "paired_differences.png", "fig7_update_similarity.png")
        paths += [fig_dir / n for n in names]
        fig_grid(runs, summary, datasets, select, paths[0])
        fig_losses(runs, summary, datasets, paths[1])
        fig_paired(runs, summary, datasets, paths[2])
        fig7(runs, datasets, paths[3])
    if cost_rows:
        paths.append(fig_dir / "fig8_cost.png")
        fig8(cost_rows, paths[-1])
    return paths

"""The figures and the results tables of the paper experiments (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ablation import CONFIGS, ONLINE  # noqa: E402
from cost import STAGES  # noqa: E402

BRANCHES = ("origin", "1x1>avg", "prior", "1x1>kxk", "1x1", "dw>pw")
LABELS = {"plain": "plain", "orepa_vector": "OREPA vector", "orepa_scalar": "OREPA scalar",
          "orepa_none": "OREPA none", "orepa_no_postbn": "OREPA no post-BN", "dbb_offline": "DBB offline"}


def _best_runs(runs: list[dict], best: dict, ds: str, cfg: str) -> list[dict]:
    lr = best.get((ds, cfg))
    return [r for r in runs if r["dataset"] == ds and r["config"] == cfg and r["lr"] == lr]


def similarity_block(runs: list[dict]) -> str | None:
    """The block shown in the heatmaps: the third of the online blocks (a 3x3, stride 1)."""
    for r in runs:
        if r.get("similarity"):
            names = list(r["similarity"])
            return names[min(2, len(names) - 1)]
    return None


def mean_similarity(rs: list[dict], block: str) -> np.ndarray | None:
    mats = [np.array(r["similarity"][block], dtype=float) for r in rs if r.get("similarity")]
    return np.nanmean(np.stack(mats), 0) if mats else None


def curve(rs: list[dict]) -> np.ndarray:
    """Mean (over blocks, then seeds) off-diagonal similarity per epoch."""
    rows = []
    for r in rs:
        if r["sim_curve"] and r["nonfinite_at_epoch"] is None:
            rows.append([np.nanmean(list(d.values())) for d in r["sim_curve"]])
    if not rows:
        return np.array([])
    n = min(len(x) for x in rows)
    return np.nanmean(np.array([x[:n] for x in rows]), 0)


def fig7(runs: list[dict], best: dict, datasets: list[str], path: Path) -> None:
    fig, axes = plt.subplots(len(datasets), len(ONLINE) + 1, figsize=(3.2 * (len(ONLINE) + 1), 3.1 * len(datasets)),
                             squeeze=False)
    for row, ds in enumerate(datasets):
        block = similarity_block([r for r in runs if r["dataset"] == ds])
        for col, cfg in enumerate(ONLINE):
            ax = axes[row, col]
            rs = _best_runs(runs, best, ds, cfg)
            m = mean_similarity(rs, block) if block else None
            if m is None:
                ax.set_axis_off()
                ax.set_title(f"{LABELS[cfg]}: diverged", fontsize=9)
                continue
            im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
            for i in range(len(m)):
                for j in range(len(m)):
                    if not math.isnan(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(m)), BRANCHES[:len(m)], rotation=90, fontsize=7)
            ax.set_yticks(range(len(m)), BRANCHES[:len(m)], fontsize=7)
            ax.set_title(f"{ds}: {LABELS[cfg]}\n{block}, lr {best.get((ds, cfg))}", fontsize=8)
        fig.colorbar(im, ax=axes[row, len(ONLINE) - 1], fraction=0.046)
        ax = axes[row, -1]
        for cfg in ONLINE:
            c = curve(_best_runs(runs, best, ds, cfg))
            if len(c):
                ax.plot(range(len(c)), c, marker="o", ms=3, label=LABELS[cfg])
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean off-diagonal cosine")
        ax.set_title(f"{ds}: all blocks, mean over seeds", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("Fig. 7: cosine similarity of the branches' equivalent kernels (with their scales)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tab3(summary: dict, datasets: list[str], lrs: list[float], path: Path) -> None:
    grid, best = summary["grid"], summary["best"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for cfg in CONFIGS:
            xs, ms, ss, div = [], [], [], []
            for lr in lrs:
                row = grid.get((ds, cfg, lr))
                if row is None:
                    continue
                xs.append(lr)
                ms.append(row["test_acc"][0])
                ss.append(row["test_acc"][1])
                div.append(row["diverged"])
            line = ax.errorbar(xs, ms, yerr=ss, marker="o", ms=4, capsize=2, label=LABELS[cfg])
            for x, m, d in zip(xs, ms, div):
                if d:
                    ax.annotate(f"{d} div", (x, m if not math.isnan(m) else 0.1), fontsize=6, color=line[0].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (SGD, momentum 0.9)")
        ax.set_ylabel("test accuracy (mean, std over seeds)")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.suptitle("Tab. 3: scaling / post-BN ablation, the whole learning-rate grid", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def _pm(v: tuple[float, float], pct: bool = True) -> str:
    m, s = v
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def tab3_markdown(summary: dict, runs: list[dict], datasets: list[str], lrs: list[float]) -> list[str]:
    grid, best = summary["grid"], summary["best"]
    out = ["| data | configuration | best lr | train acc % | test acc % | diverged | deployed = trained |",
           "|---|---|---|---|---|---|---|"]
    for ds in datasets:
        for cfg in CONFIGS:
            lr = best.get((ds, cfg))
            if lr is None:
                continue
            row = grid[(ds, cfg, lr)]
            out.append(f"| {ds} | {LABELS[cfg]} | {lr} | {_pm(row['train_acc'])} | {_pm(row['test_acc'])} | "
                       f"{row['diverged']}/{row['n']} | {row['deploy_ok']}/{row['n']} |")
    out += ["", "The whole grid, test accuracy % (mean ± std over seeds; `[k div]`: k runs diverged):", "",
            "| data | configuration | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
            "|---|---|" + "---|" * len(lrs)]
    for ds in datasets:
        for cfg in CONFIGS:
            cells = []
            for lr in lrs:
                row = grid.get((ds, cfg, lr))
                if row is None:
                    cells.append("")
                    continue
                d = f" [{row['diverged']} div]" if row["diverged"] else ""
                star = "**" if best.get((ds, cfg)) == lr else ""
                cells.append(f"{star}{_pm(row['test_acc'])}{star}{d}")
            out.append(f"| {ds} | {LABELS[cfg]} | " + " | ".join(cells) + " |")
    return out


def fig7_markdown(runs: list[dict], best: dict, datasets: list[str]) -> list[str]:
    out = ["| data | configuration | lr | mean off-diag. cosine at init | at the end | mean abs. cosine at the end |",
           "|---|---|---|---|---|---|"]
    for ds in datasets:
        for cfg in ONLINE:
            rs = _best_runs(runs, best, ds, cfg)
            c = curve(rs)
            absolute = [np.nanmean([np.nanmean(np.abs(np.array(m, dtype=float))[~np.eye(len(m), dtype=bool)])
                                    for m in r["similarity"].values()]) for r in rs if r.get("similarity")]
            if not len(c):
                out.append(f"| {ds} | {LABELS[cfg]} | {best.get((ds, cfg))} | n/a | diverged | |")
                continue
            out.append(f"| {ds} | {LABELS[cfg]} | {best.get((ds, cfg))} | {c[0]:.3f} | {c[-1]:.3f} | "
                       f"{np.mean(absolute):.3f} |")
    return out


def fig8_markdown(rows: list[dict]) -> list[str]:
    out = ["| block | mode | 3x3 blocks | params | time / step (s) | RSS high-water (MB) | RSS before steps (MB) | "
           "allocator peak / step (MB) | load avg. before |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['form']} | {r['mode']} | {r['blocks']} | {r['params'] / 1e6:.2f} M | {r['time_s']:.3f} | "
                   f"{r['rss_peak_mb']:.0f} | {r['rss_base_mb']:.0f} | {r['alloc_peak_mb']:.0f} | {r['load_before']:.1f} |")
    return out


def write_all(out_dir: Path, runs: list[dict], summary: dict[str, Any], cost_rows: list[dict],
              datasets: list[str], lrs: list[float]) -> list[Path]:
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if runs:
        paths += [fig_dir / "fig7_branch_similarity.png", fig_dir / "tab3_lr_grid.png"]
        fig7(runs, summary["best"], datasets, paths[-2])
        tab3(summary, datasets, lrs, paths[-1])
    if cost_rows:
        paths.append(fig_dir / "fig8_cost.png")
        fig8(cost_rows, paths[-1])
    return paths

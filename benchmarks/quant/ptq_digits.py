"""Does a re-parameterized model survive INT8 post-training quantization? (issue 19)

The small CNN of ``benchmarks/paper/common.py`` (four conv3-BN-ReLU layers, a linear
head) on scikit-learn's digits (and MNIST-1D with ``--datasets digits mnist1d``),
trained four ways with the paper harness's training run (``ablation.train_run``: SGD
momentum 0.9, weight decay 1e-4, cosine decay, one CPU thread):

=============  ============================================================
``plain``      the CNN as is (conv + BN)
``repvgg``     ``rc.orepa_transform(model, block="repvgg")`` (kxk + 1x1 + identity)
``orepa``      ``rc.orepa_transform(model)`` (the default OREPA blocks)
``qarepvgg``   ``rc.orepa_transform(model, block="qarepvgg")``
=============  ============================================================

Each configuration is trained at every learning rate of the grid with several seeds;
the rate is chosen per configuration by mean validation accuracy. The models trained at
that rate are deployed (``rc.deploy``: plain convs), exported to ONNX and quantized by
onnxruntime's static quantization (``rc.quant.quantize_onnx``: QDQ, INT8 weights per
tensor and per channel, QUInt8 activations, MinMax calibration on 256 training images),
and the test accuracy of the float and INT8 ONNX models is measured with onnxruntime.
``rc.quant_report`` (simulated symmetric INT8) gives each deployed model's per-layer
weight channel range ratios (largest / median output-channel range), weight SQNRs and
flags.

Usage::

    python benchmarks/quant/ptq_digits.py --datasets digits mnist1d   # the recorded results (~10 min)
    python benchmarks/quant/ptq_digits.py                   # digits only
    python benchmarks/quant/ptq_digits.py --report-only     # rewrite results.md from results.json
    python benchmarks/quant/ptq_digits.py --tiny --out /tmp/q   # the smoke test (tests/)

Writes ``results.json`` and ``results.md`` to ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for p in (ROOT, ROOT / "benchmarks" / "paper"):  # this repository's repcompiler and the paper harness
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import ablation  # noqa: E402
import common  # noqa: E402

import repcompiler as rc  # noqa: E402
from repcompiler.quant import evaluate, quant_report, quantize_onnx  # noqa: E402

__all__ = ["CONFIGS", "PRESETS", "build", "run", "write_results", "main"]

log = logging.getLogger("ptq_digits")

CONFIGS = ("plain", "repvgg", "orepa", "qarepvgg")
LABELS = {"plain": "plain", "repvgg": "RepVGG", "orepa": "OREPA", "qarepvgg": "QARepVGG"}
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(seeds=3, lrs=[0.02, 0.1, 0.3, 0.6], epochs={"digits": 6, "mnist1d": 4}, batch=128, calib=256,
                 subset=None, exporter=None),
    "tiny": dict(seeds=1, lrs=[0.1], epochs={"digits": 2, "mnist1d": 1}, batch=32, calib=32, subset=192,
                 exporter="torchscript"),
}


def build(config: str, dataset: str) -> nn.Module:
    """The training-form model of ``config`` (one of :data:`CONFIGS`) for ``dataset``."""
    model = common.make_model(dataset)
    if config == "plain":
        return model
    if config in ("repvgg", "orepa", "qarepvgg"):
        return rc.orepa_transform(model, block=config, inplace=True)
    raise ValueError(f"unknown configuration {config!r}; known: {CONFIGS}")


def _subset(data: common.Split, n: int | None) -> common.Split:
    if n is None:
        return data
    return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n], x_val=data.x_val[:n],
                               y_val=data.y_val[:n], x_test=data.x_test[:n], y_test=data.y_test[:n])


def _layer(row: Any) -> dict[str, Any]:
    return {"name": row.name, "channel_range_ratio": row.channel_range_ratio,
            "sqnr_per_tensor_db": row.sqnr_per_tensor_db, "sqnr_per_channel_db": row.sqnr_per_channel_db,
            "act_channel_range_ratio": row.act_channel_range_ratio, "flags": list(row.flags)}


def quantize_run(model: nn.Module, data: common.Split, calib: int, work: Path, tag: str,
                 exporter: str | None = None) -> dict[str, Any]:
    """Deploy ``model``, quantize it per tensor and per channel, and measure float and
    INT8 test accuracy (onnxruntime) and its quant_report."""
    model.eval()
    deployed = rc.deploy(model, data.x_test[:16])
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    x_cal = data.x_train[perm[:calib]]
    with torch.no_grad():
        ref = deployed(data.x_test)
    out: dict[str, Any] = {"torch_float_acc": (ref.argmax(1) == data.y_test).float().mean().item()}
    float_path = None
    for per_channel in (False, True):
        q = quantize_onnx(float_path or deployed, x_cal, work / f"{tag}_{'pc' if per_channel else 'pt'}.onnx",
                          per_channel=per_channel, batch_size=64, export_options={"onnx_exporter": exporter})
        float_path = q.float_path
        ev = evaluate(q.path, data.x_test, data.y_test, reference=ref, threads=1)
        key = "int8_per_channel" if per_channel else "int8_per_tensor"
        out[key] = {"acc": ev.accuracy, "agreement": ev.agreement, "max_rel_error": ev.max_rel_error,
                    "reduce_range": q.reduce_range, "quantize_linear": q.op_counts.get("QuantizeLinear", 0)}
    fl = evaluate(float_path, data.x_test, data.y_test, reference=ref, threads=1)
    out["onnx_float_acc"] = fl.accuracy
    rep = quant_report(deployed, [x_cal[i:i + 64] for i in range(0, len(x_cal), 64)])
    out["report"] = {"end_to_end": rep.end_to_end, "layers": [_layer(r) for r in rep.rows],
                     "worst": [_layer(r) for r in rep.worst(2)], "flagged": [r.name for r in rep.flagged]}
    return out


def run(datasets: list[str], preset: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Train the grid, pick each configuration's rate, quantize its models; every run's record."""
    runs: list[dict[str, Any]] = []
    for ds in datasets:
        data = _subset(common.load(ds), preset["subset"])
        models: dict[tuple[str, float, int], nn.Module] = {}
        for cfg in CONFIGS:
            for lr in preset["lrs"]:
                for seed in range(preset["seeds"]):
                    held: list[nn.Module] = []

                    def make(config: str, dataset: str) -> nn.Module:
                        held.append(build(config, dataset))
                        return held[0]

                    r = ablation.train_run(data, cfg, lr, seed, preset["epochs"][ds], preset["batch"], make=make)
                    r.pop("sim_curve", None)
                    models[(cfg, lr, seed)] = held[0]
                    runs.append(r)
                    log.info("%s %s lr=%g seed=%d: test %.3f (%.1f s)", ds, cfg, lr, seed, r["test_acc"],
                             r["train_seconds"])
        best = ablation.summarize([r for r in runs if r["dataset"] == ds])["best"]
        for r in runs:
            if r["dataset"] != ds or r["lr"] != best[(ds, r["config"])] or r["nonfinite_at_epoch"] is not None:
                continue
            t0 = time.perf_counter()
            r["quant"] = quantize_run(models[(r["config"], r["lr"], r["seed"])], data, preset["calib"], work,
                                      f"{ds}_{r['config']}_{r['seed']}", preset["exporter"])
            r["quant"]["seconds"] = time.perf_counter() - t0
            q = r["quant"]
            log.info("%s %s seed %d: float %.3f, int8 per tensor %.3f, per channel %.3f", ds, r["config"],
                     r["seed"], q["torch_float_acc"], q["int8_per_tensor"]["acc"], q["int8_per_channel"]["acc"])
    return runs


def _ms(values: list[float], pct: bool = True) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    f = 100.0 if pct else 1.0
    sd = statistics.stdev(vals) * f if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals) * f:.1f} ± {sd:.1f}" if pct else f"{statistics.fmean(vals):.3g} ± {sd:.2g}"


def _flag_counts(qs: list[dict[str, Any]]) -> dict[str, int]:
    """``"layer: reason"`` (the reason up to its parenthesised numbers) -> seeds it fired in."""
    counts: dict[str, int] = {}
    for q in qs:
        for key in {f"{layer['name']}: {f.split(' (')[0]}" for layer in q["report"]["layers"] for f in layer["flags"]}:
            counts[key] = counts.get(key, 0) + 1
    return counts


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (data set, configuration), over the quantized seeds: accuracies and the
    per-layer weight channel range ratios (mean over seeds)."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if "quant" in r:
            cells.setdefault((r["dataset"], r["config"]), []).append(r)
    out = {}
    for (ds, cfg), rs in cells.items():
        qs = [r["quant"] for r in rs]
        names = [layer["name"] for layer in qs[0]["report"]["layers"]]
        ratios = {n: statistics.fmean(q["report"]["layers"][i]["channel_range_ratio"] for q in qs)
                  for i, n in enumerate(names)}
        sqnr = {n: statistics.fmean(q["report"]["layers"][i]["sqnr_per_tensor_db"] for q in qs)
                for i, n in enumerate(names)}
        out[f"{ds}/{cfg}"] = {
            "dataset": ds, "config": cfg, "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs],
            "float": [q["torch_float_acc"] for q in qs], "onnx_float": [q["onnx_float_acc"] for q in qs],
            "int8_per_tensor": [q["int8_per_tensor"]["acc"] for q in qs],
            "int8_per_channel": [q["int8_per_channel"]["acc"] for q in qs],
            "agree_per_tensor": [q["int8_per_tensor"]["agreement"] for q in qs],
            "agree_per_channel": [q["int8_per_channel"]["agreement"] for q in qs],
            "channel_range_ratio": ratios, "sqnr_per_tensor_db": sqnr,
            "worst": [q["report"]["worst"][0] for q in qs],
            "sim_rel_l2_per_tensor": [q["report"]["end_to_end"]["per_tensor"]["rel_l2"] for q in qs],
            "sim_rel_l2_per_channel": [q["report"]["end_to_end"]["per_channel"]["rel_l2"] for q in qs],
            "flags": _flag_counts(qs),
        }
    return out


def write_results(out_dir: Path, preset_name: str, preset: dict[str, Any], runs: list[dict[str, Any]],
                  summary: dict[str, Any], seconds: float) -> tuple[Path, Path]:
    """``results.json`` (every run and the summary) and ``results.md`` (the tables)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"preset": preset_name, "settings": {k: v for k, v in preset.items()}, "seconds": seconds,
            "torch": torch.__version__, "machine": platform.machine(), "vnni": rc.quant.cpu_has_vnni()}
    jpath = out_dir / "results.json"
    jpath.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1, default=str))
    differ = [k for k, s in summary.items() if s["onnx_float"] != s["float"]]
    same = ("the float ONNX model has the same test accuracy in every run" if not differ
            else "the float ONNX model's accuracy differs for " + ", ".join(differ))
    lines = [
        f"# INT8 post-training quantization of re-parameterized models ({preset_name} preset)", "",
        f"Generated by `benchmarks/quant/ptq_digits.py` in {seconds / 60:.1f} min (torch {torch.__version__}, "
        f"onnxruntime static QDQ, MinMax calibration on {preset['calib']} training images, QUInt8 activations, "
        f"QInt8 weights{', 7-bit (reduce_range: this CPU has no VNNI)' if meta['vnni'] is False else ''}). "
        f"Seeds {preset['seeds']}, learning rates {preset['lrs']} (best by mean validation accuracy), "
        f"epochs {preset['epochs']}. Test accuracy in %, mean ± std over seeds; float = the deployed model "
        f"(torch; {same}), INT8 = onnxruntime on the quantized ONNX model.", "",
        "Simulated error: `rc.quant_report`'s end-to-end relative L2 output error of symmetric INT8 "
        "(weights and activations fake-quantized) on the calibration images, per tensor / per channel. Worst "
        "layer: `quant_report(...).worst(1)` of each seed's deployed model (weight channel range ratio, per-tensor "
        "weight SQNR in dB). Flags: quant_report's reasons, with the number of seeds they fired in.", "",
        "| data | model | lr | float | INT8 per tensor | INT8 per channel | argmax = float (per tensor) | simulated "
        "error % (per tensor / per channel) | worst layer per seed | flags |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary.values():
        worst = "; ".join(f"`{x['name']}` {x['channel_range_ratio']:.1f}, {x['sqnr_per_tensor_db']:.0f}"
                          for x in s["worst"])
        flags = "; ".join(f"{k} ({n}/{len(s['seeds'])})" for k, n in s["flags"].items()) or "none"
        lines.append(f"| {s['dataset']} | {LABELS[s['config']]} | {s['lr']:g} | {_ms(s['float'])} | "
                     f"{_ms(s['int8_per_tensor'])} | {_ms(s['int8_per_channel'])} | {_ms(s['agree_per_tensor'])} | "
                     f"{_ms(s['sim_rel_l2_per_tensor'])} / {_ms(s['sim_rel_l2_per_channel'])} | {worst} | {flags} |")
    for ds in dict.fromkeys(s["dataset"] for s in summary.values()):
        cells = [s for s in summary.values() if s["dataset"] == ds]
        names = list(cells[0]["channel_range_ratio"])
        lines += ["", f"Weight channel range ratio per deployed layer ({ds}; largest / median output-channel "
                  "|w| range, mean over seeds; per-tensor INT8 weight SQNR in dB in brackets):", "",
                  "| model | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for s in cells:
            lines.append(f"| {LABELS[s['config']]} | " + " | ".join(
                f"{s['channel_range_ratio'][n]:.1f} ({s['sqnr_per_tensor_db'][n]:.0f})" for n in names) + " |")
    grid = ablation.summarize(runs)["grid"]
    lines += ["", "Learning-rate grid (test accuracy %, float, mean ± std over seeds):", "",
              "| data | model | " + " | ".join(f"lr {lr:g}" for lr in preset["lrs"]) + " |",
              "|---|---|" + "---|" * len(preset["lrs"])]
    for ds, cfg in sorted(dict.fromkeys((k[0], k[1]) for k in grid), key=lambda k: (k[0], CONFIGS.index(k[1]))):
        cells = [grid.get((ds, cfg, lr)) for lr in preset["lrs"]]
        lines.append(f"| {ds} | {LABELS[cfg]} | " + " | ".join(
            f"{c['test_acc'][0] * 100:.1f} ± {c['test_acc'][1] * 100:.1f}" if c else "-" for c in cells) + " |")
    mpath = out_dir / "results.md"
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="one seed, one rate, one epoch on a data subset")
    ap.add_argument("--datasets", nargs="+", default=["digits"], choices=common.DATASETS)
    ap.add_argument("--seeds", type=int, default=None, help="override the preset's number of seeds")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md from --out's results.json")
    args = ap.parse_args(argv)
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        meta, runs = saved["meta"], saved["runs"]
        summary = summarize(runs)
        paths = write_results(args.out, meta["preset"], meta["settings"], runs, summary, meta["seconds"])
        return {"runs": runs, "summary": summary, "paths": paths}
    preset_name = "tiny" if args.tiny else "full"
    preset = dict(PRESETS[preset_name])
    if args.seeds:
        preset["seeds"] = args.seeds
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = run(args.datasets, preset, Path(tmp))
    summary = summarize(runs)
    paths = write_results(args.out, preset_name, preset, runs, summary, time.perf_counter() - t0)
    print(paths[1].read_text())
    return {"runs": runs, "summary": summary, "paths": paths}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for _name in ("repcompiler", "onnxscript", "onnx_ir"):
        logging.getLogger(_name).setLevel(logging.WARNING)
    torch.set_num_threads(1)  # one thread per process (the machine is shared)
    main()

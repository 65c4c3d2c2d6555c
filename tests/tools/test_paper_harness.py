"""The paper-experiment harness (benchmarks/paper) on a tiny configuration: every Tab. 3
configuration trains, is checked against its deployed form and feeds Fig. 7; divergence
is detected; the declared Fig. 8 blocks have their branches in both modes and fold
exactly; one cost cell runs; the figures and the results markdown are written."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "paper"))

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import ablation  # noqa: E402
import common  # noqa: E402
import cost  # noqa: E402


pytestmark = pytest.mark.usefixtures("torch_single_thread")  # conftest: tiny tensors, one intra-op thread


@pytest.fixture(scope="module")
def digits() -> common.Split:
    d = common.load("digits")
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (1222, 216, 359)
    assert d.x_train.shape[1:] == (1, 16, 16)
    # a small slice keeps the test fast; the harness itself is unchanged
    return dataclasses.replace(d, x_train=d.x_train[:128], y_train=d.y_train[:128], x_val=d.x_val[:64],
                               y_val=d.y_val[:64], x_test=d.x_test[:128], y_test=d.y_test[:128])


def test_tiny_harness_end_to_end(digits, tmp_path):
    import figures
    import run_all

    runs = [ablation.train_run(digits, cfg, 0.05, seed, 1) for seed in (0, 1) for cfg in ablation.CONFIGS]
    for r in runs:
        assert r["deploy"] == "ok" and r["deployed_equal_acc"] and r["deployed_pred_mismatches"] == 0, r
        assert r["deployed_blocks_left"] == 0 and r["deployed_convs"] == 4
        assert math.isfinite(r["test_acc"]) and len(r["losses"]) == 1
        if r["config"] in ablation.ONLINE:
            assert len(r["similarity"]) == 4 and all(len(m) == 6 for m in r["similarity"].values())
            upd = r["update_similarity"]
            assert len(upd) == 4 and all(len(v["cos"]) == 6 and len(v["norm"]) == 6 for v in upd.values())
            # every branch was updated, except the prior whose scale is fixed at 0
            moved = [[n > 0 for n in v["norm"]] for v in upd.values()]
            want = [True, True, r["config"] != "orepa_fixed", True, True, True]
            assert all(m == want for m in moved), (r["config"], moved)
        else:
            assert "similarity" not in r and "update_similarity" not in r
    summary = ablation.summarize(runs, select=1)
    assert set(summary["best"]) == {("digits", c) for c in ablation.CONFIGS}
    p = figures.paired(runs, summary["best"], "digits", "orepa_vector", "plain")
    assert p["seeds"] == [0, 1] and p["lo"] <= p["mean"] <= p["hi"]
    paths = figures.write_all(tmp_path, runs, summary, [], ["digits"], 1)
    run_all.write_results(tmp_path, "tiny", run_all.PRESETS["tiny"], runs, summary, [], ["digits"],
                          {"total": 1.0}, paths)
    text = (tmp_path / "results.md").read_text()
    assert "OREPA no post-BN" in text and "plain no BN" in text and "DBB offline" in text and "Fig. 7" in text
    for p in paths:
        assert p.stat().st_size > 10_000


def test_learning_rate_search_extends_the_grid_until_the_best_rate_is_bracketed():
    import run_all

    def run(lr, val):
        return {"dataset": "d", "config": "c", "lr": lr, "seed": 0, "val_acc": val, "diverged": False}

    runs = [run(0.03, 0.5), run(0.1, 0.6), run(0.3, 0.7)]
    assert run_all.next_rate(runs, "d", "c", 1) == 1.0  # best at the top edge: go up
    runs.append(run(1.0, 0.65))
    assert run_all.next_rate(runs, "d", "c", 1) is None  # bracketed
    low = [run(0.03, 0.9), run(0.1, 0.6), run(0.3, 0.5)]
    assert run_all.next_rate(low, "d", "c", 1) == 0.01
    diverged = [run(0.03, 0.5), run(0.1, 0.6), dict(run(0.3, 0.9), diverged=True)]
    assert run_all.next_rate(diverged, "d", "c", 1) is None  # a diverged top rate ranks last


def test_divergence_is_detected(digits):
    r = ablation.train_run(digits, "orepa_no_postbn", 1e4, 0, 1)
    assert r["diverged"]
    if r["nonfinite_at_epoch"] is not None:
        assert r["deploy"].startswith("skipped") and math.isnan(r["test_acc"])
    else:
        assert r["test_acc"] < ablation.CHANCE_LIMIT


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_fig8_declared_blocks(mode):
    import repcompiler as rc

    geom = rc.ConvGeometry(8, 8, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, 2, False)
    x = torch.randn(2, 8, 6, 6)
    for stage in range(1, 7):
        expr = cost.declare(stage).build(geom, mode=mode)
        assert len(getattr(expr, "terms", [expr])) == stage if stage > 1 else True
        assert expr.exactness().exact
        expr.eval()
        with torch.no_grad():
            torch.testing.assert_close(expr.fold().apply(x), expr(x), rtol=1e-4, atol=1e-5)
    full = cost.declare(6).build(geom, mode=mode)
    builtin = rc.get_block("orepa")(geom, mode=mode)
    count = lambda e: sum(p.numel() for p in e.parameters())  # noqa: E731
    assert count(full) == count(builtin)  # the same six branches as the built-in block


@pytest.mark.slow
def test_one_cost_cell_runs():
    row = cost.worker("+avg", "offline", 2, 32, 1, 0)
    assert row["blocks"] == 16 and row["time_s"] > 0
    assert row["rss_peak_mb"] >= row["rss_base_mb"] > 0 and row["alloc_peak_mb"] > 0

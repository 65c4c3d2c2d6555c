"""Two-process training of a transformed model (``torchrun --nproc_per_node 2``, gloo,
CPU; the worker is tests/dist_worker.py, which documents the modes):

* DDP, with and without ``rc.accumulate`` + ``no_sync``: both ranks' parameters are
  identical and equal a single-process run on the combined batch (float64);
* FSDP2 (``fully_shard`` on every online block and the root, the transformed model as
  it is), with and without ``rc.accumulate``: both ranks' full parameters equal the
  single-process run, as DDP's do.

About 20 s on an idle 2-core machine (two interpreters start). Run alone with
``python -m pytest -m distributed``; deselect with ``-m "not distributed"``.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "dist_worker.py")
MODES = ["ddp", "ddp_accumulate", "fsdp", "fsdp_accumulate"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", WORKER, str(out), *MODES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ref = runpy.run_path(WORKER, run_name="dist_worker")["reference"]()
    return out, ref


def _result(out, mode: str, rank: int):
    pt, err = out / f"{mode}_rank{rank}.pt", out / f"{mode}_rank{rank}.err"
    if err.exists():
        return err.read_text()
    return torch.load(pt)


def _assert_equal_to_reference(out, ref, mode: str) -> None:
    r0, r1 = _result(out, mode, 0), _result(out, mode, 1)
    assert isinstance(r0, dict) and isinstance(r1, dict), (r0, r1)
    assert r0.keys() == r1.keys() == ref.keys()
    for name in ref:
        assert torch.equal(r0[name], r1[name]), name  # the ranks never diverge
        assert torch.allclose(r0[name], ref[name], rtol=1e-10, atol=1e-12), name
    assert any(not torch.equal(v, w) for v, w in zip(ref.values(), runpy.run_path(WORKER)["build"]().parameters()))


@pytest.mark.parametrize("mode", ["ddp", "ddp_accumulate"])
def test_ddp_two_processes_equal_one(runs, mode):
    out, ref = runs
    _assert_equal_to_reference(out, ref, mode)


@pytest.mark.parametrize("mode", ["fsdp", "fsdp_accumulate"])
def test_fsdp2_two_processes_equal_one_and_ddp(runs, mode):
    out, ref = runs
    _assert_equal_to_reference(out, ref, mode)
    ddp = _result(out, "ddp", 0)
    for name, value in _result(out, mode, 0).items():
        assert torch.allclose(value, ddp[name], rtol=1e-10, atol=1e-12), name


def test_fsdp2_torchrun_example():
    """examples/train_fsdp.py under torchrun, two processes: the loss falls and the
    deployed model computes what the trained one does."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           os.path.join(ROOT, "examples", "train_fsdp.py"), "--steps", "12"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "loss " in line]
    assert len(losses) >= 2 and losses[-1] < losses[0], proc.stdout
    diff = float(proc.stdout.split("relative difference to the trained model ")[1].split()[0])
    assert diff < 1e-5, proc.stdout

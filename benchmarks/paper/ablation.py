"""Tab. 3 (linear scaling and post-BN ablation) and the data of Fig. 7 (branch diversity).

Configurations (:data:`CONFIGS`), each applied to the plain CNN of
:mod:`common`:

=================  =================================================================
``plain``          the CNN as is (conv + BN)
``plain_no_bn``    the CNN with its BNs replaced by ``nn.Identity`` (no normalisation
                   anywhere: the control for ``orepa_no_postbn``)
``orepa_vector``   ``rc.orepa_transform(model)`` (per-channel branch scales, post-BN)
``orepa_scalar``   ``scaling="scalar"`` (one learnable scale per branch)
``orepa_fixed``    ``scaling="fixed"`` (the scales stay at their init values
                   0.25/0.25/0/0.5/1/0.5: nothing learns them)
``orepa_none``     ``scaling="none"`` (no branch scale: every branch weighted 1)
``orepa_no_postbn````post_bn=False`` (vector scales; the model's BNs after the blocks
                   become ``nn.Identity``: no BN anywhere)
``dbb_offline``    ``block="dbb", mode="offline", post_bn=False`` (DBB as its paper
                   trains it: a BN at the end of every branch, no BN after the sum)
=================  =================================================================

One run (:func:`train_run`): SGD (momentum 0.9, weight decay 1e-4 on every parameter,
cosine learning-rate decay to 0), a fixed batch size, a fixed number of epochs, one CPU thread.
The seed sets the initialisation and the batch order; the data split is fixed. Every
epoch's mean training loss is recorded (the loss curves). The online configurations
record, per block, each branch's equivalent kernel (:func:`repcompiler.tools.similarity.branch_kernels`,
scale included) at initialisation ``W_0`` and after training ``W_T``; the cosine
similarity of the branches' **updates** ``W_T - W_0`` (what the paper's Proposition 1 is
about: how differently the branches are optimized) and of the final kernels ``W_T``
(the paper's Fig. 7 as drawn) are stored. At the end: train/val/test accuracy
in eval mode; **divergence** = a non-finite loss during training (training stops
there) or a final test accuracy below 0.2 (chance is 0.1); the trained model is
deployed (``rc.deploy``, verified on a test batch) and the deployed model's test
predictions are compared with the trained model's (accuracy must be equal).

The learning rate is chosen per configuration and data set by the mean **validation**
accuracy over seeds; test accuracy is reported at that rate, and for the whole grid.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import repcompiler as rc
from repcompiler.tools.similarity import branch_kernels, branch_similarity, cosine_matrix

from common import Split, make_model

__all__ = ["CONFIGS", "ONLINE", "build", "train_run", "summarize"]

CONFIGS = ("plain", "plain_no_bn", "orepa_vector", "orepa_scalar", "orepa_fixed", "orepa_none", "orepa_no_postbn",
           "dbb_offline")
ONLINE = ("orepa_vector", "orepa_scalar", "orepa_fixed", "orepa_none", "orepa_no_postbn")
#: each configuration's paired control: its difference to that one is reported per seed
CONTROL = {c: ("plain_no_bn" if c == "orepa_no_postbn" else "plain") for c in CONFIGS if not c.startswith("plain")}
CHANCE_LIMIT = 0.2


def build(config: str, dataset: str) -> nn.Module:
    """The training-form model of ``config`` for ``dataset`` (fresh initialisation)."""
    model = make_model(dataset)
    if config == "plain":
        return model
    if config == "plain_no_bn":
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, nn.Identity())
        return model
    if config == "orepa_vector":
        return rc.orepa_transform(model, inplace=True)
    if config == "orepa_scalar":
        return rc.orepa_transform(model, scaling="scalar", inplace=True)
    if config == "orepa_fixed":
        return rc.orepa_transform(model, scaling="fixed", inplace=True)
    if config == "orepa_none":
        return rc.orepa_transform(model, scaling="none", inplace=True)
    if config == "orepa_no_postbn":
        return rc.orepa_transform(model, post_bn=False, inplace=True)
    if config == "dbb_offline":
        return rc.orepa_transform(model, block="dbb", mode="offline", post_bn=False, inplace=True)
    raise ValueError(f"unknown configuration {config!r}; known: {CONFIGS}")


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (_predict(model, x) == y).float().mean().item()


def _kernels(model: nn.Module) -> dict[str, list[Tensor]]:
    """Each online block's branch equivalent kernels (scale included), by block name; copies
    (a branch without a scale folds to a view of its own weight, which the optimizer then
    updates in place)."""
    return {n: [k.clone() for k in branch_kernels(m.expr)] for n, m in model.named_modules()
            if isinstance(m, rc.OnlineConv)}


def _update_similarity(k0: dict[str, list[Tensor]], k1: dict[str, list[Tensor]]) -> dict[str, list]:
    """Per block: the cosine matrix of the branches' updates ``W_T - W_0`` and the norm of each update."""
    out = {}
    for name, before in k0.items():
        deltas = [b1 - b0 for b0, b1 in zip(before, k1[name])]
        out[name] = {"cos": cosine_matrix(deltas).tolist(),
                     "norm": [d.double().norm().item() for d in deltas]}
    return out


def train_run(data: Split, config: str, lr: float, seed: int, epochs: int, batch: int = 64,
              make: Callable[[str, str], nn.Module] | None = None) -> dict[str, Any]:
    """Train one configuration once; returns accuracies, divergence, deploy check, similarity.
    ``make(config, dataset)`` builds the model (default :func:`build`; other experiments,
    e.g. ``benchmarks/quant``, pass their own configurations and keep the model it
    returns: it is trained in place) after seeding torch."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = (make or build)(config, data.name)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    nonfinite_at = None
    losses: list[float] = []
    k0 = _kernels(model) if config in ONLINE else {}
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                nonfinite_at = epoch + i / n
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        if nonfinite_at is not None:
            break
        losses.append(running / n)
    model.eval()
    out: dict[str, Any] = {"config": config, "dataset": data.name, "lr": lr, "seed": seed, "epochs": epochs,
                           "batch": batch,
                           "losses": losses, "nonfinite_at_epoch": nonfinite_at}
    if nonfinite_at is None:
        out.update(train_acc=_accuracy(model, data.x_train, data.y_train),
                   val_acc=_accuracy(model, data.x_val, data.y_val),
                   test_acc=_accuracy(model, data.x_test, data.y_test))
    else:
        out.update(train_acc=float("nan"), val_acc=float("nan"), test_acc=float("nan"))
    out["diverged"] = nonfinite_at is not None or not out["test_acc"] >= CHANCE_LIMIT
    out["train_seconds"] = time.perf_counter() - t0
    if config in ONLINE and nonfinite_at is None:
        out["similarity"] = {k: v.tolist() for k, v in branch_similarity(model).items()}
        out["update_similarity"] = _update_similarity(k0, _kernels(model))
    out.update(_deploy_check(model, data) if nonfinite_at is None else {"deploy": "skipped (non-finite)"})
    return out


def _deploy_check(model: nn.Module, data: Split) -> dict[str, Any]:
    """Deploy (verified by ``rc.deploy`` on a test batch); compare test predictions."""
    try:
        deployed = rc.deploy(model, data.x_test[:16])
    except rc.RepCompilerError as exc:
        return {"deploy": f"failed: {type(exc).__name__}: {exc}"}
    with torch.no_grad():
        ref, dep = model(data.x_test), deployed(data.x_test)
    acc = (dep.argmax(1) == data.y_test).float().mean().item()
    convs = sum(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in deployed.modules())
    blocks = sum(isinstance(m, (rc.OnlineConv, rc.OfflineBlock)) for m in deployed.modules())
    scale = ref.abs().max().item() or 1.0
    return {"deploy": "ok", "deployed_test_acc": acc, "deployed_equal_acc": acc == _accuracy(model, data.x_test, data.y_test),
            "deployed_pred_mismatches": int((dep.argmax(1) != ref.argmax(1)).sum()),
            "deployed_max_rel_logit_err": (dep - ref).abs().max().item() / scale,
            "deployed_convs": convs, "deployed_blocks_left": blocks}


def _ms(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _rank(rs: list[dict[str, Any]]) -> tuple[int, float]:
    """A rate's rank: fewer diverged seeds first, then higher mean validation accuracy."""
    val = _ms([r["val_acc"] for r in rs])[0]
    return (-sum(r["diverged"] for r in rs), val if not math.isnan(val) else -1.0)


def best_rate(runs: list[dict[str, Any]]) -> float:
    """The best learning rate of one (data set, configuration)'s ``runs`` (see :func:`_rank`)."""
    by_lr: dict[float, list[dict[str, Any]]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r)
    return max(by_lr, key=lambda lr: _rank(by_lr[lr]))


def summarize(runs: list[dict[str, Any]], select: int | None = None) -> dict[str, Any]:
    """Per (data set, configuration, lr): mean/std of accuracies over seeds and the
    number of diverged runs; per (data set, configuration) the best lr (:func:`best_rate`)
    chosen on the seeds below ``select`` (default: all seeds)."""
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["dataset"], r["config"], r["lr"]), []).append(r)
    grid = {}
    for key, rs in sorted(cells.items()):
        row = {"n": len(rs), "diverged": sum(r["diverged"] for r in rs),
               "deploy_ok": sum(r.get("deploy") == "ok" and r.get("deployed_equal_acc", False) for r in rs),
               "seconds": statistics.fmean(r["train_seconds"] for r in rs)}
        for what in ("train_acc", "val_acc", "test_acc"):
            row[what] = _ms([r[what] for r in rs])
        grid[key] = row
    chosen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if select is None or r["seed"] < select:
            chosen.setdefault((r["dataset"], r["config"]), []).append(r)
    return {"grid": grid, "best": {k: best_rate(rs) for k, rs in chosen.items()}}

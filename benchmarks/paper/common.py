"""Shared pieces of the paper experiments: the two real data sets and their small CNNs.

Data (both ship inside a package, nothing is downloaded):

* ``digits`` - scikit-learn's 8x8 handwritten digits (1797 images, 10 classes),
  scaled to [0, 1], bilinearly upsampled to 16x16, standardised; a fixed stratified
  split (seed 0): 20% test, and 15% of the rest held out as validation (for choosing
  the learning rate), the remainder for training.
* ``mnist1d`` - MNIST-1D generated locally with ``mnist1d.data.make_dataset(
  get_dataset_args())`` (4000 train / 1000 test sequences of length 40, 10 classes;
  never the package's download path), the same 15% validation hold-out from train.

Models: four 3-wide conv+BN+ReLU layers (two of them strided) and a linear head -
2-d for digits, 1-d for MNIST-1D - so one training run takes seconds on a CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Split", "load", "make_model", "DATASETS"]

DATASETS = ("digits", "mnist1d")


@dataclass
class Split:
    """One data set as tensors: ``x_*`` float32 ``[N, 1, *spatial]``, ``y_*`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def sizes(self) -> str:
        return f"{len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test"


def _holdout(x: np.ndarray, y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, ...]:
    """A stratified ``frac`` hold-out: ``(x_keep, y_keep, x_out, y_out)``."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out[rng.permutation(idx)[: int(round(frac * len(idx)))]] = True
    return x[~out], y[~out], x[out], y[out]


def _split(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
           mean: float, std: float) -> Split:
    x_tr, y_tr, x_va, y_va = _holdout(x_tr, y_tr, 0.15, seed=1)

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    return Split(name, t(x_tr), torch.from_numpy(y_tr).long(), t(x_va), torch.from_numpy(y_va).long(),
                 t(x_te), torch.from_numpy(y_te).long())


def _digits(size: int = 16) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).numpy()
    y = d.target.astype(np.int64)
    x_tr, y_tr, x_te, y_te = _holdout(x, y, 0.2, seed=0)
    return _split("digits", x_tr, y_tr, x_te, y_te, float(x_tr.mean()), float(x_tr.std()))


def _mnist1d() -> Split:
    from mnist1d.data import get_dataset_args, make_dataset  # generates locally

    d = make_dataset(get_dataset_args())
    x_tr, x_te = d["x"].astype(np.float32)[:, None], d["x_test"].astype(np.float32)[:, None]
    y_tr, y_te = d["y"].astype(np.int64), d["y_test"].astype(np.int64)
    return _split("mnist1d", x_tr, y_tr, x_te, y_te, float(x_tr.mean()), float(x_tr.std()))


def load(name: str) -> Split:
    """The data set ``name`` (one of :data:`DATASETS`)."""
    if name == "digits":
        return _digits()
    if name == "mnist1d":
        return _mnist1d()
    raise ValueError(f"unknown data set {name!r}; known: {DATASETS}")


class SmallCNN(nn.Module):
    """conv3-BN-ReLU x4 (stride 1, 2, 1, 2) and a linear head, in 1-d or 2-d."""

    def __init__(self, dims: int, widths: tuple[int, int, int, int], spatial: int, pool: bool,
                 num_classes: int = 10) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(widths):
            layers += [conv(c_in, c, 3, stride=1 + i % 2, padding=1, bias=False), bn(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = pool
        out_spatial = 1 if pool else (spatial // 4) ** dims
        self.head = nn.Linear(c_in * out_spatial, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if self.pool:
            f = f.mean(dim=tuple(range(2, f.dim())))
        return self.head(f.flatten(1))


def make_model(dataset: str) -> nn.Module:
    """The plain CNN for ``dataset`` (digits: 2-d on 16x16; mnist1d: 1-d on length 40)."""
    if dataset == "digits":
        return SmallCNN(2, (8, 16, 16, 32), 16, pool=True)
    if dataset == "mnist1d":
        return SmallCNN(1, (16, 16, 32, 32), 40, pool=False)
    raise ValueError(f"unknown data set {dataset!r}; known: {DATASETS}")

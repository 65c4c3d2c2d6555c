"""``check_weights``: which weights the entry points refuse before any rewrite."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from repcompiler.analysis.inputs import check_weights
from repcompiler.errors import UnsupportedError


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_large_finite_weights_whose_sum_overflows_are_accepted(dtype: torch.dtype) -> None:
    conv = nn.Conv2d(4, 4, 3).to(dtype)
    with torch.no_grad():
        conv.weight.fill_(torch.finfo(dtype).max / 2)  # finite, but the sum of all of them is inf
    assert not torch.isfinite(conv.weight.sum())
    check_weights(conv, "fold")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_element_is_named(bad: float) -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 3))
    with torch.no_grad():
        model[1].weight[1, 0, 2, 2] = bad
    with pytest.raises(UnsupportedError, match=r"fold: Sequential has non-finite weights in 1 tensor\(s\): 1.weight"):
        check_weights(model, "fold")

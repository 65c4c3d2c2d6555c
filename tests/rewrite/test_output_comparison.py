"""repcompiler.rewrite.verify: the one output-comparison helper (structure, shapes, relative
error within a dtype-scaled tolerance, one message format)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repcompiler.errors import VerificationError
from repcompiler.rewrite.verify import compare_outputs, eval_mode, relative_error, tolerance_for


def test_relative_error_and_tolerances():
    b = torch.tensor([1.0, -4.0])
    assert relative_error(b + torch.tensor([0.0, 0.4]), b) == pytest.approx(0.1)
    assert relative_error(torch.tensor([0.5]), torch.zeros(1)) == 0.5  # absolute when b is zero
    assert tolerance_for(torch.float64) < tolerance_for(torch.float32) < tolerance_for(torch.float16)


def test_compare_outputs_passes_within_tolerance_and_names_the_output():
    want = (torch.ones(3), {"a": torch.full((2,), 2.0)})
    got = (torch.ones(3), {"a": torch.full((2,), 2.0 + 1e-6)})
    assert compare_outputs(want, got, "net") < 1e-5
    bad = (torch.ones(3), {"a": torch.full((2,), 2.5)})
    with pytest.raises(VerificationError, match=r"^net: output 1 of the folded model differs from the original by "
                                                r"relative 0\.25 \(tolerance 0\.001; max \|diff\| 0\.5, max \|output\| 2\)$"):
        compare_outputs(want, bad, "net")
    with pytest.raises(VerificationError, match=r"relative 4\.77e-07 \(tolerance 1e-07;"):
        compare_outputs(want, got, "net", factor=1e-3)


def test_compare_outputs_structure_and_shape():
    with pytest.raises(VerificationError, match="structure"):
        compare_outputs((torch.ones(2),), [torch.ones(2)], "m", "deployed model")
    with pytest.raises(VerificationError, match=r"output 0 of the deployed model has shape \(3,\), expected \(2,\)"):
        compare_outputs(torch.ones(2), torch.ones(3), "m", "deployed model")


def test_eval_mode_restores_each_flag():
    m = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout())
    m[1].eval()
    with eval_mode(m):
        assert not any(x.training for x in m.modules())
    assert m.training and m[0].training and not m[1].training

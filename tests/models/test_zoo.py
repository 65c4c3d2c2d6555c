"""fold on the torchvision model zoo (weights=None, randomized BN statistics).

Every model: eval outputs equal within relative 1e-5 (float32), conv count unchanged
(every conv->BN pair folded into its conv, no conv merged away), and no conv->BN pair
left in the traced parts. The default run covers a representative subset; the full
sweep (80 classification, 6 segmentation, 9 video, 12 detection models) runs with::

    pytest -m zoo_full tests/models/test_zoo.py
"""

from __future__ import annotations

import warnings

import pytest
import torch

import repcompiler
from repcompiler.explain.report import count_convs
from zoo_utils import (
    build,
    detection_heads,
    detection_size,
    detections_rel_err,
    input_for,
    names,
    randomize_bn,
    rel_err,
    unfused_conv_bn,
)

SUBSET = [
    ("resnet18", "classification"),
    ("mobilenet_v3_small", "classification"),
    ("efficientnet_b0", "classification"),
    ("regnet_x_400mf", "classification"),
    ("densenet121", "classification"),
    ("lraspp_mobilenet_v3_large", "segmentation"),
    ("r3d_18", "video"),
    ("fasterrcnn_mobilenet_v3_large_fpn", "detection"),
]


def _check(name: str, group: str) -> None:
    warnings.filterwarnings("ignore")
    model = randomize_bn(build(name, group)).eval()
    x = input_for(name, group)
    if group == "detection":
        return _check_detection(name, model, x)
    with torch.no_grad():
        want = model(x)
    folded, report = repcompiler.fold(model, return_report=True)
    with torch.no_grad():
        got = folded(x)
        again = model(x)
    assert rel_err(again, want) == 0.0, "the user's model changed"
    err = rel_err(got, want)
    assert err <= 1e-5, f"{name}: relative error {err:.3g}\n{report}"
    assert count_convs(folded) == count_convs(model), report
    assert unfused_conv_bn(folded) == []


def _check_detection(name: str, model, images) -> None:
    """Detection heads (random weights) amplify float32 rounding by ~100x (box decoding,
    score thresholds), so: the backbone (where most folds are) within relative 1e-5 in
    float32, on an input of the size its transform produces (SSD300 needs 300x300);
    then in float64 the tensors before post-processing (features, head outputs) and
    the detections, matched up to permutation: with random weights many scores are
    equal to the last few bits (SSDlite's features hardly vary across positions), and
    top-k / NMS return such detections in either order."""
    folded, report = repcompiler.fold(model, return_report=True)
    assert report.skipped and type(folded) is type(model)  # root kept: it still post-processes
    assert count_convs(folded) == count_convs(model), report
    assert unfused_conv_bn(folded) == []
    t = torch.randn(1, 3, *detection_size(model), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_err(folded.backbone(t), model.backbone(t))
    assert err <= 1e-5, f"{name} backbone: relative error {err:.3g}"
    model64 = model.double()
    folded64 = repcompiler.fold(model64)
    imgs = [i.double() for i in images]
    with torch.no_grad():
        err = rel_err(detection_heads(folded64, imgs), detection_heads(model64, imgs))
        assert err <= 1e-9, f"{name} features/heads (float64): relative error {err:.3g}"
        want, got = model64(imgs), folded64(imgs)
    err = detections_rel_err(got, want)
    assert err <= 1e-7, f"{name} detections (float64): relative error {err:.3g}"
    # measured: features/heads <= 3e-14, detections <= 2e-9 (Mask R-CNN masks); a conv
    # weight off by 1e-3 shows up at ~1e-3 (heads) or ~1e-4 and above (detections;
    # the R-CNNs' roi_heads are only seen there, and only when there are detections)


def test_detections_rel_err():
    """Up to permutation, but not blind: a moved box, a changed label or a missing
    detection is an error."""
    g = torch.Generator().manual_seed(0)
    want = [{"boxes": torch.rand(6, 4, generator=g) * 100, "scores": torch.rand(6, generator=g),
             "labels": torch.randint(1, 91, (6,), generator=g)}]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    got = [{k: v[perm] for k, v in want[0].items()}]
    assert detections_rel_err(got, want) == 0.0
    assert rel_err(got, want) > 0.1  # what the row-by-row comparison said
    for key, delta in (("boxes", 0.5), ("scores", 1e-3), ("labels", 1)):
        bad = [{k: v.clone() for k, v in got[0].items()}]
        bad[0][key][2] += delta
        assert detections_rel_err(bad, want) >= 1e-3, key
    fewer = [{k: v[:5] for k, v in got[0].items()}]
    assert detections_rel_err(fewer, want) == float("inf")


@pytest.mark.parametrize("name,group", SUBSET, ids=[n for n, _ in SUBSET])
def test_zoo_subset(name, group):
    _check(name, group)


def _all():
    out = []
    for group in ("classification", "segmentation", "video", "detection"):
        out += [(n, group) for n in names(group)]
    return out


@pytest.mark.zoo_full
@pytest.mark.parametrize("name,group", _all(), ids=[f"{g}-{n}" for n, g in _all()])
def test_zoo_full(name, group):
    _check(name, group)


# -- timm: fold / linearize -> deploy through the one rule registry ----------------------------

TIMM = [("repvgg_a0", "RepVggBlock", 22), ("mobileone_s0", "MobileOneBlock", 43)]


def _timm_model(name: str):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=5)).eval()


def _n_blocks(model, cls_name: str) -> int:
    return sum(type(m).__name__ == cls_name for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name,block,n", TIMM, ids=[t[0] for t in TIMM])
def test_timm_training_form_folds_to_one_conv_per_block(name, block, n):
    """timm's BatchNormAct2d (identity act/drop) has its rule in the global registry, so
    fold folds every training-form block (it folded nothing when only linearize knew it);
    the stem/head BNAct with a ReLU is traced into and its F.batch_norm folds too."""
    model = _timm_model(name)
    assert _n_blocks(model, block) == n
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    folded, report = repcompiler.fold(model, return_report=True)
    assert count_convs(folded) == n, report
    assert all(sum(isinstance(c, torch.nn.Conv2d) for c in m.modules()) == 1
               for m in folded.modules() if type(m).__name__ == block)
    with torch.no_grad():
        assert rel_err(folded(x), want) <= 1e-5
    lin = repcompiler.linearize(model, init="from_bn")
    plain = repcompiler.deploy(lin)
    assert count_convs(plain) == n
    with torch.no_grad():
        assert rel_err(plain(x), want) <= 1e-5

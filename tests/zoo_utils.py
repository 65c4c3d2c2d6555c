"""Helpers for the model-zoo tests (build torchvision models without downloads,
randomize BN statistics, compare outputs, find conv->BN pairs left unfolded)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from repcompiler.capture.tracing import trace_units

from helpers import randomize_bn as _randomize_bn

__all__ = [
    "build", "input_for", "randomize_bn", "unfused_conv_bn", "rel_err",
    "detection_size", "detection_heads", "detections_rel_err",
]


# input sizes (H=W, or T,H,W for video) that every model of the zoo accepts
_SIZE = {
    "inception_v3": 80,
    "googlenet": 64,
    "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224,
    "maxvit_t": 224,
    "swin_t": 64, "swin_s": 64, "swin_b": 64, "swin_v2_t": 64, "swin_v2_s": 64, "swin_v2_b": 64,
}


def _models_module(group: str):
    import torchvision.models as M

    return {"classification": M, "segmentation": M.segmentation, "video": M.video,
            "detection": M.detection}[group]


def names(group: str) -> list[str]:
    from torchvision.models import list_models

    return sorted(list_models(module=_models_module(group)))


def build(name: str, group: str) -> nn.Module:
    import torchvision.models as M

    kw: dict = {"weights": None}
    if group in ("segmentation", "detection"):
        kw["weights_backbone"] = None
    if name in ("inception_v3", "googlenet"):
        kw["init_weights"] = False
    if group == "detection" and not name.startswith("ssd"):
        kw.update(min_size=128, max_size=160)
    torch.manual_seed(0)
    return M.get_model(name, **kw)


def input_for(name: str, group: str, batch: int = 1):
    g = torch.Generator().manual_seed(0)
    if group == "video":
        t = 16 if name.startswith("mvit") else (8 if name == "s3d" else 4)
        hw = 224 if name.startswith(("mvit", "swin3d", "s3d")) else 32
        if name == "s3d":
            t = 16
        if name.startswith("swin3d"):
            hw, t = 64, 4
        return torch.randn(batch, 3, t, hw, hw, generator=g)
    if group == "detection":
        return [torch.rand(3, 120, 150, generator=g)]
    if group == "segmentation":
        return torch.randn(batch, 3, 64, 64, generator=g)
    s = _SIZE.get(name, 64)
    return torch.randn(batch, 3, s, s, generator=g)


def detection_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the images a detection model's backbone sees, from its transform:
    ``fixed_size`` (SSD: 300x300, SSDlite: 320x320) or ``min_size`` x ``max_size``."""
    t = model.transform
    if getattr(t, "fixed_size", None) is not None:
        w, h = t.fixed_size  # torchvision's fixed_size is (width, height)
        return int(h), int(w)
    return int(min(t.min_size)), int(t.max_size)


def detection_heads(model: nn.Module, images: list[torch.Tensor]) -> dict:
    """A detection model's tensors before post-processing (no top-k, thresholds, NMS,
    so no order that near-equal scores could flip): the backbone features and the
    dense head outputs (``head`` of SSD/RetinaNet/FCOS, ``rpn.head`` of the R-CNNs)."""
    from collections import OrderedDict

    batch, _ = model.transform(images)
    feats = model.backbone(batch.tensors)
    if isinstance(feats, torch.Tensor):
        feats = OrderedDict([("0", feats)])
    out: dict = {"features": dict(feats)}
    levels = list(feats.values())
    if hasattr(model, "head"):
        out["head"] = model.head(levels)
    if hasattr(model, "rpn"):
        out["rpn.head"] = model.rpn.head(levels)
    return out


def detections_rel_err(got: list[dict], want: list[dict]) -> float:
    """:func:`rel_err` of two detection lists, matching each image's detections up to
    permutation: detections whose scores are (near-)equal come out of top-k / NMS in
    either order, so comparing row by row fails on a correct fold. Each detection is a
    row of all its fields (boxes, scores, labels, masks, keypoints ...), every field
    scaled by its max |want|; each wanted row is matched (greedily, in order) to the
    nearest unused got row, and the result is the largest max-abs distance of a
    match. A different number of detections, or a different label, is an error of 1+."""
    assert len(got) == len(want)
    worst = 0.0
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g.keys(), w.keys())
        n = len(w["scores"]) if "scores" in w else len(next(iter(w.values())))
        if any(len(g[k]) != n for k in g):
            return float("inf")
        if n == 0:
            continue
        gr, wr = [], []
        for k in sorted(w):
            a, b = g[k].reshape(n, -1).double(), w[k].reshape(n, -1).double()
            if w[k].is_floating_point():
                scale = b.abs().max().clamp_min(1e-12)
            else:  # labels: compared as they are, a different label is an error of 1+
                scale = torch.ones((), dtype=torch.float64)
            gr.append(a / scale)
            wr.append(b / scale)
        gm, wm = torch.cat(gr, 1), torch.cat(wr, 1)
        free = torch.ones(n, dtype=torch.bool)
        for i in range(n):
            d = (gm - wm[i]).abs().amax(1)
            d[~free] = float("inf")
            j = int(d.argmin())
            free[j] = False
            worst = max(worst, d[j].item())
    return worst


# helpers.randomize_bn with the narrow ranges the zoo tests use (deep float32 models
# compared within relative 1e-5): no sign flips, BNs without running stats left
# alone, float32 draws.
randomize_bn = functools.partial(
    _randomize_bn,
    mean_std=0.1,
    var_range=(0.5, 1.5),
    bias_std=0.1,
    flip_prob=0.0,
    skip_untracked=True,
    draw_dtype=torch.float32,
)


def rel_err(a, b) -> float:
    """max over output tensors of max|a-b| / max|b|."""
    al, _ = tree_flatten(a)
    bl, _ = tree_flatten(b)
    assert len(al) == len(bl)
    worst = 0.0
    for x, y in zip(al, bl):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            assert x.shape == y.shape, (x.shape, y.shape)
            if y.numel():
                worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item())
    return worst


def unfused_conv_bn(model: nn.Module) -> list[str]:
    """conv -> BN pairs (conv output used only by the BN) left in the traced parts."""
    out = []
    res = trace_units(model)
    for u in res.units:
        gm = u.gm
        for n in gm.graph.nodes:
            if n.op != "call_module":
                continue
            m = gm.get_submodule(n.target)
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            src = n.args[0]
            if isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1:
                if isinstance(gm.get_submodule(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    out.append(f"{u.path}:{src.target}->{n.target}")
    return out

"""OREPA end to end on real data: scikit-learn's handwritten digits (shipped inside the
package, no download).

Steps: a small CNN (conv -> BN -> ReLU, 3x3 and 1x1 convs) is transformed with
``rc.orepa_transform`` (every conv becomes an online OREPA block: one conv per forward,
its kernel generated from six branches), trained a few epochs with a progress bar and
the held-out accuracy after every epoch, deployed to plain convs with ``rc.deploy``,
exported to ONNX with ``rc.export`` (which checks the file against onnxruntime), and the
ONNX model's accuracy on the test split is checked to equal the trained model's.

With ``--micro-batches N`` every batch is split into N micro-batches whose gradients are
accumulated inside ``rc.accumulate(model)``: each kernel is generated and
backpropagated once per optimizer step, as with one big batch.

    pip install -e ".[examples,export]"
    python examples/train_digits.py                    # ~1 min on a 2-core CPU
    python examples/train_digits.py --epochs 1 --micro-batches 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import repcompiler as rc


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 16, 3), *block(16, 32, 3, 2), *block(32, 32, 3), *block(32, 64, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x).argmax(1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description="OREPA on scikit-learn's digits: train, deploy, export, check.")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batches", type=int, default=1, help="accumulate N micro-batches per step (rc.accumulate)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_split(args.seed)
    print(f"digits: {len(xtr)} train / {len(xte)} test images, 8x8, 10 classes")

    model = rc.orepa_transform(small_cnn())
    n_blocks = sum(isinstance(m, rc.OnlineConv) for m in model.modules())
    print(f"transformed: {n_blocks} convs -> online OREPA blocks, "
          f"{sum(p.numel() for p in small_cnn().parameters()):,} -> {sum(p.numel() for p in model.parameters()):,} "
          "training parameters")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * -(-len(xtr) // args.batch))

    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(xtr))
        bar = tqdm(order.split(args.batch), desc=f"epoch {epoch}/{args.epochs}", leave=False,
                   disable=args.no_progress or not sys.stderr.isatty())  # a bar only on a terminal
        for idx in bar:
            opt.zero_grad(set_to_none=True)
            with rc.accumulate(model):  # kernels generated once per step, whatever the micro-batch count
                for part in idx.chunk(args.micro_batches):
                    loss = F.cross_entropy(model(xtr[part]), ytr[part]) * len(part) / len(idx)
                    loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = (predict(model, xte) == yte).float().mean().item()
        print(f"epoch {epoch}: held-out accuracy {acc:.4f}")

    trained = predict(model, xte)
    deployed = rc.deploy(model)
    dep = predict(deployed, xte)
    with torch.no_grad():
        diff = (deployed(xte) - model(xte)).abs().max().item()
    print(f"deployed: {sum(p.numel() for p in deployed.parameters()):,} parameters, "
          f"{sum(isinstance(m, nn.Conv2d) for m in deployed.modules())} plain convs; "
          f"max logit difference vs trained {diff:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits.onnx")
        rc.export(deployed, path, xte[:2])
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = sess.run(None, {sess.get_inputs()[0].name: xte.numpy()})[0]
        onnx_pred = torch.from_numpy(np.asarray(logits)).argmax(1)
        size_kb = os.path.getsize(path) / 1024
    acc_trained = (trained == yte).float().mean().item()
    acc_deployed = (dep == yte).float().mean().item()
    acc_onnx = (onnx_pred == yte).float().mean().item()
    print(f"test accuracy: trained {acc_trained:.4f}, deployed {acc_deployed:.4f}, "
          f"onnxruntime {acc_onnx:.4f} ({size_kb:.0f} kB ONNX file)")
    if not (acc_trained == acc_deployed == acc_onnx):
        raise SystemExit("accuracies differ between the trained, deployed and ONNX models")
    print(f"onnxruntime predictions equal the trained model's on {int((onnx_pred == trained).sum())}/{len(yte)} "
          "test images")
    return {"accuracy": acc_trained, "onnx_accuracy": acc_onnx, "deployed_accuracy": acc_deployed}


if __name__ == "__main__":
    main()

"""examples/train_digits.py (scikit-learn digits: transform, train, deploy, ONNX) runs,
shortened to one epoch with accumulated micro-batches, and reaches its own checks:
held-out accuracy per epoch, and the trained, deployed and onnxruntime accuracies equal."""

from __future__ import annotations

import os
import runpy

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "train_digits.py")


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_train_digits_one_epoch(capsys):
    main = runpy.run_path(EXAMPLE, run_name="train_digits")["main"]
    res = main(["--epochs", "1", "--micro-batches", "2"])
    out, err = capsys.readouterr()
    assert "epoch 1/1" not in err and "\r" not in err, err  # stderr is not a terminal: no progress bar
    assert "1347 train / 450 test images" in out
    assert "epoch 1: held-out accuracy" in out
    assert "onnxruntime predictions equal the trained model's on 450/450" in out
    assert res["accuracy"] == res["deployed_accuracy"] == res["onnx_accuracy"]
    assert res["accuracy"] > 0.3  # one epoch already learns (chance: 0.1)

"""``import repcompiler`` imports neither ``repcompiler.testing`` nor torchvision: ``rc.testing``
is imported on first attribute access, and torchvision's layers are handled once the user's
code has imported torchvision, even after the default rules were built (each check runs in a
fresh interpreter: pytest itself imports both)."""

import subprocess
import sys


def test_testing_is_imported_on_first_use_only() -> None:
    code = ("import sys, repcompiler as rc; assert 'repcompiler.testing' not in sys.modules; "
            "f = rc.testing.randomize_bn; assert 'repcompiler.testing' in sys.modules; "
            "import hypothesis  # noqa\n")
    subprocess.run([sys.executable, "-c", code], check=True)


_LATE_TORCHVISION = """
import sys, torch, repcompiler as rc
from torch import nn
assert "torchvision" not in sys.modules
rc.fold(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).eval())  # builds the default rules
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops import StochasticDepth
fbn = FrozenBatchNorm2d(4)
fbn.running_var.uniform_(0.5, 2.0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), fbn, StochasticDepth(0.5, "row")).eval()
folded, report = rc.fold(model, return_report=True)
assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules()), report
x = torch.randn(2, 3, 8, 8)
torch.testing.assert_close(folded(x), model(x))
from repcompiler.capture.tracing import trace_model
gm = trace_model(model)
assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), StochasticDepth) for n in gm.graph.nodes)
"""


def test_torchvision_layers_are_ruled_when_torchvision_is_imported_after_repcompiler() -> None:
    proc = subprocess.run([sys.executable, "-c", _LATE_TORCHVISION], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

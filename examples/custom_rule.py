"""Teach ``repcompiler.fold`` about your own layers.

``fold`` squeezes linear conv subgraphs into one conv, but only through operations
it has a lowering rule for: anything else is opaque and left exactly as it is. Here
a model uses two home-made layers:

* ``ChannelAffine`` - a learnable per-channel ``x * gamma + beta`` written with
  ``torch.addcmul`` (an op with no built-in rule);
* ``FrozenNorm`` - a frozen BatchNorm (fixed statistics, as detection backbones use),
  written for any number of spatial dims (its broadcast shape comes from ``x.dim()``).

Without rules, fold cannot prove what either layer computes, so it leaves both as
they are (never a guess).

We register a rule for each (the fluent ``RuleConfig`` and the ``@rule`` decorator),
let ``repcompiler.testing.check_rule`` prove them, and fold: every ``conv -> layer``
pair becomes one conv, with the report saying what happened.

    python examples/custom_rule.py        # a few seconds on a CPU
"""

from __future__ import annotations

import time

import torch
from torch import nn

import repcompiler as rc
from repcompiler import algebra as A
from repcompiler.config import RuleConfig, rule


class ChannelAffine(nn.Module):
    """``y = beta + x * gamma`` per channel (any number of spatial dims)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.beta.view(shape), x, self.gamma.view(shape))


class FrozenNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, not trained)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(shape) + (self.bias - self.running_mean * scale).view(shape)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), FrozenNorm(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), ChannelAffine(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), ChannelAffine(8),
    )
    with torch.no_grad():  # pretend it was trained: non-trivial values everywhere
        for m in model.modules():
            if isinstance(m, ChannelAffine):
                m.gamma.uniform_(0.5, 1.5)
                m.beta.normal_(0, 0.5)
            if isinstance(m, FrozenNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def register_rules() -> None:
    # 1. the fluent form: the layer is a per-channel affine map; say which tensors.
    #    Parameters are shared with the lowered expression; override=True only so that
    #    re-running this script in one session does not raise RegistrationError.
    RuleConfig(ChannelAffine).affine(scale="gamma", shift="beta").register(override=True)

    # 2. the decorator form, writing the lowering by hand: an algebra expression
    #    computing the same map (here Affine, a per-channel scale and shift).
    @rule(FrozenNorm, override=True)
    def lower_frozen_norm(m: FrozenNorm, info: rc.rules.LowerInfo) -> A.Expr:
        scale = m.weight * (m.running_var + m.eps).rsqrt()
        return A.Affine(info.in_channels, info.dims, scale=scale, shift=m.bias - m.running_mean * scale,
                        name=info.name or "FrozenNorm")


def convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def main(check_examples: int = 6) -> float:
    t0 = time.perf_counter()
    x = torch.randn(4, 3, 24, 24)

    # before: no rules for our layers -> fold leaves them opaque, and the convs in
    # front of them stay separate
    rc.unregister_rule(ChannelAffine)
    rc.unregister_rule(FrozenNorm)
    model = make_model()
    before, report = rc.fold(model, x, return_report=True)
    print("without rules:\n", report, sep="")
    opaque = sum(isinstance(m, (ChannelAffine, FrozenNorm)) for m in before.modules())
    print(f"-> {opaque} custom layer(s) left opaque\n")

    # register, and prove the rules with the library's properties (exactness, the
    # layer really is affine, unfolded/folded forms equal the layer, fold of a model
    # holding it equals the model) on hypothesis-generated channels/dims/inputs
    register_rules()
    print(rc.testing.check_rule(ChannelAffine, make_module=ChannelAffine, max_examples=check_examples))
    print(rc.testing.check_rule(FrozenNorm, make_module=FrozenNorm, max_examples=check_examples))

    folded, report = rc.fold(model, x, return_report=True)
    print("\nwith rules:\n", report, sep="")
    with torch.no_grad():
        ref, out = model(x), folded(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    left = [type(m).__name__ for m in folded.modules() if isinstance(m, (ChannelAffine, FrozenNorm))]
    print(f"\nconvs: {convs(model)} -> {convs(folded)}; custom layers left: {left or 'none'}; "
          f"max relative difference: {err:.2e}; done in {time.perf_counter() - t0:.1f}s")
    assert not left, f"fold left {left}"
    assert err < 1e-5, f"folded model differs (relative {err:.2e})"
    assert opaque == 3, "without rules the custom layers should have stayed opaque"
    return err


if __name__ == "__main__":
    main()

"""Simulated integer inference on a private copy of a model: layer discovery, calibration
and fake-quantized forward passes.

Owns :class:`QuantSim` and :data:`LAYER_TYPES`. The user's model is deep-copied once
and the copy put in eval mode, so the model itself (weights, buffers, ``training``
flag) is never touched. Every conv/linear layer of the copy gets one forward hook that

* while calibrating, feeds its output to a per-tensor and a per-channel
  ``torch.ao.quantization`` observer (the activation range) and records the call order;
* while measuring, accumulates the SQNR of its fake-quantized output;
* while simulating, fake-quantizes its output per tensor with the calibrated scale.

Quantized weights are swapped into the copy's parameters (``weight.copy_``) for the
duration of a run. An online/offline block (:class:`~repcompiler.OnlineConv`,
:class:`~repcompiler.OfflineBlock`) is one layer: its eval-mode kernel (branches and
post-BN folded, :meth:`~repcompiler.OnlineConv.to_conv`) is the weight reported and
quantized; its hook recomputes the output with that conv when its weight is quantized.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import IncompatibleError, RepCompilerError, UnsupportedError, first_line
from ..analysis.isolation import isolated_call
from ..online.conv import OfflineBlock, OnlineConv
from .fake import channel_observer, fake_quantize_per_tensor, fake_quantize_weight, tensor_observer

__all__ = ["LAYER_TYPES", "SimLayer", "QuantSim", "output_leaves"]

log = logging.getLogger(__name__)

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BLOCK_TYPES = (OnlineConv, OfflineBlock)


@dataclass(eq=False)
class SimLayer:
    """One reported layer of the copy: its float weight, observers and run-time switches."""

    name: str
    module: nn.Module
    kind: str
    weight: Tensor
    bias: Tensor | None
    spatial: int  # spatial dims of its output (0 for Linear)
    conv: nn.Module | None = None  # a block's eval-mode conv (the hook recomputes with it)
    calls: int = 0
    act_obs: Any = None
    act_channel_obs: Any = None
    act_scale: float | None = None
    act_signal: float = 0.0
    act_noise: float = 0.0
    quantized: dict[str, Tensor] = field(default_factory=dict)  # weight mode -> fake-quantized weight
    weight_mode: str | None = None  # the weight variant of the current run (None: float)
    quant_act: bool = False


def output_leaves(output: Any) -> list[Tensor]:
    """The floating tensors of a model output (a tensor, or tuples/lists/dicts of them), in order."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for v in output.values() for t in output_leaves(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in output_leaves(v)]
    return []


def _kind(module: nn.Module) -> str:
    if isinstance(module, _BLOCK_TYPES):
        return f"{type(module).__name__}[{module.block or 'block'}]"
    return type(module).__name__


def _find_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers and online/offline blocks (not the modules inside a block)."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in inside):  # "": the model itself is a block
            continue
        if isinstance(m, _BLOCK_TYPES):
            found.append((name, m))
            inside.append(name)
        elif isinstance(m, LAYER_TYPES):
            found.append((name, m))
    return found


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in inputs)


class QuantSim:
    """A quantization simulator over an eval-mode copy of ``model``.

    Args:
        model: the model (not modified).
        bits: integer width of weights and activations.
        axis: the weight axis of the per-channel variant (0: output channels).
    """

    def __init__(self, model: nn.Module, bits: int, axis: int) -> None:
        try:
            self.model = copy.deepcopy(model).eval()
        except Exception as exc:  # broad on purpose: a user model's __deepcopy__/__reduce__ may raise anything
            raise UnsupportedError(f"quant_report: {type(model).__name__} cannot be deep-copied "
                                   f"(the report works on a copy, to leave the model untouched): {first_line(exc)}")
        self.bits, self.axis = bits, axis
        self.phase = "run"
        self.order: list[SimLayer] = []
        self.layers: list[SimLayer] = [self._layer(n, m) for n, m in _find_layers(self.model)]
        if not self.layers:
            raise UnsupportedError(
                f"quant_report: {type(model).__name__} has no conv/linear layer to report (looked for "
                f"{', '.join(t.__name__ for t in LAYER_TYPES + _BLOCK_TYPES)} and their subclasses)")
        for layer in self.layers:
            layer.module.register_forward_hook(self._hook_for(layer))

    def _layer(self, name: str, m: nn.Module) -> SimLayer:
        label = f"{_kind(m)} {name or '(model)'}"
        conv = None
        if isinstance(m, _BLOCK_TYPES):
            conv = m.to_conv()
            weight, bias = conv.weight.detach(), conv.bias
            spatial = conv.weight.dim() - 2
        else:
            if not isinstance(m._parameters.get("weight"), Tensor):
                raise UnsupportedError(f"quant_report: {label}: its weight is not a plain parameter (computed, "
                                       "e.g. by a parametrization); remove the parametrization first")
            weight, bias = m.weight.detach().clone(), m.bias
            spatial = 0 if isinstance(m, nn.Linear) else weight.dim() - 2
        if not -weight.dim() <= self.axis < weight.dim():
            raise UnsupportedError(f"quant_report: per_channel_axis={self.axis} is out of range for {label} "
                                   f"(weight of shape {tuple(weight.shape)})")
        return SimLayer(name or "(model)", m, _kind(m), weight, None if bias is None else bias.detach(), spatial,
                        conv=conv)

    # -- the hook ----------------------------------------------------------------------
    def _hook_for(self, layer: SimLayer):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not isinstance(output, Tensor):
                raise UnsupportedError(f"quant_report: {layer.kind} {layer.name} returned "
                                       f"{type(output).__name__}, not a tensor; cannot observe its activation")
            if layer.conv is not None and layer.weight_mode is not None:
                params = {"weight": layer.quantized[layer.weight_mode]}
                output = torch.func.functional_call(layer.conv, params, args)
            if self.phase == "calibrate":
                self._observe(layer, output)
            elif self.phase == "measure" and layer.act_scale is not None:
                noise = output - fake_quantize_per_tensor(output, layer.act_scale, self.bits)
                layer.act_signal += float(output.double().square().sum())
                layer.act_noise += float(noise.double().square().sum())
            if layer.quant_act and layer.act_scale is not None:
                output = fake_quantize_per_tensor(output, layer.act_scale, self.bits)
            return output

        return hook

    def _observe(self, layer: SimLayer, output: Tensor) -> None:
        if layer.calls == 0:
            self.order.append(layer)
            # output channels: the axis before the spatial dims (the last one for Linear)
            layer.act_obs = tensor_observer(self.bits)
            layer.act_channel_obs = channel_observer(self.bits, max(output.dim() - layer.spatial - 1, 0))
        layer.calls += 1
        layer.act_obs(output.detach())
        if output.dim() > 0:
            layer.act_channel_obs(output.detach())

    # -- runs --------------------------------------------------------------------------
    def forward(self, inputs: tuple[Any, ...], index: int) -> list[Tensor]:
        """Run the copy on one batch (from the same state every time: a ``forward`` that
        updates a buffer does not drift the later runs); the floating output tensors."""
        try:
            out = isolated_call(self.model, inputs)
        except RepCompilerError:
            raise
        except Exception as exc:  # broad on purpose: the user model's forward may raise anything
            raise IncompatibleError(
                f"quant_report: {type(self.model).__name__} does not run on calibration batch {index} of shape "
                f"{_shapes(inputs)}: {type(exc).__name__}: {first_line(exc)}") from exc
        leaves = output_leaves(out)
        if not leaves:
            raise UnsupportedError(f"quant_report: {type(self.model).__name__} returned {type(out).__name__} with "
                                   "no floating tensor; the end-to-end error needs tensor outputs")
        return [t.detach() for t in leaves]

    def calibrate(self, batches: list[tuple[Any, ...]]) -> list[list[Tensor]]:
        """Observe every layer's output range; then the float outputs and activation SQNRs."""
        self.phase = "calibrate"
        try:
            for i, b in enumerate(batches):
                self.forward(b, i)
        finally:
            self.phase = "run"
        for layer in self.order:
            scale, _ = layer.act_obs.calculate_qparams()
            layer.act_scale = float(scale)
        self.phase = "measure"
        try:
            return self.run(batches)
        finally:
            self.phase = "run"

    def quantized_weight(self, layer: SimLayer, mode: str) -> Tensor:
        """``layer``'s weight fake-quantized ``per_tensor`` or ``per_channel`` (cached)."""
        if mode not in layer.quantized:
            layer.quantized[mode] = fake_quantize_weight(layer.weight, self.bits, per_channel=mode == "per_channel",
                                                         axis=self.axis)
        return layer.quantized[mode]

    def run(self, batches: list[tuple[Any, ...]], quantize: dict[SimLayer, str] | None = None) -> list[list[Tensor]]:
        """Outputs on ``batches`` with the layers of ``quantize`` simulated in integer
        (their weights in the given mode, their output activations per tensor); the
        other layers stay float."""
        quantize = quantize or {}
        try:
            for layer, mode in quantize.items():
                layer.weight_mode, layer.quant_act = mode, True
                if layer.conv is None:
                    with torch.no_grad():
                        layer.module.weight.copy_(self.quantized_weight(layer, mode))
                else:
                    self.quantized_weight(layer, mode)
            return [self.forward(b, i) for i, b in enumerate(batches)]
        finally:
            for layer in quantize:
                layer.weight_mode, layer.quant_act = None, False
                if layer.conv is None:
                    with torch.no_grad():
                        layer.module.weight.copy_(layer.weight)

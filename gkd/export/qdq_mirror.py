"""PyTorch fake quantization that mirrors an ONNX Runtime int8 QDQ graph (`gkd.export.quantize`): the student
QAD trains (`gkd.compress.qad`) computes what the int8 graph computes.

Library choice. NVIDIA Model Optimizer 0.47 fake-quantizes on CPU, but its quantized model does not reach ONNX
here: its int8 ONNX path is TorchScript ``symbolic`` functions (the legacy exporter, which fails on our UPerNet
decoder's adaptive pooling) and the dynamo exporter stops on a data-dependent branch in its quantizer (checked
with torch 2.14.1); its ``[onnx]`` extra also pins older onnx / onnxruntime. torchao 0.18's pt2e QAT exports a
QDQ graph that ONNX Runtime runs, but with its own scheme (asymmetric activations, its own op set and observers;
the ready quantizer lives under ``torchao.testing``), not the one our PTQ and TensorRT use. So QAD uses torch's
own fake-quant ops with the PTQ graph's scales, and the trained fp32 weights are quantized again by ONNX
Runtime with the PTQ calibration ranges: the exported graph is ONNX Runtime's QDQ with the same scheme.

Each activation QuantizeLinear of the int8 graph is a fake-quant point (per tensor, its fixed scale, zero point
0, saturating to [-128, 127] as QuantizeLinear does): the input of every quantized node; its output (a Linear's
before the bias Add, as the graph computes it; a Conv's after the BatchNorm the exporter folded into it, i.e. the
output of the module its name scope ends in). The attention products stay float in the int8 graph
(`gkd.export.quantize.activation_matmuls`), so they have no points.
Weights are fake-quantized per output channel (symmetric, max|w| / 127, recomputed from the current weights as
ONNX Runtime does when it quantizes them); a folded BatchNorm scales whole output channels, which per-channel
scales absorb. A quantized tensor that float ops read too is quantized as the output of the innermost module
of its producer's name scope (``at_producer``), so those ops read it quantized as in the graph. Gradients
pass straight through inside the clip range (the ops' STE). With `LearnedScales` the activation scales train too
(LSQ-style); `gkd.export.int8_qad` then quantizes the graph with them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from gkd.export.quantize import constant_names

QUANTIZED_MODULES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
ACTIVATION_RANGE = (-128, 127)  # QuantizeLinear's int8 saturation
WEIGHT_LEVELS = 127  # symmetric int8 weights: [-127, 127]
_SCOPES = "pkg.torch.onnx.name_scopes"


def fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-tensor symmetric int8 fake quantization at a fixed ``scale``."""
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, 0, *ACTIVATION_RANGE).to(x.dtype)


class WeightFakeQuant(nn.Module):
    """Parametrization: the weight fake-quantized per output channel ``axis`` (scale max|w| / 127)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(weight.dim()) if d != self.axis]
        scale = (weight.detach().float().abs().amax(dim=dims) / WEIGHT_LEVELS).clamp_min(1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        quantized = torch.fake_quantize_per_channel_affine(
            weight.float(), scale, zero, self.axis, -WEIGHT_LEVELS, WEIGHT_LEVELS
        )
        return quantized.to(weight.dtype)


@dataclass
class QuantPlan:
    """Where the student is fake-quantized, by module name, and which graph tensor each point is."""

    scales: dict[str, float] = field(default_factory=dict)  # graph tensor -> its activation scale
    weights: dict[str, int] = field(default_factory=dict)  # module -> per-channel axis
    inputs: dict[str, str] = field(default_factory=dict)  # module -> tensor of its input
    outputs: dict[str, str] = field(default_factory=dict)  # module -> tensor of its output
    pre_bias: dict[str, str] = field(default_factory=dict)  # Linear -> tensor of x W^T (before its bias)
    at_producer: list[str] = field(default_factory=list)  # quantized tensors float ops read too
    unmapped: list[str] = field(default_factory=list)  # quantized tensors with no point in the student

    def summary(self) -> dict:
        """Counts for the export record."""
        return {
            "weights": len(self.weights),
            "activation_points": len(self.inputs) + len(self.outputs) + len(self.pre_bias),
            "at_producer_module_output": len(self.at_producer),
            "unmapped": self.unmapped,
        }


# Trains a prepared student in place, fake-quantized by a plan (`gkd.compress.qad.train_qad`); returns its record.
QADTraining = Callable[[nn.Module, QuantPlan], dict]


def activation_scales(int8: onnx.ModelProto) -> dict[str, float]:
    """Scale of every activation tensor the graph quantizes (a QuantizeLinear on a non-constant input)."""
    constants = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    return {
        node.input[0]: float(constants[node.input[1]])
        for node in int8.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants
    }


def _scopes(node: onnx.NodeProto) -> list[str]:
    """The module names the exporter recorded for ``node``, outermost first (its op name dropped)."""
    meta = {prop.key: prop.value for prop in node.metadata_props}
    return [s for s in ast.literal_eval(meta.get(_SCOPES, "[]"))[:-1] if s]


def _innermost(node: onnx.NodeProto, modules: dict[str, nn.Module], kinds: tuple[type, ...] = (nn.Module,)) -> str:
    scopes = [s for s in _scopes(node) if isinstance(modules.get(s), kinds)]
    return scopes[-1] if scopes else ""


def quant_plan(fp32: onnx.ModelProto, int8: onnx.ModelProto, model: nn.Module) -> QuantPlan:
    """The fake-quant points of ``model`` (the module ``fp32`` was exported from) that mirror ``int8``."""
    scales = activation_scales(int8)
    modules = dict(model.named_modules())
    constants = constant_names(fp32)
    dequantized = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    weighted = {n.name for n in int8.graph.node if len(n.input) > 1 and n.input[1] in dequantized}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in fp32.graph.node:
        for name in node.input:
            consumers[name].append(node)
    producers = {name: node for node in fp32.graph.node for name in node.output}
    plan, covered = QuantPlan(scales=scales), set()
    for node in fp32.graph.node:
        if node.name not in weighted:
            continue
        if node.input[1] in constants:
            owner = node.input[1].rsplit(".", 1)[0]
            module = owner if isinstance(modules.get(owner), QUANTIZED_MODULES) else ""
            module = module or _innermost(node, modules, QUANTIZED_MODULES)
            if not module:
                continue
            plan.weights[module] = 1 if isinstance(modules[module], nn.ConvTranspose2d) else 0
            if node.input[0] in scales:
                plan.inputs[module] = node.input[0]
                covered.add(node.input[0])
                if any(c.name not in weighted for c in consumers[node.input[0]]):
                    _at_producer(node.input[0], plan, producers, modules)
            if node.output[0] in scales:
                if node.op_type == "MatMul":
                    plan.pre_bias[module] = node.output[0]
                else:
                    plan.outputs[_innermost(node, modules)] = node.output[0]
                covered.add(node.output[0])
    plan.unmapped = sorted(set(scales) - covered)
    return plan


def _at_producer(tensor: str, plan: QuantPlan, producers: dict, modules: dict) -> None:
    """A quantized tensor that float ops read too: fake-quantized as the output of the module that produced it
    (the innermost module of its producer's name scope), so every reader sees it quantized as in the graph."""
    module = _innermost(producers[tensor], modules) if tensor in producers else ""
    if module:
        plan.outputs.setdefault(module, tensor)
        plan.at_producer.append(tensor)


class LearnedScales(nn.Module):
    """Learnable activation scales (LSQ-style: rounding and clipping both in the gradient) of a plan's points,
    starting at its scales: ``scale = initial * exp(rate * p)``, ``rate`` the scales' step size relative to the
    weights' (one optimizer learning rate serves both)."""

    def __init__(self, scales: dict[str, float], rate: float) -> None:
        super().__init__()
        self.index = {tensor: i for i, tensor in enumerate(scales)}
        self.register_buffer("initial", torch.tensor(list(scales.values()), dtype=torch.float32))
        self.log_scale = nn.Parameter(torch.zeros(len(scales)))
        self.rate = rate

    def scale(self, tensor: str) -> torch.Tensor:
        i = self.index[tensor]
        return self.initial[i] * torch.exp(self.rate * self.log_scale[i])

    def forward(self, x: torch.Tensor, tensor: str) -> torch.Tensor:
        scale = self.scale(tensor)
        scaled = x.float() / scale
        rounded = scaled + (torch.round(scaled) - scaled).detach()  # straight-through rounding
        return (rounded.clamp(*ACTIVATION_RANGE) * scale).to(x.dtype)

    def values(self) -> dict[str, float]:
        """The current scale of every tensor."""
        return {tensor: float(self.scale(tensor)) for tensor in self.index}


# Fake-quantizes an activation as the graph quantizes the named tensor.
Quantizer = Callable[[torch.Tensor, str], torch.Tensor]


def _quantizer(plan: QuantPlan, learned: LearnedScales | None) -> Quantizer:
    if learned is not None:
        return learned
    return lambda x, tensor: fake_quant(x, plan.scales[tensor])


@contextmanager
def fake_quantized(model: nn.Module, plan: QuantPlan, learned: LearnedScales | None = None) -> Iterator[nn.Module]:
    """``model`` fake-quantized by ``plan`` inside the block (activations at ``learned``'s scales where given, else
    at the plan's); afterwards its weights are plain fp32 again (the trained values) and every hook is gone."""
    modules, quant = dict(model.named_modules()), _quantizer(plan, learned)
    handles = []
    for name, axis in plan.weights.items():
        parametrize.register_parametrization(modules[name], "weight", WeightFakeQuant(axis))
    for name, tensor in plan.inputs.items():
        handles.append(modules[name].register_forward_pre_hook(lambda _m, args, t=tensor: (quant(args[0], t),)))
    for name, tensor in plan.outputs.items():
        handles.append(modules[name].register_forward_hook(lambda _m, _a, out, t=tensor: quant(out, t)))
    for name, tensor in plan.pre_bias.items():
        handles.append(modules[name].register_forward_hook(_pre_bias_hook(lambda x, t=tensor: quant(x, t))))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for name in plan.weights:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)


def _pre_bias_hook(quant: Callable[[torch.Tensor], torch.Tensor]):
    """Fake-quantize a Linear's ``x W^T`` (its output less the bias), then add the bias back."""

    def hook(module: nn.Module, _args, out: torch.Tensor) -> torch.Tensor:
        if module.bias is None:
            return quant(out)
        return quant(out - module.bias) + module.bias

    return hook

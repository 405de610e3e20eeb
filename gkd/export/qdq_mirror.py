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
output of the module its name scope ends in); the attention product's operands and results (scaled q, scaled
k^T, scores, softmax probabilities, v, output), computed as the exporter decomposes scaled_dot_product_attention.
Weights are fake-quantized per output channel (symmetric, max|w| / 127, recomputed from the current weights as
ONNX Runtime does when it quantizes them); a folded BatchNorm scales whole output channels, which per-channel
scales absorb. A quantized tensor that float ops read too is quantized as the output of the innermost module
of its producer's name scope (``at_producer``), so those ops read it quantized as in the graph. Gradients
pass straight through inside the clip range (the ops' STE).
"""

from __future__ import annotations

import ast
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

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
class AttentionScales:
    """Scales of the attention product's points (None: not quantized in the graph)."""

    q: float | None = None
    k: float | None = None
    scores: float | None = None
    probs: float | None = None
    v: float | None = None
    out: float | None = None


@dataclass
class QuantPlan:
    """Where the student is fake-quantized, by module name."""

    weights: dict[str, int] = field(default_factory=dict)  # module -> per-channel axis
    inputs: dict[str, float] = field(default_factory=dict)  # module -> scale of its input
    outputs: dict[str, float] = field(default_factory=dict)  # module -> scale of its output
    pre_bias: dict[str, float] = field(default_factory=dict)  # Linear -> scale of x W^T (before its bias)
    attention: dict[str, AttentionScales] = field(default_factory=dict)  # module calling SDPA -> scales
    at_producer: list[str] = field(default_factory=list)  # quantized tensors float ops read too
    unmapped: list[str] = field(default_factory=list)  # quantized tensors with no point in the student

    def summary(self) -> dict:
        """Counts for the export record."""
        return {
            "weights": len(self.weights),
            "activation_points": len(self.inputs) + len(self.outputs) + len(self.pre_bias),
            "attention_modules": len(self.attention),
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
    constants = {i.name for i in fp32.graph.initializer}
    dequantized = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    weighted = {n.name for n in int8.graph.node if len(n.input) > 1 and n.input[1] in dequantized}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in fp32.graph.node:
        for name in node.input:
            consumers[name].append(node)
    producers = {name: node for node in fp32.graph.node for name in node.output}
    plan, covered = QuantPlan(), set()
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
                plan.inputs[module] = scales[node.input[0]]
                covered.add(node.input[0])
                if any(c.name not in weighted for c in consumers[node.input[0]]):
                    _at_producer(node.input[0], plan, scales, producers, modules)
            if node.output[0] in scales:
                if node.op_type == "MatMul":
                    plan.pre_bias[module] = scales[node.output[0]]
                else:
                    plan.outputs[_innermost(node, modules)] = scales[node.output[0]]
                covered.add(node.output[0])
        elif node.op_type == "MatMul":
            covered |= _attention_point(node, plan, scales, consumers, _innermost(node, modules))
    plan.unmapped = sorted(set(scales) - covered)
    return plan


def _at_producer(tensor: str, plan: QuantPlan, scales: dict, producers: dict, modules: dict) -> None:
    """A quantized tensor that float ops read too: fake-quantized as the output of the module that produced it
    (the innermost module of its producer's name scope), so every reader sees it quantized as in the graph."""
    module = _innermost(producers[tensor], modules) if tensor in producers else ""
    if module:
        plan.outputs.setdefault(module, scales[tensor])
        plan.at_producer.append(tensor)


def _attention_point(node: onnx.NodeProto, plan: QuantPlan, scales: dict, consumers: dict, module: str) -> set[str]:
    """Record an attention MatMul (both operands activations) of ``module``; returns the tensors it covers."""
    entry = plan.attention.setdefault(module, AttentionScales())
    softmax = [c for c in consumers[node.output[0]] if c.op_type == "Softmax"]
    if softmax:  # scores = (q s) @ (k^T s)
        probs = softmax[0].output[0]
        entry.q, entry.k = scales.get(node.input[0]), scales.get(node.input[1])
        entry.scores, entry.probs = scales.get(node.output[0]), scales.get(probs)
        return {node.input[0], node.input[1], node.output[0], probs}
    entry.v, entry.out = scales.get(node.input[1]), scales.get(node.output[0])  # out = probs @ v
    return {node.input[1], node.output[0]}


def _maybe(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    return x if scale is None else fake_quant(x, scale)


def quantized_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScales, scale: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention as the exporter decomposes it (q and k^T each times the root of the scale,
    default ``1 / sqrt(head dim)``), fake-quantized at ``s``'s points."""
    root = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    scores = _maybe(_maybe(q * root, s.q) @ _maybe(k.transpose(-2, -1) * root, s.k), s.scores)
    probs = _maybe(torch.softmax(scores, dim=-1), s.probs)
    return _maybe(probs @ _maybe(v, s.v), s.out)


class _AttentionMode(TorchFunctionMode):
    """Replaces ``F.scaled_dot_product_attention`` inside the modules of ``plan.attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.current: AttentionScales | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and not kwargs.get("is_causal")
        if func is F.scaled_dot_product_attention and self.current is not None and plain and len(args) == 3:
            return quantized_attention(*args, self.current, kwargs.get("scale"))
        return func(*args, **kwargs)


@contextmanager
def fake_quantized(model: nn.Module, plan: QuantPlan) -> Iterator[nn.Module]:
    """``model`` fake-quantized by ``plan`` inside the block; afterwards its weights are plain fp32 again (the
    trained values) and every hook is gone."""
    modules = dict(model.named_modules())
    mode, handles = _AttentionMode(), []
    for name, axis in plan.weights.items():
        parametrize.register_parametrization(modules[name], "weight", WeightFakeQuant(axis))
    for name, scale in plan.inputs.items():
        handles.append(modules[name].register_forward_pre_hook(lambda _m, args, s=scale: (fake_quant(args[0], s),)))
    for name, scale in plan.outputs.items():
        handles.append(modules[name].register_forward_hook(lambda _m, _a, out, s=scale: fake_quant(out, s)))
    for name, scale in plan.pre_bias.items():
        handles.append(modules[name].register_forward_hook(_pre_bias_hook(scale)))
    for name, scales in plan.attention.items():
        handles.append(modules[name].register_forward_pre_hook(lambda _m, _a, s=scales: setattr(mode, "current", s)))
        handles.append(modules[name].register_forward_hook(lambda _m, _a, _o: setattr(mode, "current", None)))
    try:
        with mode:
            yield model
    finally:
        for handle in handles:
            handle.remove()
        for name in plan.weights:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)


def _pre_bias_hook(scale: float):
    """Fake-quantize a Linear's ``x W^T`` (its output less the bias), then add the bias back."""

    def hook(module: nn.Module, _args, out: torch.Tensor) -> torch.Tensor:
        if module.bias is None:
            return fake_quant(out, scale)
        return fake_quant(out - module.bias, scale) + module.bias

    return hook

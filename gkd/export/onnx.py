"""ONNX export of a segmentor at a baked input size with a dynamic batch, and parity checks against PyTorch.

Every exported graph has one float32 input ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` and one float32 output
``logits`` ``(B, K, H, W)``, whatever its internal precision, so every runtime is called the same way.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import timm.layers
import torch
from onnx import helper
from timm.layers import Format
from torch import nn

from gkd.export.parity import ParityError, compare_logits, judge
from gkd.export.precisions import ParityTolerance
from gkd.models.backbone import official_dinov2_pos_embed_at
from gkd.models.segmentor import Segmentor
from gkd.utils.io import atomic_path

if TYPE_CHECKING:
    import onnxruntime

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# The protobuf limit: above it ONNX needs external data files, which no student of this project reaches.
MAX_SINGLE_FILE_BYTES = 2**31
# Normalisations computed in fp32 inside the fp16 graph (see `half_precision`).
FP32_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, timm.layers.RmsNorm)


class ExportError(RuntimeError):
    """An export that produced no usable artifact (a failed check, an unsupported graph)."""


def baked_size(segmentor: Segmentor, img_size: Sequence[int]) -> tuple[int, int]:
    """The pixels the encoder sees at ``img_size``: the backbone resizes up to the next multiple of the patch."""
    patch = segmentor.encoder.patch_size
    grid = segmentor.encoder.grid_size(*img_size)
    return grid[0] * patch, grid[1] * patch


def prepare_for_export(segmentor: Segmentor, img_size: Sequence[int]) -> Segmentor:
    """A deep copy in eval mode whose ViT runs at ``img_size`` only, with constant position embeddings.

    Our backbones are built with ``dynamic_img_size=True``: every forward resamples the position embedding
    (antialiased bicubic), and while exporting timm's ``resample_abs_pos_embed`` skips its same-size
    early-out, so the graph would carry a cubic, antialiased Resize that TensorRT's parser does not honour.
    ``set_input_size`` resamples once here, in PyTorch (DINOv2 models without registers: their official
    resampling, `gkd.models.backbone.official_dinov2_pos_embed_at`); switching the dynamic path off then leaves the
    embedding (and EVA02's RoPE table) a constant of the graph. Fused SDPA attention stays on: the dynamo
    exporter decomposes it (EVA02 included), only the legacy exporter needed it off.
    """
    model = copy.deepcopy(segmentor).eval()
    vit = model.encoder.model
    if getattr(vit, "dynamic_img_size", False):
        rope = getattr(vit, "rope", None)
        size = baked_size(model, img_size)
        official = official_dinov2_pos_embed_at(vit, model.encoder.grid_size(*size))
        vit.set_input_size(img_size=size)
        vit.dynamic_img_size = False
        if official is not None:  # the official DINOv2 resampling, not timm's, and timm's fixed-size _pos_embed
            with torch.no_grad():
                vit.pos_embed.copy_(official)
            del vit._pos_embed
        # timm builds a dynamic-size patch embedding as NHWC without flattening (the flatten happens after the
        # position embedding); the fixed-size path expects flattened NLC tokens, as a fixed-size model has.
        patch_embed = vit.patch_embed
        patch_embed.flatten = True
        patch_embed.output_fmt = Format.NCHW
        patch_embed.strict_img_size = True
        if rope is not None and getattr(rope, "pos_embed", None) is None:
            _bake_rope(rope, list(patch_embed.grid_size))
    return model


def _bake_rope(rope: nn.Module, grid: list[int]) -> None:
    # A dynamic-size EVA builds its RoPE without a cached table (feat_shape=None) and rebuilds the table each
    # forward, which exports as Range/If nodes; give it the cached-table mode a fixed-size EVA is built with.
    table = rope.get_embed(shape=grid)
    del rope.pos_embed
    rope.register_buffer("pos_embed", table, persistent=False)
    rope.feat_shape = grid
    rope._use_cached_embed = True


class _Float32(nn.Module):
    """Runs ``module`` in fp32 inside an fp16 / bf16 model: explicit Casts around it in the exported graph."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


class _Float32IO(nn.Module):
    """Float32 in and out around a reduced-precision model, so every artifact has the same interface."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.dtype)).float()


def half_precision(prepared: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """An fp16 (or bf16) copy of a prepared segmentor for a strongly typed graph (fp32 input and logits).

    Numerics: LayerNorm (and any other normalisation) computes in fp32 between explicit Casts, because the
    variance of fp16 ViT activations overflows 65504; a strongly typed TensorRT network keeps those Casts.
    Softmax stays fp16: the exporter's attention scales q and k by sqrt(1/sqrt(d)) each before their MatMul
    (bounding the scores), Softmax subtracts the row maximum, and Casts around it would break TensorRT's
    MatMul-Softmax-MatMul attention fusion.
    """
    model = copy.deepcopy(prepared).eval().to(dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FP32_NORMS):
                setattr(parent, name, _Float32(child))
    return _Float32IO(model, dtype).eval()


def unsafe_resizes(model: onnx.ModelProto) -> list[str]:
    """Resize nodes TensorRT's parser does not honour: cubic or antialiased (a resampled position embedding)."""
    unsafe = []
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("mode", b"nearest") == b"cubic" or attributes.get("antialias", 0):
            unsafe.append(node.name)
    return unsafe


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter's graph optimizer logs every rewrite and fold at INFO/WARNING (hundreds of lines per model)
    # through loggers that propagate to the run's root logger; only its errors matter to a run's log.
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    img_size: Sequence[int],
    opset: int = 18,
    batch_range: Sequence[int] = (1, 8, 32),
) -> dict:
    """Export a prepared CPU model to ``path`` (dynamo exporter, dynamic batch in ``batch_range``).

    The file is written atomically and only after `onnx.checker` and the Resize check pass.

    Args:
        model: the fixed-size model (`prepare_for_export`), on the CPU.
        path: the ``.onnx`` file to write.
        img_size: ``(H, W)`` of its input.
        opset: ONNX opset.
        batch_range: ``(min, opt, max)`` batch the graph must take.
    """
    path = Path(path)
    low, _, high = batch_range
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if parameter_bytes >= MAX_SINGLE_FILE_BYTES:
        raise ExportError(f"{parameter_bytes / 2**30:.1f} GiB of weights exceeds the 2 GiB single-file ONNX limit")
    # torch.export specialises dimensions of size 1, so a dynamic batch needs an example batch of at least 2.
    example = torch.rand(max(2, low) if high > 1 else 1, 3, *img_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=low, max=high)},) if high > 1 else None
    start = time.perf_counter()
    with atomic_path(path) as temp, _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(temp),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
        onnx.checker.check_model(str(temp), full_check=True)
        graph = onnx.load(str(temp))
        unsafe = unsafe_resizes(graph)
        if unsafe:
            raise ExportError(
                f"{path.name}: cubic/antialiased Resize nodes {unsafe} (a position-embedding resize: "
                "was the model passed through prepare_for_export?)"
            )
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "opset": opset,
        "batch_range": [low, high],
        "export_s": round(time.perf_counter() - start, 2),
        "ops": dict(sorted(Counter(node.op_type for node in graph.graph.node).items())),
    }


def onnxruntime_unavailable() -> str | None:
    """Why ONNX Runtime cannot run here, naming the extra that installs it; ``None`` when it imports.

    ONNX Runtime is in no default install (``[cpu]`` and ``[gpu]`` are alternatives), so a bare install
    exports ONNX files but cannot check or time them: the export and benchmark stages record that instead.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "install gkd-compress[cpu] (or [gpu]) for ONNX Runtime"
    return None


def onnx_session(
    path: str | Path, providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",), optimize: bool = True
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session; intra-op threads follow torch's so the runtimes compare on equal terms.
    ``optimize=False``: no graph optimizations (an int8 graph's Q/DQ then run as written, not fused)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ExportError(
            f"ONNX Runtime is not installed ({error}): pip install 'gkd-compress[cpu]' (or '[gpu]')"
        ) from error

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


@torch.no_grad()
def check_parity(
    torch_model: nn.Module, onnx_path: str | Path, images: torch.Tensor, tolerance: ParityTolerance
) -> dict:
    """Compare ONNX Runtime (CPU provider: the graph, not a device) with ``torch_model`` on ``images``.

    Returns the comparison judged against ``tolerance`` (``passed``, and ``reason`` when not; see
    `gkd.export.parity`). For a tight fp32 check pass a CPU model (CUDA convolutions default to TF32).

    Args:
        torch_model: the reference.
        onnx_path: the exported graph.
        images: ``(B, 3, H, W)`` inputs in ``[0, 1]``.
        tolerance: the precision's parity limits.
    """
    device = next(torch_model.parameters()).device
    reference = torch_model(images.to(device, torch.float32)).float().cpu().numpy()
    candidate = onnx_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: images.float().cpu().numpy()})[0]
    try:
        return judge(compare_logits(reference, candidate), tolerance)
    except ParityError as error:
        raise ParityError(f"{Path(onnx_path).name}: {error}") from error

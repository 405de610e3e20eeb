"""The deployment contract: what an exported artifact takes and returns, and the inference path the reported
mIoU went through. One dict, built here from the export summary and the recipe's ``evaluate`` mode and stride,
that ``export.json`` holds (``contract``), the model card lists and every Triton ``config.pbtxt`` states as
comments (`contract_lines` is its text form).
"""

from __future__ import annotations

from collections.abc import Sequence

from gkd.evaluate.inference import resolve_stride

METRIC_PATH = (
    "eval.json and benchmark.json's mIoU: each frame through this inference, its logits resized (bilinear) to the "
    "label's native size, argmax, one confusion matrix per split; gkd.Predictor runs the same path"
)


def _inference(size: list[int], mode: str, stride: Sequence[int] | None) -> dict:
    """The evaluation mode: how a frame of any size becomes logits at its own size."""
    if mode == "slide":
        stride = list(resolve_stride(size, stride))
        return {
            "mode": "slide",
            "window": size,
            "stride": stride,
            "steps": f"pad the frame to at least {size[0]}x{size[1]} (zeros, bottom/right), run windows of "
            f"{size[0]}x{size[1]} every {stride[0]}x{stride[1]} pixels (the last window flush with the edge), "
            "average the logits where windows overlap, crop the padding",
        }
    return {
        "mode": "whole",
        "size": size,
        "steps": f"resize the frame to {size[0]}x{size[1]} (bilinear, align_corners=False), run it, resize the "
        "logits back to the frame's size (bilinear)",
    }


def deployment_contract(export_summary: dict, mode: str, stride: Sequence[int] | None) -> dict:
    """What every artifact of ``export_summary`` takes and returns, and how the reported mIoU was computed.

    Args:
        export_summary: the export stage's summary (input size, tensor names and shapes, normalisation, batches).
        mode: the recipe's ``evaluate.mode``, ``whole`` or ``slide``.
        stride: the recipe's ``evaluate.stride`` (``None``: 2/3 of the window).
    """
    source, result = export_summary["input"], export_summary["output"]
    normalisation = export_summary.get("normalisation", {})
    return {
        "input": {
            "name": source["name"],
            "layout": "NCHW",
            "shape": source["shape"],
            "size": export_summary["img_size"],
            "dtype": source["dtype"],
            "channels": "RGB",
            "range": source["range"],
            "normalisation_in_graph": True,
            "mean": normalisation.get("mean"),
            "std": normalisation.get("std"),
        },
        "output": {
            "name": result["name"],
            "layout": "NCHW",
            "shape": result["shape"],
            "dtype": result["dtype"],
            "values": "logits (before softmax); the class of a pixel is the argmax over axis 1",
            "at_input_resolution": result["shape"][2:] == source["shape"][2:],
        },
        "batch_range": export_summary["batch_range"],
        "inference": _inference([int(s) for s in export_summary["img_size"]], mode, stride),
        "metric": METRIC_PATH,
    }


def contract_lines(contract: dict) -> list[str]:
    """The contract as plain sentences, one per line (the model card's list, Triton's config comments)."""
    source, result, inference = contract["input"], contract["output"], contract["inference"]
    height, width = source["size"]
    normalisation = (
        f"(x - mean) / std with mean {source['mean']}, std {source['std']} happens inside the graph: do not normalise"
        if source["mean"] is not None
        else "mean/std normalisation happens inside the graph: do not normalise"
    )
    resolution = "at the input's resolution" if result["at_input_resolution"] else "not at the input's resolution"
    mode = inference["mode"]
    if mode == "slide":
        mode += f", window {height}x{width}, stride {inference['stride'][0]}x{inference['stride'][1]}"
    low, _, high = contract["batch_range"]
    return [
        f"input `{source['name']}`: {source['dtype']} {source['layout']} {source['shape']}, "
        f"{source['channels']} in [{source['range'][0]:g}, {source['range'][1]:g}], batch {low} to {high}",
        f"normalisation: {normalisation}",
        f"output `{result['name']}`: {result['dtype']} {result['layout']} {result['shape']}, "
        f"logits {resolution}, class = argmax over axis 1",
        f"reported mIoU: {mode} inference: {inference['steps']}",
    ]

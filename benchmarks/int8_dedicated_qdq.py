"""Does giving each consumer its own Q/DQ pair (ONNX Runtime's ``DedicatedQDQPair``) let ONNX Runtime fuse the weight
MatMuls it leaves float? Quantizes a graph of `int8_speed.py` both ways (its ``matmul_conv`` calibration cache), counts
the ops after ONNX Runtime's optimizations and times the two interleaved at batch 1.

    python benchmarks/int8_speed.py --img-size 512 --variants matmul_conv --work-dir /tmp/w --out /tmp/o
    python benchmarks/int8_dedicated_qdq.py --graphs /tmp/w --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import gkd.export.quantize as quantize

SHOWN_OPS = ("QLinearMatMul", "MatMul", "QLinearConv", "Conv", "DequantizeLinear", "QuantizeLinear")


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=Path, required=True, help="int8_speed.py's --work-dir")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fp32 = args.graphs / "fp32.onnx"
    height, width = (
        dim.dim_value
        for dim in onnx.load(str(fp32), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[2:]
    )
    sessions = {}
    for name, dedicated in (("shared", False), ("dedicated", True)):
        quantize._QDQ_OPTIONS = {**quantize._QDQ_OPTIONS, "DedicatedQDQPair": dedicated}
        path = args.graphs / f"qdq_{name}.onnx"
        calibration = torch.rand(8, 3, height, width)  # unused: the cache holds the ranges
        quantize.quantize_int8(fp32, path, calibration, calibration_cache=args.graphs / "calibration_matmul_conv.json")
        optimized = args.graphs / f"qdq_{name}_optimized.onnx"
        sessions[name] = session(path, args.threads, optimized)
        ops = Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)
        print(name, "after optimization:", {op: ops[op] for op in SHOWN_OPS})
    image = np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)
    feed = {sessions["shared"].get_inputs()[0].name: image}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(3):
        for run in sessions.values():
            run.run(None, feed)
    for _ in range(args.rounds):
        for name, run in sessions.items():
            start = time.perf_counter()
            run.run(None, feed)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["shared"], times["dedicated"], strict=True))
    medians = {name: round(statistics.median(values) * 1000, 1) for name, values in times.items()}
    print(f"batch 1 median ms: {medians}; median shared/dedicated per round: {ratio:.3f}")


if __name__ == "__main__":
    main()

"""ONNX Runtime's profiler on one graph: which kernels ran and where the time went, per op type and op class.

A session with ``enable_profiling`` runs warm-up calls, then the profiled calls; its trace (Chrome trace JSON: a
list of events) holds one ``"cat": "Node"`` event per kernel run (``name`` ending in ``_kernel_time``, ``dur`` in
microseconds, ``args.op_name`` the op type the kernel registered, fused ones included) and one ``model_run``
session event per call. Only the kernels inside the last ``calls`` ``model_run`` windows are counted. The op names
below are those real traces showed (ONNX Runtime 1.32, CPU provider: fp32 and static QDQ, static QOperator and
dynamic int8 graphs of `int8_speed.py`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from gkd.export.onnx import INPUT_NAME, OUTPUT_NAME

QUANTIZE_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
INT8_OPS = {"ConvInteger", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm"}
FLOAT_COMPUTE_OPS = {"Conv", "ConvTranspose", "FusedConv", "FusedGemm", "FusedMatMul", "Gemm", "MatMul"}
CLASSES = ("int8 compute", "float compute", "quantize/dequantize", "other float")
TOP_OPS = 8


def op_class(op_type: str) -> str:
    """The `CLASSES` entry of ``op_type``: int8 kernels are the `INT8_OPS` and every ``QLinear*`` (QLinearMatMul,
    QLinearConv, QLinearSoftmax, QLinearAdd, QLinearMul, QLinearConcat in the traces)."""
    if op_type in INT8_OPS or op_type.startswith("QLinear"):
        return "int8 compute"
    if op_type in FLOAT_COMPUTE_OPS:
        return "float compute"
    return "quantize/dequantize" if op_type in QUANTIZE_OPS else "other float"


def summarize_trace(events: list[dict], calls: int) -> dict:
    """Per op type and per class: ms per call, share of the summed kernel time, nodes per call (last ``calls``
    runs of the trace ``events``)."""
    runs = sorted((event["ts"], event["ts"] + event["dur"]) for event in events if event["name"] == "model_run")
    if len(runs) < calls:
        raise ValueError(f"the trace has {len(runs)} runs, {calls} profiled calls expected")
    windows = runs[-calls:]
    micros: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if any(start <= event["ts"] <= end for start, end in windows):
            micros[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    total = sum(micros.values())
    op_types = {
        op: {"ms_per_call": micros[op] / calls / 1e3, "share": micros[op] / total, "nodes": nodes[op] // calls}
        for op in sorted(micros, key=micros.get, reverse=True)
    }
    classes = {name: {"ms_per_call": 0.0, "share": 0.0} for name in CLASSES}
    for op, entry in op_types.items():
        for key in ("ms_per_call", "share"):
            classes[op_class(op)][key] += entry[key]
    return {"node_ms_per_call": total / calls / 1e3, "classes": classes, "op_types": op_types}


def profile_graph(path: Path, batch: np.ndarray, threads: int, calls: int, trace_dir: Path, warmup: int = 2) -> dict:
    """Profile ``calls`` runs of ``path`` on ``batch`` after ``warmup`` ones (CPU provider, ``threads`` intra-op
    threads, ONNX Runtime's default graph optimizations, I/O bound as `OnnxRuntime` runs); the trace is deleted."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(trace_dir / f"ort_profile_{path.stem}")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    staged = ort.OrtValue.ortvalue_from_numpy(batch)

    def run() -> None:
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, staged)
        binding.bind_output(OUTPUT_NAME)
        session.run_with_iobinding(binding)

    for _ in range(warmup):
        run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    wall_ms = (time.perf_counter() - start) / calls * 1e3
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink()
    return {"calls": calls, "wall_ms_per_call": wall_ms, **summarize_trace(events, calls)}


def profile_markdown(profiles: dict[str, dict], batch_size: int) -> list[str]:
    """The profile table (rows = graphs, columns = the classes' ms per call and share) and each graph's top op
    types by time."""
    calls = next((entry["calls"] for entry in profiles.values() if "calls" in entry), 0)
    columns = ["graph", "wall ms", "kernel ms", *CLASSES]
    lines = [
        f"ONNX Runtime profiler, batch {batch_size}, {calls} calls per graph; ms per call (share of the kernel "
        "time). Profiled calls run slower than the timed ones: wall - kernel is the executor's and the profiler's "
        "overhead.",
        "",
        f"| {' | '.join(columns)} |",
        f"|---|{'|'.join('---:' for _ in columns[1:])}|",
    ]
    tops = []
    for name, entry in profiles.items():
        if "error" in entry:
            lines.append(f"| {name} | {entry['error']} |")
            continue
        cells = [f"{entry['wall_ms_per_call']:.2f}", f"{entry['node_ms_per_call']:.2f}"]
        cells += [f"{c['ms_per_call']:.2f} ({c['share']:.0%})" for c in entry["classes"].values()]
        lines.append(f"| {name} | {' | '.join(cells)} |")
        top = list(entry["op_types"].items())[:TOP_OPS]
        ops = ", ".join(f"{op} {e['ms_per_call']:.2f} ({e['share']:.0%}, {e['nodes']} nodes)" for op, e in top)
        tops.append(f"- {name}: {ops}")
    return [*lines, "", f"Top {TOP_OPS} op types by kernel time, ms per call:", "", *tops]

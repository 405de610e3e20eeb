"""Where int8 pays in ONNX Runtime on this CPU: fp32 against every int8 variant, timed interleaved.

Builds a ViT-S/16 + UPerNet (width 256, random weights: speed does not depend on them), exports it to ONNX fp32
and quantizes it with ONNX Runtime's quantizer in every variant: static activations (calibrated on random
images, `gkd.export.quantize.quantize_int8`) in QDQ or QOperator format, dynamic activations
(``quantize_dynamic``: QOperator only); weights per channel or per tensor; quantized op types MatMul with a
constant weight only (``matmul``), those and the convolutions (``matmul_conv``, the pipeline's default: the
attention products stay float), those and the attention products (``matmul_conv_attention``, QDQ only), or every
op the quantizer handles, attention MatMuls included (``all``). The first and last convolutions stay float in
every variant (`gkd.export.quantize.excluded_nodes`). All graphs are then loaded together and timed round-robin
(`gkd.export.interleaved.time_interleaved`) against ONNX Runtime fp32, per batch size. A variant that does not
quantize or load is recorded with its error. ``float_nodes``: MatMul / Gemm / Conv / ConvTranspose nodes left
computing in float (not every input dequantized). Writes ``int8_speed.json`` and ``int8_speed.md`` to ``--out``.

``--profile N``: after the timing, each graph that loads runs again in its own session with ONNX Runtime's
profiler (same threads, 2 warm-up calls, then N profiled calls at the first batch size; `ort_profile.py`): per op
type the kernel ms per call, share of the summed kernel time and nodes, per class (int8 compute, float compute,
quantize/dequantize, other float) ms and share, and the kernel sum against the profiled calls' wall time.

    python benchmarks/int8_speed.py --out benchmarks/int8_speed_cpu            # ViT-S/16 at 512, batch 1 and 8
    python benchmarks/int8_speed.py --img-size 64 --depth 4 --channels 32 --rounds 5 --out /tmp/smoke  # seconds
    python benchmarks/int8_speed.py --arch vit_small_patch16_224 --embed-dim 64 --depth 4 --num-heads 2 \\
        --channels 32 --num-classes 11 --img-size 144 192 --profile 20 --out /tmp/camvid  # the CamVid student
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from ort_profile import profile_graph, profile_markdown  # benchmarks/, on sys.path[0] when run as a script

from gkd.export.interleaved import time_interleaved
from gkd.export.latency import environment_info, staged_random_batch
from gkd.export.onnx import export_onnx, prepare_for_export
from gkd.export.quantize import QUANTIZED_OPS, excluded_nodes, quantize_int8
from gkd.export.runtimes.onnxruntime import OnnxRuntime
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.zoo import create_backbone
from gkd.report.frame_latency import table_header
from gkd.utils.cpu import choose_threads
from gkd.utils.io import write_json

REFERENCE = "fp32"
OP_SETS: dict[str, tuple[str, ...] | None] = {
    "matmul": ("MatMul",),
    "matmul_conv": QUANTIZED_OPS,
    "matmul_conv_attention": QUANTIZED_OPS,  # and the attention products (QDQ only: QOperator keeps them float)
    "all": None,
}
COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small", help="zoo spec or timm ViT name (random init)")
    parser.add_argument("--depth", type=int, default=12, help="ViT blocks (at least 4: UPerNet reads four)")
    parser.add_argument("--embed-dim", type=int, help="ViT width (default: the architecture's)")
    parser.add_argument("--num-heads", type=int, help="ViT attention heads (default: the architecture's)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[512], help="H W, or one int for a square")
    parser.add_argument("--channels", type=int, default=256, help="UPerNet width")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per batch size")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up calls of each graph")
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: the CPUs other processes leave)")
    parser.add_argument("--variants", nargs="+", default=["*"], help="fnmatch patterns of int8 variant names")
    parser.add_argument("--profile", type=int, default=0, help="profiled calls per graph (0: no profile)")
    parser.add_argument("--work-dir", type=Path, help="where the graphs are written (default: a temporary one)")
    parser.add_argument("--out", type=Path, required=True, help="folder for int8_speed.json and int8_speed.md")
    args = parser.parse_args(argv)
    if len(args.img_size) > 2:
        parser.error("--img-size takes H W or one int")
    args.img_size = (args.img_size[0], args.img_size[-1])
    return args


def backbone_kwargs(args: argparse.Namespace) -> dict[str, int]:
    """The timm kwargs the options give (``embed_dim``, ``num_heads``), beyond ``depth``."""
    given = {"embed_dim": args.embed_dim, "num_heads": args.num_heads}
    return {key: value for key, value in given.items() if value is not None}


def variants(patterns: list[str]) -> dict[str, dict]:
    """``{name: how}`` of the int8 variants whose name matches one of ``patterns``."""
    grid = {}
    for ops in OP_SETS:
        for per_channel in (True, False):
            weights = "per_channel" if per_channel else "per_tensor"
            for quant_format in ("QDQ",) if ops == "matmul_conv_attention" else ("QDQ", "QOperator"):
                grid[f"static/{quant_format}/{weights}/{ops}"] = {
                    "activations": "static", "format": quant_format, "per_channel": per_channel, "ops": ops
                }  # fmt: skip
            if ops != "matmul_conv_attention":
                grid[f"dynamic/QOperator/{weights}/{ops}"] = {
                    "activations": "dynamic", "format": "QOperator", "per_channel": per_channel, "ops": ops
                }  # fmt: skip
    return {name: how for name, how in grid.items() if any(fnmatch.fnmatch(name, p) for p in patterns)}


def build_model(args: argparse.Namespace) -> Segmentor:
    """The random-weight ViT + UPerNet to time."""
    torch.manual_seed(0)
    encoder = create_backbone(args.arch, depth=args.depth, **backbone_kwargs(args))
    decoder, layers = build_decoder(
        DecoderConfig(name="uper", channels=args.channels), encoder.embed_dim, encoder.depth, args.num_classes
    )
    return Segmentor(encoder, decoder, layers).eval()


def float_nodes(path: Path) -> dict:
    """Compute nodes (`COMPUTE_OPS`) left in float: some input not produced by a DequantizeLinear; op counts."""
    graph = onnx.load(str(path)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    floating = [
        node.name
        for node in graph.node
        if node.op_type in COMPUTE_OPS and not all(name in dequantized for name in node.input[:2])
    ]
    return {"float_nodes": len(floating), "ops": dict(sorted(Counter(node.op_type for node in graph.node).items()))}


def quantize(fp32: Path, path: Path, how: dict, calibration: torch.Tensor, cache: Path) -> dict:
    """Write the int8 variant ``how`` of ``fp32`` to ``path``."""
    if how["activations"] == "static":
        return quantize_int8(
            fp32, path, calibration, calibration_cache=cache, quant_format=how["format"],
            per_channel=how["per_channel"], op_types=OP_SETS[how["ops"]],
            float_attention=how["ops"] != "matmul_conv_attention",
        )  # fmt: skip
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = OP_SETS[how["ops"]]
    quantize_dynamic(
        fp32, path, op_types_to_quantize=None if ops is None else list(ops), per_channel=how["per_channel"],
        weight_type=QuantType.QInt8, nodes_to_exclude=excluded_nodes(onnx.load(str(fp32))),
        extra_options={"MatMulConstBOnly": ops is not None},
    )  # fmt: skip
    return {"file": path.name, "bytes": path.stat().st_size}


def export_graphs(args: argparse.Namespace, work_dir: Path) -> dict[str, dict]:
    """``{name: entry}``: the fp32 graph and every int8 variant, with its path or its error."""
    img_size = args.img_size
    fp32 = work_dir / "fp32.onnx"
    export_onnx(prepare_for_export(build_model(args), img_size), fp32, img_size, batch_range=(1, 8, 32))
    graphs = {REFERENCE: {"path": fp32, **float_nodes(fp32)}}
    calibration = torch.rand(args.calibration_images, 3, *img_size, generator=torch.Generator().manual_seed(0))
    for name, how in variants(args.variants).items():
        path = work_dir / f"{name.replace('/', '_')}.onnx"
        try:
            info = quantize(fp32, path, how, calibration, work_dir / f"calibration_{how['ops']}.json")
            graphs[name] = {**how, "path": path, "quantize": info, **float_nodes(path)}
        except Exception as error:  # a variant ONNX Runtime cannot quantize is recorded, the others still run
            graphs[name] = {**how, "error": f"{type(error).__name__}: {error}"}
    return graphs


def time_graphs(graphs: dict[str, dict], img_size: tuple[int, int], batch_size: int, args: argparse.Namespace) -> dict:
    """`time_interleaved` over every graph that loads, at ``batch_size``, against fp32."""
    runtimes, errors = {}, {}
    for name, entry in graphs.items():
        if "path" not in entry:
            continue
        try:
            runtimes[name] = OnnxRuntime(entry["path"], name, torch.device("cpu"), ["CPUExecutionProvider"])
        except Exception as error:  # e.g. an int8 kernel this build of ONNX Runtime does not have
            errors[name] = f"{type(error).__name__}: {error}"
    runs = {}
    for name, runtime in runtimes.items():
        staged = staged_random_batch(runtime, img_size, batch_size)
        runs[name] = lambda runtime=runtime, staged=staged: runtime.run(staged)
    return {**time_interleaved(runs, args.rounds, args.warmup, REFERENCE, batch_size), "load_errors": errors}


def profile_graphs(graphs: dict[str, dict], args: argparse.Namespace, threads: int, trace_dir: Path) -> dict:
    """`profile_graph` of every graph that was written, at the first batch size; a session's error is recorded."""
    batch = np.random.default_rng(0).random((args.batch_sizes[0], 3, *args.img_size), dtype=np.float32)
    profiles = {}
    for name, entry in graphs.items():
        if "path" in entry:
            try:
                profiles[name] = profile_graph(entry["path"], batch, threads, args.profile, trace_dir)
            except Exception as error:  # e.g. an int8 kernel this build of ONNX Runtime does not have
                profiles[name] = {"error": f"{type(error).__name__}: {error}"}
    return profiles


def markdown(results: dict) -> str:
    """The table: per variant its float nodes, and per batch size its median ms and paired ratio to fp32; then the
    profile table, when there is one."""
    batches = list(results["timings"])
    columns = ["variant", "float nodes", *(f"b{b} {what}" for b in batches for what in ("median ms", "x fp32"))]
    lines = [f"`{results['command']}`", "", *table_header(*columns, numeric=columns[1:])]
    for name, graph in results["graphs"].items():
        cells = [name, str(graph.get("float_nodes", "n/a"))]
        for batch in batches:
            timing = results["timings"][batch]["runtimes"].get(name)
            ratio = timing and timing["ratio"]
            cells += (
                [f"{timing['median_ms']:.2f}", f"{ratio['median']:.3f} ({ratio['p10']:.3f}-{ratio['p90']:.3f})"]
                if timing
                else ["n/a", graph.get("error") or results["timings"][batch]["load_errors"].get(name, "n/a")]
            )
        lines.append(f"| {' | '.join(cells)} |")
    busy = {batch: timing["machine_busy"] for batch, timing in results["timings"].items()}
    lines += ["", f"threads {results['threads']}; machine busy per batch size: {busy}"]
    if "profile" in results:
        lines += ["", *profile_markdown(results["profile"], int(batches[0]))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)  # before any session: ONNX Runtime sessions copy torch's thread count
    img_size = args.img_size
    with tempfile.TemporaryDirectory(prefix="gkd-int8-speed-") as temp:
        work_dir = args.work_dir or Path(temp)
        work_dir.mkdir(parents=True, exist_ok=True)
        graphs = export_graphs(args, work_dir)
        timings = {str(batch): time_graphs(graphs, img_size, batch, args) for batch in args.batch_sizes}
        profiles = profile_graphs(graphs, args, threads, work_dir) if args.profile else None
    model = {"arch": args.arch, "depth": args.depth, **backbone_kwargs(args)}
    results = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv] if argv is None else ["int8_speed.py", *argv]),
        "model": {**model, "decoder": "uper", "channels": args.channels},
        "img_size": list(img_size),
        "threads": threads,
        "threads_why": why,
        "environment": environment_info(),
        "graphs": {name: {k: str(v) if k == "path" else v for k, v in g.items()} for name, g in graphs.items()},
        "timings": timings,
        **({"profile": profiles} if profiles is not None else {}),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "int8_speed.json", results)
    (args.out / "int8_speed.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

"""Latency harness (statistics, warm-up and synchronisation, a tiny model end to end), environment info,
the Pareto plot, and the benchmarks/latency.py script."""

from __future__ import annotations

import importlib.util
import itertools
import json
import time

import numpy as np
import pytest
import timm
import torch

from gkd.export.latency import benchmark_runtime, environment_info, latency_stats, measure_latency
from gkd.export.runtimes import TorchRuntime
from gkd.models.backbone import Backbone
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.report.pareto import MIN_MIOU_SPAN, pareto_figure, pareto_front, pareto_plot
from tests.helpers.paths import REPO


def tiny_segmentor() -> Segmentor:
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True, "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    backbone = Backbone("tiny", "vit_small_patch16_224", kwargs, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return Segmentor(backbone, *build_decoder(DecoderConfig(name="linear"), 32, 2, 5)).eval()


def test_latency_stats_percentiles_and_throughput():
    seconds = [0.010, 0.020, 0.030, 0.040, 0.100]
    stats = latency_stats(seconds, batch_size=4)
    assert stats["p50_ms"] == pytest.approx(30.0)
    assert stats["p90_ms"] == pytest.approx(76.0)  # linear interpolation: 40 + 0.6 * (100 - 40)
    assert stats["p99_ms"] == pytest.approx(97.6)
    assert stats["mean_ms"] == pytest.approx(40.0) and stats["min_ms"] == 10.0 and stats["max_ms"] == 100.0
    assert stats["images_per_s"] == pytest.approx(4 / 0.040)


def test_measure_latency_warms_up_and_synchronises_every_call():
    events: list[str] = []
    sleeps_ms = itertools.chain([1, 1, 1, 2, 4, 6, 8, 10, 12], itertools.repeat(2))  # 3 warm-up, 6 timed, ...

    def run() -> None:
        events.append("run")
        time.sleep(next(sleeps_ms) / 1e3)

    result = measure_latency(
        run, lambda: events.append("sync"), 2, torch.device("cpu"), iterations=6, warmup_iterations=3
    )
    assert events == ["run", "sync"] * 9  # 3 warm-up + 6 timed, each followed by a synchronisation
    assert result["iterations"] == 6 and result["warmup_iterations"] == 3 and result["batch_size"] == 2
    # a sleep lasts at least its time: each statistic is at least the one of the timed sleeps (the warm-up's
    # 1 ms are not timed); an upper bound would depend on how busy the machine is
    assert result["min_ms"] >= 2 and result["p50_ms"] >= 7 and result["max_ms"] >= 12 and result["mean_ms"] >= 7

    events.clear()
    result = measure_latency(
        run, lambda: None, 1, torch.device("cpu"), iterations=5, warmup_iterations=1, warmup_seconds=0.05
    )
    assert result["warmup_iterations"] >= 10 and result["warmup_s"] >= 0.05  # the time floor, not the count, ruled
    with pytest.raises(ValueError):
        measure_latency(run, lambda: None, 1, torch.device("cpu"), iterations=0)


def test_benchmark_runtime_on_a_tiny_model():
    runtime = TorchRuntime(tiny_segmentor(), (32, 32), "fp32", torch.device("cpu"))
    assert runtime.predict(np.random.rand(3, 3, 32, 32).astype(np.float32)).shape == (3, 5, 32, 32)
    images, model_seconds = [], []  # counted and timed here, independently of the harness
    run = runtime.run

    def counted_run(staged):
        start = time.perf_counter()
        output = run(staged)
        model_seconds.append(time.perf_counter() - start)
        images.append(staged.shape[0])
        return output

    runtime.run = counted_run
    start = time.perf_counter()
    result = benchmark_runtime(runtime, (32, 32), batch_size=2, iterations=8, warmup_iterations=2)
    wall_seconds = time.perf_counter() - start
    assert result["iterations"] == 8 and result["batch_size"] == 2 and images == [2] * 10
    # throughput over the 8 timed calls: no more than their images over the model's own time in them, no less
    # than their images over the whole call (warm-up, staging and the harness included)
    assert sum(images[2:]) / wall_seconds < result["images_per_s"] <= sum(images[2:]) / sum(model_seconds[2:])
    assert result["peak_memory_mib"] >= result["memory_baseline_mib"] > 0
    assert result["memory_kind"].startswith("process_rss_peak")


def test_peak_memory_belongs_to_the_timed_span():
    held: list[torch.Tensor] = []
    result = measure_latency(
        lambda: held.append(torch.ones(25_000_000)), lambda: None, 1, torch.device("cpu"), 5, warmup_iterations=0
    )  # 100 MB per call, all kept: the peak grows by ~500 MB over the baseline
    growth = result["peak_memory_mib"] - result["memory_baseline_mib"]
    assert growth >= 450
    if result["memory_kind"] == "process_rss_peak":  # the span's own peak, not an earlier one (clear_refs allowed)
        assert growth <= 700


def test_torch_runtime_refuses_reduced_precision_on_cpu():
    with pytest.raises(ValueError, match="only benchmarked on CUDA"):
        TorchRuntime(tiny_segmentor(), (32, 32), "bf16", torch.device("cpu"))


def test_environment_info():
    info = environment_info()
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["timm"] == timm.__version__
    assert info["torch_threads"] == torch.get_num_threads() and info["cpu"]
    assert (info["gpu"] is None) == (not torch.cuda.is_available())
    json.dumps(info)  # goes into the stage summaries as is


def test_pareto_front_and_plot(tmp_path):
    points = [
        {"label": "torch/fp32", "latency_ms": 10.0, "miou": 60.0},
        {"label": "ort/fp16", "latency_ms": 5.0, "miou": 59.5},
        {"label": "ort/int8", "latency_ms": 3.0, "miou": 58.0},
        {"label": "slow", "latency_ms": 12.0, "miou": 55.0},  # slower and worse than torch/fp32
        {"label": "same-speed-worse", "latency_ms": 5.0, "miou": 50.0},
    ]
    assert pareto_front(points) == [2, 1, 0]
    path = pareto_plot(points, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        pareto_plot([], tmp_path / "empty.png")


def test_pareto_labels_do_not_overlap_and_equal_accuracies_look_equal():
    # the default run's case: four runtimes with one mIoU to a hundredth, two of them nearly as fast
    points = [
        {"label": "torch/fp32", "latency_ms": 2.48, "miou": 35.61},
        {"label": "onnxruntime/fp32", "latency_ms": 0.83, "miou": 35.61},
        {"label": "aoti/fp32", "latency_ms": 0.86, "miou": 35.61},
        {"label": "onnxruntime/fp16", "latency_ms": 0.85, "miou": 35.60},
    ]
    figure = pareto_figure(points)
    low, high = figure.axes[0].get_ylim()
    assert high - low >= MIN_MIOU_SPAN - 1e-9 and low < 35.6 < high
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in figure.axes[0].texts]
    assert len(boxes) == len(points)
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            assert not first.overlaps(second), (first, second)


def _latency_script():
    spec = importlib.util.spec_from_file_location("latency_script", REPO / "benchmarks" / "latency.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_latency_script_writes_results(tmp_path):
    script = _latency_script()
    out = tmp_path / "results.json"
    argv = [
        "--arch", "vit_small_patch16_224", "--timm-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
        "--decoder", "linear", "--num-classes", "3", "--img-size", "32", "--batch-sizes", "1", "2",
        "--iterations", "5", "--warmup", "1", "--warmup-seconds", "0", "--precisions", "fp32",
        "--no-aoti", "--device", "cpu", "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    script.main(argv)
    results = json.loads(out.read_text())
    assert results["command"].startswith("latency.py --arch vit_small_patch16_224")
    assert set(results["benchmark"]["runtimes"]) == {"torch/fp32", "onnxruntime/fp32"}
    for entry in results["benchmark"]["runtimes"].values():
        assert set(entry["latency"]) == {"1", "2"} and entry["latency"]["2"]["p50_ms"] > 0
    assert results["export"]["artifacts"]["onnx/fp32"]["parity"]["max_abs_diff"] < 1e-4
    paired = results["benchmark"]["paired"]  # batch 1, both runtimes interleaved, against ONNX Runtime fp32
    assert paired["reference"] == "onnxruntime/fp32" and paired["batch_size"] == 1 and paired["rounds"] == 5
    assert paired["order"] == list(results["benchmark"]["runtimes"]) and paired["skipped"] == {}
    assert paired["threads"] == torch.get_num_threads() and isinstance(paired["machine_busy"], bool)
    assert set(paired["other_cpus"]) == {"before", "during", "after"}
    assert paired["runtimes"]["onnxruntime/fp32"]["ratio"]["median"] == 1.0
    assert paired["runtimes"]["torch/fp32"]["median_ms"] > 0 and paired["runtimes"]["torch/fp32"]["ratio"]["median"] > 0
    assert "paired" in results["benchmark"]["notes"]


def test_latency_script_times_pytorch_alone_without_exporting(tmp_path):
    out, work = tmp_path / "results.json", tmp_path / "work"
    argv = [
        "--arch", "vit_small_patch16_224", "--timm-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
        "--decoder", "linear", "--num-classes", "3", "--img-size", "32", "--batch-sizes", "1",
        "--iterations", "5", "--warmup", "1", "--warmup-seconds", "0", "--runtimes", "torch", "torch-cudagraph",
        "--device", "cpu", "--work-dir", str(work), "--out", str(out),
    ]  # fmt: skip
    _latency_script().main(argv)
    results = json.loads(out.read_text())
    assert list(results["benchmark"]["runtimes"]) == ["torch/fp32"]  # no CUDA graph on CPU
    assert results["benchmark"]["paired"]["reference"] == "torch/fp32"
    assert results["export"]["artifacts"] == {} and not work.exists()

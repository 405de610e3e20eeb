"""Paired, interleaved latency (gkd/export/interleaved.py) and the int8 speed benchmark built on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gkd.export import interleaved
from gkd.export.interleaved import paired_ratio, spread_stats, time_interleaved
from tests.helpers.paths import REPO


@pytest.fixture
def other_cpus(monkeypatch) -> dict[str, float]:
    """What other processes use before / during / after the rounds, as the test sets it (idle by default)."""
    load = {"before": 0.0, "during": 0.0, "after": 0.0}
    samples = []

    def sample(seconds: float = 0.3) -> float:  # called before the warm-up, then after the rounds
        samples.append(seconds)
        return load["before"] if len(samples) % 2 else load["after"]

    class During:
        def start(self) -> During:
            return self

        def stop(self) -> float:
            return load["during"]

    monkeypatch.setattr(interleaved, "others_busy_cpus", sample)
    monkeypatch.setattr(interleaved, "OtherLoad", During)
    return load


class _FakeClock:
    """A clock the callables advance: each call costs its runtime's time times the round's slow-down, which
    drifts from 1x to 4x and changes whenever runtime ``a`` (the first of a round) is called."""

    def __init__(self) -> None:
        self.now, self.calls, self.slowdown = 0.0, [], 1.0

    def __call__(self) -> float:
        return self.now

    def runtime(self, name: str, seconds: float):
        def run() -> None:
            self.calls.append(name)
            if name == "a":
                self.slowdown = 1.0 + self.calls.count("a") % 4
            self.now += seconds * self.slowdown

        return run


def test_runtimes_are_warmed_up_then_timed_round_robin(other_cpus):
    clock = _FakeClock()
    runs = {name: clock.runtime(name, 0.001) for name in ("a", "b", "c")}
    result = time_interleaved(runs, rounds=4, warmup_iterations=2, reference="b", clock=clock)
    assert clock.calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 4
    assert result["order"] == ["a", "b", "c"] and result["rounds"] == 4 and result["reference"] == "b"
    assert result["threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="reference"):
        time_interleaved(runs, rounds=1, reference="d", clock=clock)


def test_paired_ratio_cancels_drift_that_hits_every_runtime_alike(other_cpus):
    clock = _FakeClock()
    runs = {"a": clock.runtime("a", 0.002), "b": clock.runtime("b", 0.004)}
    result = time_interleaved(runs, rounds=8, warmup_iterations=1, reference="b", batch_size=2, clock=clock)
    a, b = result["runtimes"]["a"], result["runtimes"]["b"]
    assert a["spread"] > 0.5 and b["spread"] > 0.5  # the rounds slowed down 1x to 4x
    assert a["ratio"] == pytest.approx({"median": 0.5, "p10": 0.5, "p90": 0.5, "spread": 0.0})
    assert b["ratio"]["median"] == pytest.approx(1.0)
    assert a["images_per_s"] == pytest.approx(2e3 / a["median_ms"])


def test_spread_and_ratio_statistics():
    stats = spread_stats([0.001, 0.002, 0.003, 0.004, 0.005])
    assert stats["min_ms"] == pytest.approx(1.0) and stats["median_ms"] == pytest.approx(3.0)
    assert stats["p10_ms"] == pytest.approx(1.4) and stats["p90_ms"] == pytest.approx(4.6)
    assert stats["iqr_ms"] == pytest.approx(2.0) and stats["spread"] == pytest.approx(3.2 / 3.0)
    ratio = paired_ratio([1.0, 2.0, 6.0], [2.0, 2.0, 2.0])
    assert ratio["median"] == pytest.approx(1.0) and ratio["p10"] == pytest.approx(0.6)
    assert ratio["p90"] == pytest.approx(2.6) and ratio["spread"] == pytest.approx(2.0)


@pytest.mark.parametrize("when", ["before", "during", "after"])
def test_busy_machine_is_detected_and_said(other_cpus, when, caplog):
    other_cpus[when] = 1000.0
    clock = _FakeClock()
    result = time_interleaved({"a": clock.runtime("a", 0.001)}, rounds=2, warmup_iterations=0, clock=clock)
    assert result["machine_busy"] is True and result["other_cpus"][when] == 1000.0
    assert "interleaved latency measured while other processes used" in caplog.text


def test_idle_machine_is_not_busy(other_cpus):
    clock = _FakeClock()
    result = time_interleaved({"a": clock.runtime("a", 0.001)}, rounds=2, warmup_iterations=0, clock=clock)
    assert result["machine_busy"] is False
    assert result["other_cpus"] == {"before": 0.0, "during": 0.0, "after": 0.0}


def test_int8_speed_script_smoke(tmp_path):
    out = tmp_path / "out"
    argv = [
        "--img-size", "32", "--depth", "4", "--channels", "16", "--batch-sizes", "1", "2", "--rounds", "3",
        "--warmup", "1", "--calibration-images", "2", "--threads", "1", "--out", str(out), "--profile", "2",
        "--variants", "static/QDQ/per_channel/matmul_conv*", "dynamic/QOperator/per_tensor/matmul",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "int8_speed.py"), *argv], check=True, env=env, timeout=120
    )
    results = json.loads((out / "int8_speed.json").read_text())
    attention = "static/QDQ/per_channel/matmul_conv_attention"
    names = ["fp32", "static/QDQ/per_channel/matmul_conv", attention, "dynamic/QOperator/per_tensor/matmul"]
    assert sorted(results["graphs"]) == sorted(names) and results["threads"] == 1
    names = list(results["graphs"])
    graphs = results["graphs"]  # float: the first and last conv, and (by default) the 8 attention products
    assert graphs["static/QDQ/per_channel/matmul_conv"]["float_nodes"] == 2 + 2 * 4
    assert graphs[attention]["float_nodes"] == 2 and graphs[attention]["quantize"]["attention_matmuls"] == "int8"
    assert (
        results["graphs"]["fp32"]["float_nodes"]
        > results["graphs"]["dynamic/QOperator/per_tensor/matmul"]["float_nodes"]
    )
    for batch in ("1", "2"):
        timing = results["timings"][batch]
        assert timing["reference"] == "fp32" and timing["rounds"] == 3 and timing["batch_size"] == int(batch)
        assert list(timing["runtimes"]) == names and timing["runtimes"]["fp32"]["ratio"]["median"] == 1.0
    table = (out / "int8_speed.md").read_text()
    assert "| static/QDQ/per_channel/matmul_conv | 10 |" in table
    profile = results["profile"]  # ONNX Runtime's profiler: 2 calls per graph at batch 1
    assert list(profile) == names
    for name, entry in profile.items():
        assert entry["calls"] == 2 and entry["wall_ms_per_call"] > entry["node_ms_per_call"] > 0
        assert sum(c["share"] for c in entry["classes"].values()) == pytest.approx(1.0)
        assert sum(op["share"] for op in entry["op_types"].values()) == pytest.approx(1.0)
        assert all(op["nodes"] > 0 for op in entry["op_types"].values())
        assert f"| {name} | {entry['wall_ms_per_call']:.2f} | {entry['node_ms_per_call']:.2f} |" in table
    assert profile["fp32"]["classes"]["int8 compute"]["ms_per_call"] == 0
    assert profile["fp32"]["classes"]["float compute"]["ms_per_call"] > 0
    assert "MatMul" in profile["fp32"]["op_types"] and "QLinearMatMul" not in profile["fp32"]["op_types"]
    qdq = profile["static/QDQ/per_channel/matmul_conv"]
    assert qdq["classes"]["int8 compute"]["ms_per_call"] > 0
    assert qdq["classes"]["quantize/dequantize"]["ms_per_call"] > 0
    assert {"QLinearMatMul", "QLinearConv", "QuantizeLinear"} <= set(qdq["op_types"])
    assert "DynamicQuantizeMatMul" in profile["dynamic/QOperator/per_tensor/matmul"]["op_types"]
    assert "| graph | wall ms | kernel ms | int8 compute | float compute | quantize/dequantize | other float |" in table

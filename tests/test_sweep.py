"""`gkd-compress sweep` in miniature: two tiny students from the tiny recipe, trained through compare's pool,
exported and benchmarked in every runtime, the Pareto front and the latency-budget answer; a re-run reuses."""

from __future__ import annotations

import itertools
import json

import pytest

from gkd.cli import main
from gkd.recipe import load_recipe
from gkd.sweep import best_under, parse_img_size, parse_student, sized_recipe, sweep_recipe
from tests.helpers.paths import TINY_SWEEP

SMALL = "vit_small_patch16_224,embed_dim=24,depth=4,num_heads=2"
LARGER = "vit_small_patch16_224,embed_dim=48,depth=4,num_heads=2"


def test_student_specs_and_sizes():
    spec = parse_student("deit_small,weights=deit_small.safetensors,drop_path_rate=0.1")
    assert (spec.name, spec.kwargs, spec.weights) == ("deit_small", {"drop_path_rate": 0.1}, "deit_small.safetensors")
    assert parse_student(SMALL).key == "vit_small_patch16_224-embed_dim-24-depth-4-num_heads-2"
    with pytest.raises(ValueError, match="key=value"):
        parse_student("deit_small,depth")
    assert parse_img_size("512") == (512, 512) and parse_img_size("144x192") == (144, 192)
    with pytest.raises(ValueError):
        parse_img_size("big")

    recipe = load_recipe(TINY_SWEEP)
    sized = sized_recipe(recipe, (96, 128))
    assert sized.data.img_size == (96, 128) and sized.data.train_transform.crop_size == (96, 128)
    assert sized.models.student.kwargs["img_size"] == [96, 128]
    variant = sweep_recipe(recipe, [parse_student(SMALL)])
    (method,) = variant.compare.methods.values()
    assert method.overrides["models"]["student"]["kwargs"] == {"embed_dim": 24, "depth": 4, "num_heads": 2}
    assert variant.models.student.kwargs == {"img_size": 112}  # the base student's shape is not merged in


@pytest.mark.slow
def test_sweep_trains_benchmarks_and_draws_the_front(tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", str(TINY_SWEEP), "--students", SMALL, LARGER, "--out", str(out), "--workers", "1"]
    assert main([*argv, "--max-latency-ms", "1000"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    students = {point["student"] for point in summary["points"]}
    assert students == {parse_student(SMALL).key, parse_student(LARGER).key}
    runtimes = {point["runtime"] for point in summary["points"]}
    assert {"torch/fp32", "onnxruntime/fp32"} <= runtimes
    assert len(summary["points"]) == 2 * len(runtimes)
    front = [summary["points"][i] for i in summary["front"]]
    assert all(a["latency_ms"] <= b["latency_ms"] and a["miou"] < b["miou"] for a, b in itertools.pairwise(front))
    best = summary["best_under_max_latency"]
    assert best == best_under(summary["points"], 1000.0) and best["miou"] == max(p["miou"] for p in summary["points"])
    markdown = (out / "sweep.md").read_text()
    assert "Which student for a latency budget" in markdown and parse_student(LARGER).key in markdown
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    for point in summary["points"]:
        assert (out / point["student"] / "seed0" / "benchmark.json").is_file()

    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.safetensors")}
    benchmark_stamps = {path: path.stat().st_mtime_ns for path in out.rglob("benchmark.json")}
    assert main(argv) == 0  # everything reused: nothing trained or benchmarked again
    assert stamps == {path: path.stat().st_mtime_ns for path in out.rglob("*.safetensors")}
    assert benchmark_stamps == {path: path.stat().st_mtime_ns for path in out.rglob("benchmark.json")}

"""The whole pipeline on the tiny recipe: files, report contents, resume, and no re-training."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gkd.cli import main
from gkd.models.checkpoint import load_segmentor
from gkd.utils.errors import EXIT_INTERRUPTED
from tests.helpers.interrupted_distill import train_teacher_and_arm_interrupt
from tests.helpers.paths import DEFAULT_RECIPE, TINY_RECIPE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["run", str(TINY_RECIPE), "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_run_writes_every_artifact(finished_run):
    for name in (
        "recipe.resolved.yaml",
        "teacher_segmentor.safetensors",
        "student_encoder.safetensors",
        "segmentor.safetensors",
        "no_kd_segmentor.safetensors",
        "model.onnx",
        "report.json",
        "report.md",
        "MODEL_CARD.md",
    ):
        assert (finished_run / name).is_file(), name
    assert not list(finished_run.rglob("*.tmp"))  # nothing half-written


def test_report_has_domains_parity_and_latency(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    evaluated = json.loads((finished_run / "eval.json").read_text())["models"]
    for model in ("teacher", "no_kd", "student"):
        mious = report["models"][model]["miou"]
        assert set(mious) == {"source", "dusk", "fog"}
        assert mious == {domain: metrics["miou"] for domain, metrics in evaluated[model]["domains"].items()}
    assert "stands in for a vision foundation model" in report["teacher_note"]
    # which data each model saw: the student's source, the teacher's world scenes, the held-out targets
    for split in ("generated day scenes", "The teacher was trained on labelled generated world scenes", "dusk", "fog"):
        assert split in report["setup_note"]
    parity = report["export"]["artifacts"]["onnx/fp32"]["parity"]
    assert parity["max_abs_diff"] < 1e-3 and parity["argmax_agreement"] > 0.99
    runtimes = report["benchmark"]["runtimes"]
    assert {"torch/fp32", "onnxruntime/fp32"} <= set(runtimes)
    markdown = (finished_run / "report.md").read_text()
    assert "dusk" in markdown and "p50" in markdown
    assert report["teacher_note"] in markdown and report["setup_note"] in markdown
    # the report draws the latency / mIoU plot from benchmark.json (the benchmark stage draws nothing)
    assert "pareto_plot" not in json.loads((finished_run / "benchmark.json").read_text())
    assert (finished_run / "pareto.png").read_bytes()[:4] == b"\x89PNG" and "![latency vs mIoU](pareto.png)" in markdown
    for key, entry in runtimes.items():  # the report's latency rows are benchmark.json's numbers
        for batch, latency in entry["latency"].items():
            assert f"| {key} | {batch} | {latency['p50_ms']:.2f} | {latency['p90_ms']:.2f} |" in markdown


def test_model_card_carries_the_measured_numbers(finished_run):
    import yaml

    report = json.loads((finished_run / "report.json").read_text())
    card = (finished_run / "MODEL_CARD.md").read_text()
    _, front_matter, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front_matter)
    assert metadata["pipeline_tag"] == "image-segmentation" and metadata["datasets"] == ["synthetic"]
    assert metadata["license"] == "apache-2.0"  # generated data, random initialisations: only the project's licence
    results = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in metadata["model-index"][0]["results"]}
    student = report["models"]["student"]["miou"]
    assert results == {f"synthetic ({domain})": round(value, 2) for domain, value in student.items()}
    for section in (
        "## Model details",
        "## Training data and domains",
        "## Evaluation",
        "## Latency per runtime",
        "## Intended use and limits",
        "## Licences",
    ):
        assert section in body
    p50 = report["benchmark"]["runtimes"]["onnxruntime/fp32"]["latency"]["1"]["p50_ms"]
    assert f"| onnxruntime/fp32 | 1 | {p50:.2f} |" in body
    assert f"**Teacher**: {report['teacher_note']}" in body and report["setup_note"] in body
    assert f"| {student['fog']:.1f} |" in body or f" {student['fog']:.1f} |" in body


def test_student_encoder_loads_into_plain_timm(finished_run):
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=112, embed_dim=32, depth=4, num_heads=2
    )
    model.load_state_dict(load_file(finished_run / "student_encoder.safetensors"), strict=True)
    segmentor, metadata = load_segmentor(finished_run / "segmentor.safetensors")
    assert metadata["num_classes"] == 6
    images = torch.rand(2, 3, 112, 112)
    torch.testing.assert_close(
        model.eval().forward_features(images), segmentor.encoder.model.eval().forward_features(images)
    )


def test_rerun_after_finish_trains_nothing(finished_run, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in finished_run.glob("*.safetensors")}
    logs = {p: p.read_text() for p in (finished_run / "logs").glob("*.jsonl")}

    def refuse(*args, **kwargs):
        raise AssertionError("training ran again")

    monkeypatch.setattr("gkd.compress.trainer.Trainer.fit", refuse)
    assert main(["run", "--out", str(finished_run), "--device", "cpu"]) == 0  # its own recipe, from the run dir
    assert stamps == {p: p.stat().st_mtime_ns for p in finished_run.glob("*.safetensors")}
    assert logs == {p: p.read_text() for p in (finished_run / "logs").glob("*.jsonl")}


def test_killed_distillation_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    def kill() -> None:
        raise KeyboardInterrupt

    out = tmp_path / "run"
    # 1a done (6 steps), 1b killed during its step 4; checkpoint at 1b step 2
    calls = train_teacher_and_arm_interrupt(out, monkeypatch, interrupt=kill, at_call=10)
    assert main(["distill", "--out", str(out), "--device", "cpu"]) == EXIT_INTERRUPTED  # a crash, not Ctrl-C
    assert not (out / "student_encoder.safetensors").exists()
    calls.count = 0
    assert main(["distill", "--out", str(out), "--device", "cpu"]) == 0
    assert calls.count == 4  # 1b steps 3..6 only
    assert "distill_domain_agnostic: resumed at step 2" in (out / "logs" / "gkd.log").read_text()
    assert (out / "student_encoder.safetensors").is_file()


def test_run_dir_of_another_recipe_is_refused(finished_run, capsys):
    assert main(["run", "--out", str(finished_run), "--dry-run"]) == 0
    assert (
        main(
            [
                "evaluate",
                os.fspath(DEFAULT_RECIPE),
                "--out",
                str(finished_run),
            ]
        )
        == 2
    )
    assert "another recipe" in capsys.readouterr().err


def test_parity_miss_is_recorded_the_stage_completes_and_the_exit_code_says_so(finished_run, tmp_path):
    """fp32 parity held to zero difference: model.onnx misses it, yet every artifact is written, the benchmark
    and report run, and the command exits 1."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    recipe["export"]["parity"]["fp32"].update(atol=0.0, rtol=0.0)
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for stage in ("export", "benchmark", "report"):
        assert main([stage, "--out", str(run), "--device", "cpu"]) == 1, stage
    export = json.loads((run / "export.json").read_text())
    parity = export["artifacts"]["onnx/fp32"]["parity"]
    assert not parity["passed"] and parity["max_abs_diff"] > 0 == parity["limit"]
    assert export["failed"] == {"onnx/fp32": f"parity: {parity['reason']}"}
    assert export["artifacts"]["onnx/int8"]["parity"]["passed"]  # the stage went on after the miss
    benchmark = json.loads((run / "benchmark.json").read_text())
    assert not benchmark["ok"] and "onnx/fp32" in benchmark["export_failed"]
    assert "| onnx/fp32 | `model.onnx` |" in (run / "report.md").read_text()
    assert "FAILED: max |logit difference|" in (run / "report.md").read_text()


def test_run_dir_is_a_build(finished_run, tmp_path, monkeypatch, capsys):
    """--force benchmark refreshes the report; a changed upstream file reruns the stages after it and nothing
    else; leftovers of a killed run are cleaned; files are 0644; a run ends with a summary."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)

    def refuse(*args, **kwargs):
        raise AssertionError("training ran again")

    monkeypatch.setattr("gkd.compress.trainer.Trainer.fit", refuse)
    mode = 0o666 & ~_umask()
    assert all(p.stat().st_mode & 0o777 == mode for p in out.iterdir() if p.is_file() and p.name != ".lock")

    leftover = out / ".model.pt2.k1ll3d.tmp"
    leftover.touch()
    stale = json.loads((out / "benchmark.json").read_text())
    assert main(["run", "--out", str(out), "--device", "cpu", "--force", "benchmark"]) == 0
    fresh = json.loads((out / "benchmark.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert fresh["runtimes"] != stale["runtimes"]  # re-measured (latencies never repeat to the last digit)
    assert report["benchmark"]["runtimes"] == fresh["runtimes"]
    assert not leftover.exists()

    evaluation = json.loads((out / "eval.json").read_text())
    evaluation["models"]["student"]["domains"]["dusk"]["miou"] = 99.5
    (out / "eval.json").write_text(json.dumps(evaluation))  # an upstream file changed
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert main(["run", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "report.json").read_text())["models"]["student"]["miou"]["dusk"] == 99.5
    changed = {p.name for p in out.glob("*.json") if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert changed == {"report.json"}
    assert "stage report: input eval.json changed" in (out / "logs" / "gkd.log").read_text()
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out  # the closing summary


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask

"""The deployment contract (issue 36): on a `slide` recipe, export.json, the model card and Triton's configs state
what an artifact takes and returns; benchmark.json holds the whole-frame latency next to the model call's; the
model card's usage path (`gkd.Predictor`) on the source_val frames gives the reported mIoU. And `gkd-compress
engine`: its argument checks and the missing-TensorRT exit (the build itself needs a GPU: not run here)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import gkd
from gkd.cli import main
from gkd.data.config import build_dataset
from gkd.data.transforms import build_eval_transform
from gkd.evaluate.metrics import ConfusionMatrix
from gkd.export.onnx import onnx_session as ort_session
from gkd.export.triton import write_triton_repository
from gkd.recipe import load_recipe
from gkd.utils.errors import EXIT_BAD_INPUT, EXIT_MISSING_DEPENDENCY
from tests.helpers.paths import TINY_RECIPE

pytestmark = pytest.mark.slow

FRAME = (128, 176)  # source_val frames larger than the 112 x 112 window: 2 x 2 windows at stride 64
OVERRIDES = [
    "evaluate.mode=slide",
    "evaluate.stride=[64,64]",
    f"data.source_val.options.size=[{FRAME[0]},{FRAME[1]}]",
    "export.precisions=[fp32]",
]
ORT_TOLERANCE = 0.1  # mIoU points: benchmark.tolerance_fp32, what an fp32 artifact may lose against PyTorch fp32


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slide_run")
    assert main(["run", str(TINY_RECIPE), *OVERRIDES, "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_export_json_states_the_contract(slide_run):
    contract = json.loads((slide_run / "export.json").read_text())["contract"]
    encoder = gkd.load_segmentor(slide_run).encoder  # the normalisation the graph applies: the encoder's own
    assert contract["input"] == {
        "name": "images",
        "layout": "NCHW",
        "shape": ["batch", 3, 112, 112],
        "size": [112, 112],
        "dtype": "float32",
        "channels": "RGB",
        "range": [0.0, 1.0],
        "normalisation_in_graph": True,
        "mean": pytest.approx(encoder.mean.flatten().tolist()),
        "std": pytest.approx(encoder.std.flatten().tolist()),
    }
    assert contract["output"]["name"] == "logits" and contract["output"]["shape"] == ["batch", 6, 112, 112]
    assert contract["output"]["at_input_resolution"] is True
    assert contract["inference"]["mode"] == "slide"
    assert contract["inference"]["window"] == [112, 112] and contract["inference"]["stride"] == [64, 64]
    assert contract["batch_range"] == [1, 2, 4]


def test_model_card_and_triton_state_the_contract(slide_run, tmp_path):
    card = (slide_run / "MODEL_CARD.md").read_text()
    assert "## Deployment contract" in card
    assert "- input `images`: float32 NCHW ['batch', 3, 112, 112], RGB in [0, 1], batch 1 to 4" in card
    assert "happens inside the graph: do not normalise" in card
    assert "- reported mIoU: slide, window 112x112, stride 64x64 inference: pad the frame" in card
    assert 'gkd.Predictor.from_run("RUN_DIR", runtime="onnxruntime", precision="fp32")' in card
    assert "resized to the input size" not in card
    write_triton_repository(slide_run, tmp_path / "triton", "tiny")
    config = (tmp_path / "triton" / "tiny" / "config.pbtxt").read_text()
    assert "# reported mIoU: slide, window 112x112, stride 64x64 inference: pad the frame" in config


def test_benchmark_holds_whole_frame_and_window_latency(slide_run):
    benchmark = json.loads((slide_run / "benchmark.json").read_text())
    assert benchmark["frame"] == {
        "mode": "slide",
        "frame_size": list(FRAME),
        "window": [112, 112],
        "stride": [64, 64],
        "windows_per_call": 8,
        "windows": 4,
    }
    for key in ("torch/fp32", "onnxruntime/fp32"):
        entry = benchmark["runtimes"][key]
        assert entry["latency"]["1"]["p50_ms"] > 0  # one window (the model at its input size)
        frame = entry["frame_latency"]
        assert frame["windows"] == 4 and frame["p50_ms"] > 0
        assert frame["frames_per_s"] == pytest.approx(1e3 / frame["mean_ms"])
    report = (slide_run / "report.md").read_text()
    assert f"### Whole frame ({FRAME[0]}x{FRAME[1]}), as the mIoU was computed" in report
    row = r"\| onnxruntime/fp32 \| [\d.]+( \(BUSY machine\))? \| [\d.]+ \| [\d.]+ \| [\d.]+ \(batch 1\) \|"
    assert re.search(row, report)  # frame p50, p90, frames/s, the model call's p50


def _card_predictor(run_dir: Path, runtime: str) -> gkd.Predictor:
    """The model card's `Predictor.from_run` line, run as written (the run dir and runtime filled in)."""
    card = (run_dir / "MODEL_CARD.md").read_text()
    (line,) = [line for line in card.splitlines() if line.startswith("predictor = gkd.Predictor.from_run(")]
    line = line.replace('"RUN_DIR"', repr(str(run_dir))).replace('runtime="onnxruntime"', f"runtime={runtime!r}")
    scope: dict = {"gkd": gkd}
    exec(line, scope)
    return scope["predictor"]


def _miou(predictor: gkd.Predictor, dataset) -> float:
    confusion = ConfusionMatrix(len(predictor.class_names))
    samples = [dataset[i] for i in range(len(dataset))]
    labels = predictor.predict([sample["image"].permute(1, 2, 0).numpy() for sample in samples])
    for sample, label in zip(samples, labels, strict=True):
        confusion.update(torch.from_numpy(label), sample["label"])
    return confusion.compute()["miou"]


def test_model_card_usage_reproduces_the_reported_miou(slide_run, monkeypatch):
    recipe = load_recipe(slide_run / "recipe.resolved.yaml")
    benchmark = json.loads((slide_run / "benchmark.json").read_text())
    torch.set_num_threads(benchmark["environment"]["torch_threads"])  # the run's threads: the same sums
    reported = json.loads((slide_run / "eval.json").read_text())["models"]["student"]["domains"]
    transform = build_eval_transform(recipe.data.eval_transform)
    source_val = build_dataset(recipe.data.source_val, transform=transform)
    assert tuple(source_val[0]["image"].shape[-2:]) == FRAME
    assert _miou(_card_predictor(slide_run, "torch"), source_val) == pytest.approx(reported["source"]["miou"], abs=1e-6)
    onnx = _card_predictor(slide_run, "onnxruntime")
    assert _miou(onnx, source_val) == pytest.approx(reported["source"]["miou"], abs=ORT_TOLERANCE)
    dusk = build_dataset(recipe.data.targets["dusk"], transform=transform)  # benchmark.json's number for the artifact
    assert _miou(onnx, dusk) == pytest.approx(benchmark["runtimes"]["onnxruntime/fp32"]["miou"]["dusk"], abs=1e-6)


@pytest.fixture
def exported(tmp_path) -> Path:
    """A run directory's export files as `gkd-compress engine` reads them (stand-in ONNX files)."""
    for name in ("model.onnx", "model.fp16.onnx"):
        (tmp_path / name).write_bytes(b"stand-in")
    artifacts = {"onnx/fp32": {"file": "model.onnx"}, "onnx/fp16": {"file": "model.fp16.onnx"}}
    (tmp_path / "export.json").write_text(json.dumps({"batch_range": [1, 2, 4], "artifacts": artifacts}))
    return tmp_path


def test_engine_without_tensorrt_exits_8_saying_what_to_install(exported, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    assert main(["engine", str(exported), "--precision", "fp16", "--batch-range", "1,4,8"]) == EXIT_MISSING_DEPENDENCY
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith("gkd-compress: error: TensorRT is not installed")
    assert "pip install" in message and "tensorrt-cu12" in message and "nvcr.io/nvidia/tensorrt" in message
    assert not (exported / "engines").exists()


def test_engine_without_a_cuda_device_exits_8(exported, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["engine", str(exported)]) == EXIT_MISSING_DEPENDENCY
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-range", "4,2,1"], "batch range '4,2,1': expected MIN,OPT,MAX"),
        (["--batch-range", "1,2"], "batch range '1,2'"),
        (["--batch-range", "0,1,2"], "1 <= MIN <= OPT <= MAX"),
        (["--precision", "int8"], "no onnx/int8 artifact to build from: add int8 to export.precisions"),
    ],
)
def test_engine_arguments_are_checked(exported, capsys, arguments, message):
    assert main(["engine", str(exported), *arguments]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_engine_needs_an_exported_run_and_a_known_precision(tmp_path, capsys):
    assert main(["engine", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "export.json not found: run `gkd-compress export" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["engine", str(tmp_path), "--precision", "fp32"])
    assert exit_info.value.code == EXIT_BAD_INPUT


class OnnxStandInEngine:
    """TensorRTEngine's interface over ONNX Runtime (no GPU here), recording the batch sizes it is given."""

    batches: ClassVar[list[int]] = []

    def __init__(self, path: Path, device: torch.device) -> None:
        self.device = torch.device("cpu")
        self.session = ort_session(path.parent.parent / "model.onnx")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(images))
        return torch.from_numpy(self.session.run(None, {"images": images.numpy()})[0])


def test_engine_build_is_checked_against_onnx_runtime_and_recorded(slide_run, tmp_path, monkeypatch):
    """Everything around the TensorRT build (profile, parity on the run's images in the profile, engine.json),
    with the build and the engine stood in for: the real ones need a GPU (benchmarks/gpu_check.sh)."""
    for name in ("model.onnx", "parity_images.npy"):
        (tmp_path / name).symlink_to(slide_run / name)
    export = json.loads((slide_run / "export.json").read_text())
    export["artifacts"]["onnx/fp16"] = {"file": "model.onnx"}  # stand-in for the fp16 graph
    (tmp_path / "export.json").write_text(json.dumps(export))
    built = {}

    def build(source, out, precision, img_size, batch_range, workspace_mib, cache):
        built.update(source=Path(source).name, img_size=tuple(img_size), batch_range=tuple(batch_range))
        Path(out).write_bytes(b"stand-in engine")
        return {"file": Path(out).name, "build_s": 0.0, "profile": list(batch_range)}

    tensorrt = types.ModuleType("tensorrt")
    tensorrt.__version__ = "stand-in"
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stand-in GPU")
    monkeypatch.setattr("gkd.export.engine_build.build_engine", build)
    monkeypatch.setattr("gkd.export.engine_build.TensorRTEngine", OnnxStandInEngine)
    monkeypatch.setattr("gkd.export.latency._gpu_driver", lambda: None)
    OnnxStandInEngine.batches = []
    assert main(["engine", str(tmp_path), "--batch-range", "3,3,3"]) == 0
    assert built == {"source": "model.fp16.onnx", "img_size": (112, 112), "batch_range": (3, 3, 3)}
    assert OnnxStandInEngine.batches == [3, 3]  # 4 parity images: 3, then 1 padded up to the profile's minimum
    entry = json.loads((tmp_path / "engines" / "engine.json").read_text())["model.fp16.plan"]
    assert entry["parity"]["passed"] and entry["parity"]["max_abs_diff"] == 0 and entry["parity"]["images"] == 4
    assert entry["gpu"] == "stand-in GPU" and entry["img_size"] == [112, 112]

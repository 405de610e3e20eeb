"""Using a run's model: `gkd-compress predict` on CamVid frames (PyTorch and ONNX Runtime give the same labels;
any size; videos; bad inputs) and the Triton model repository (config parsed by tritonclient's protobuf,
ONNX model run from the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from gkd.cli import main
from gkd.data.camvid import CAMVID_PALETTE
from gkd.export.config import ExportConfig
from gkd.export.contract import deployment_contract
from gkd.export.stage import export_artifacts
from gkd.export.triton import onnx_io, write_triton_repository
from gkd.models.checkpoint import build_segmentor, save_segmentor
from gkd.predict import PredictError, predict
from gkd.predictor import Predictor, load_run_runtime
from gkd.recipe import dump_recipe, load_recipe
from gkd.utils.io import write_json, write_text
from tests.helpers.paths import CAMVID_ROOT, CAMVID_TINY_RECIPE

NUM_CLASSES = 11
BATCH_RANGE = (1, 2, 4)


def camvid_frames(split: str, count: int) -> list[Path]:
    return sorted((CAMVID_ROOT / split).glob("*.png"))[:count]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as the pipeline leaves it: the tiny CamVid recipe's student, trained 40 steps on 8 day
    frames (so its labels are not one class), exported to ONNX fp32."""
    if not CAMVID_ROOT.is_dir():
        pytest.skip(f"{CAMVID_ROOT} not present")
    out = tmp_path_factory.mktemp("run")
    recipe = load_recipe(CAMVID_TINY_RECIPE)
    size = recipe.data.img_size
    write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
    images, labels = [], []
    for path in camvid_frames("train", 8):
        image = np.asarray(Image.open(path).convert("RGB").resize(size[::-1], Image.BILINEAR))
        label = np.asarray(Image.open(CAMVID_ROOT / "trainannot" / path.name).resize(size[::-1], Image.NEAREST))
        images.append(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255)
        labels.append(torch.from_numpy(np.where(label == NUM_CLASSES, 255, label).astype(np.int64)))
    images, labels = torch.stack(images), torch.stack(labels)
    torch.manual_seed(0)
    segmentor = build_segmentor(recipe.models.student, recipe.models.decoder, NUM_CLASSES).train()
    optimizer = torch.optim.AdamW(segmentor.parameters(), lr=3e-3)
    for step in range(40):
        index = torch.arange(4) + 4 * (step % 2)
        loss = F.cross_entropy(segmentor(images[index]), labels[index], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    segmentor.eval()
    save_segmentor(out / "segmentor.safetensors", segmentor, recipe.models.student, recipe.models.decoder, NUM_CLASSES)
    config = ExportConfig(precisions=("fp32",), aoti=False, tensorrt=False, batch_range=BATCH_RANGE)
    summary = export_artifacts(segmentor, size, out, config, images[:4], images[4:], torch.device("cpu"))
    summary["contract"] = deployment_contract(summary, recipe.evaluate.mode, recipe.evaluate.stride)  # as the stage
    write_json(out / "export.json", summary)
    return out


@pytest.fixture(scope="module")
def inputs(run_dir, tmp_path_factory) -> Path:
    """Two dusk and two day CamVid test frames (360 x 480), and one day frame at an odd size (203 x 311)."""
    folder = tmp_path_factory.mktemp("inputs")
    for path in [*camvid_frames("test", 2), *sorted((CAMVID_ROOT / "test").glob("*.png"))[-2:]]:
        (folder / path.name).write_bytes(path.read_bytes())
    Image.open(camvid_frames("val", 1)[0]).resize((311, 203), Image.BILINEAR).save(folder / "odd_size.png")
    return folder


def labels_of(out: Path) -> dict[str, np.ndarray]:
    return {path.stem: np.asarray(Image.open(path)) for path in sorted((out / "labels").glob("*.png"))}


def test_predict_torch_and_onnxruntime_give_the_same_labels(run_dir, inputs, tmp_path):
    results = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / runtime
        argv = ["predict", str(run_dir), str(inputs), "--out", str(out), "--runtime", runtime, "--device", "cpu"]
        assert main([*argv, "--batch-size", "3"]) == 0
        results[runtime] = labels_of(out)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runtime"]["runtime"] == runtime and not summary["skipped"]
        assert len(summary["frames"]) == 5
        for frame in summary["frames"]:
            source = Image.open(frame["input"])
            label = Image.open(out / frame["label"])
            assert label.mode == "P" and label.size == source.size  # labels at the input's native size
            assert frame["size"] == [source.height, source.width]
            assert Image.open(out / frame["overlay"]).size == source.size
            assert sum(frame["class_area"].values()) == pytest.approx(1.0, abs=1e-4)
            palette = np.asarray(label.getpalette()[: 3 * NUM_CLASSES]).reshape(-1, 3)
            np.testing.assert_array_equal(palette, np.asarray(CAMVID_PALETTE))
        assert (out / "contact_sheet.png").is_file()
        assert not list(out.rglob("*.tmp"))
    assert results["torch"].keys() == results["onnxruntime"].keys()
    for name, label in results["torch"].items():
        np.testing.assert_array_equal(label, results["onnxruntime"][name], err_msg=name)
    assert len(np.unique(np.concatenate([label.ravel() for label in results["torch"].values()]))) > 2


def test_unreadable_input_is_skipped_by_name_or_stops_with_strict(run_dir, inputs, tmp_path):
    bad = tmp_path / "truncated.png"
    bad.write_bytes(next(inputs.glob("Seq05VD_*.png")).read_bytes()[:500])
    good = next(inputs.glob("Seq05VD_*.png"))
    summary = predict(run_dir, [str(bad), str(good)], tmp_path / "out", show_progress=False)
    assert [frame["name"] for frame in summary["frames"]] == [good.stem]
    assert summary["skipped"][0]["input"] == str(bad) and "truncated.png" in summary["skipped"][0]["error"]
    with pytest.raises(PredictError, match=r"truncated\.png"):
        predict(run_dir, [str(good), str(bad)], tmp_path / "strict", strict=True, batch_size=4, show_progress=False)
    assert not (tmp_path / "strict").exists() or not list((tmp_path / "strict").rglob("*"))  # nothing written
    assert main(["predict", str(run_dir), str(tmp_path / "missing*.png"), "--out", str(tmp_path / "o")]) == 2


def test_reference_models_run_in_torch_only(run_dir, inputs, tmp_path):
    (run_dir / "no_kd_segmentor.safetensors").write_bytes((run_dir / "segmentor.safetensors").read_bytes())
    frame = str(next(inputs.glob("Seq05VD_*.png")))
    summary = predict(run_dir, [frame], tmp_path / "no_kd", model="no_kd", show_progress=False)
    assert summary["model"] == "no_kd" and len(summary["frames"]) == 1
    with pytest.raises(PredictError, match="only the student is exported"):
        predict(run_dir, [frame], tmp_path / "x", runtime="onnxruntime", model="no_kd", show_progress=False)
    with pytest.raises(FileNotFoundError, match="teacher_segmentor"):
        predict(run_dir, [frame], tmp_path / "x", model="teacher", show_progress=False)


def test_video_frames_are_segmented(run_dir, tmp_path):
    av = pytest.importorskip("av")  # the `video` extra, in `dev`
    frames = [np.asarray(Image.open(path).convert("RGB").resize((240, 176))) for path in camvid_frames("test", 3)]
    video = tmp_path / "drive.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 240, 176, "yuv420p"
        for image in frames * 2:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    summary = predict(run_dir, [str(video)], tmp_path / "out", frame_step=2, show_progress=False)
    assert [frame["name"] for frame in summary["frames"]] == ["drive_f000000", "drive_f000002", "drive_f000004"]
    assert all(frame["size"] == [176, 240] and frame["frame"] % 2 == 0 for frame in summary["frames"])
    not_a_video = tmp_path / "broken.mp4"
    not_a_video.write_bytes(b"\x00" * 64)
    summary = predict(run_dir, [str(not_a_video)], tmp_path / "out2", show_progress=False)
    assert not summary["frames"] and "broken.mp4" in summary["skipped"][0]["error"]


def test_slide_mode_returns_labels_at_native_size(run_dir):
    runtime, recipe = load_run_runtime(run_dir, "torch", "fp32", torch.device("cpu"))
    slide = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"mode": "slide"})})
    images = [np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((100, 90), (300, 410))]
    labels = Predictor(runtime, slide, batch_size=4).predict(images)
    assert [label.shape for label in labels] == [(100, 90), (300, 410)]


def test_triton_repository_config_parses_and_matches_the_onnx_model(run_dir, tmp_path, monkeypatch):
    (run_dir / "model.fp16.engine").write_bytes(b"stand-in engine")  # a GPU run would have built it
    export = json.loads((run_dir / "export.json").read_text())
    export["artifacts"]["tensorrt/fp16"] = {"file": "model.fp16.engine"}
    export["artifacts"]["onnx/int8"] = {"file": "model.onnx"}  # listed, but failed its parity check: not served
    export["failed"] = {"onnx/int8": "parity: argmax agreement 0.5 < 0.9"}
    monkeypatch.setattr("gkd.export.triton.read_json", lambda path: export)
    repository = tmp_path / "triton"
    models = write_triton_repository(run_dir, repository, "camvid tiny")
    assert set(models) == {"camvid_tiny", "camvid_tiny_tensorrt_fp16"}
    assert (repository / "camvid_tiny_tensorrt_fp16" / "1" / "model.plan").read_bytes() == b"stand-in engine"

    session = ort.InferenceSession(str(repository / "camvid_tiny" / "1" / "model.onnx"))
    (onnx_input,), (onnx_output,) = session.get_inputs(), session.get_outputs()
    for model, platform in (("camvid_tiny", "onnxruntime_onnx"), ("camvid_tiny_tensorrt_fp16", "tensorrt_plan")):
        config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == model and config.platform == platform
        assert config.max_batch_size == BATCH_RANGE[-1]
        assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
        (config_input,), (config_output,) = config.input, config.output
        for declared, actual in ((config_input, onnx_input), (config_output, onnx_output)):
            assert declared.name == actual.name
            assert declared.data_type == model_config_pb2.TYPE_FP32 and actual.type == "tensor(float)"
            assert list(declared.dims) == list(actual.shape[1:])  # Triton's dims leave the batch axis out
        text = (repository / model / "config.pbtxt").read_text()  # the deployment contract heads it as comments
        assert "# input `images`: float32 NCHW ['batch', 3, 72, 96], RGB in [0, 1], batch 1 to 4" in text
        assert "inside the graph: do not normalise" in text and "logits at the input's resolution" in text
        assert "# reported mIoU: whole inference: resize the frame to 72x96" in text

    batch = np.random.default_rng(0).random((BATCH_RANGE[-1], *config_input.dims), dtype=np.float32)
    (logits,) = session.run(None, {config_input.name: batch})
    assert list(logits.shape) == [BATCH_RANGE[-1], *config_output.dims]

    write_triton_repository(run_dir, repository, "camvid tiny")  # rewriting replaces the models whole
    assert sorted(p.name for p in repository.iterdir()) == ["camvid_tiny", "camvid_tiny_tensorrt_fp16"]
    (run_dir / "model.fp16.engine").unlink()


def test_export_command_writes_the_triton_repository(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("gkd.cli._cmd_pipeline", lambda args: 0)  # the export stage itself is tested elsewhere
    assert main(["export", "--out", str(run_dir), "--triton", str(tmp_path / "repo")]) == 0
    config = (tmp_path / "repo" / "camvid_day2dusk_tiny" / "config.pbtxt").read_text()
    assert onnx_io(run_dir / "model.onnx")[0]["dims"] == [3, 72, 96] and "dims: [ 3, 72, 96 ]" in config

"""Export: fixed-size preparation, ONNX fp32 / fp16 / int8 (QDQ) with parity and graph checks, TensorRT's
absence and build logic (a stand-in module: no TensorRT here), AOTInductor, and the export / benchmark stages
on a tiny segmentor trained on real CamVid frames."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from pydantic import ValidationError

from gkd.evaluate.metrics import ConfusionMatrix
from gkd.export import tensorrt as trt_export
from gkd.export.aoti import compile_aoti, load_aoti
from gkd.export.benchmark import BenchmarkConfig, benchmark_artifacts
from gkd.export.config import ExportConfig
from gkd.export.onnx import (
    ExportError,
    check_parity,
    export_onnx,
    onnx_session,
    prepare_for_export,
    unsafe_resizes,
)
from gkd.export.runtimes import CudaGraphRuntime, TorchRuntime, load_runtime, runtime_loaders
from gkd.export.stage import export_artifacts
from gkd.models.segmentor import Segmentor
from tests.helpers.paths import CAMVID_ROOT
from tests.helpers.tiny_models import tiny_segmentor

SIZE = (96, 128)  # CamVid's 360 x 480 frames downsized, a multiple of the 16-pixel patch
NUM_CLASSES = 11  # CamVid's classes; label 11 (void) -> 255


def load_camvid(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` frames of ``split`` resized to `SIZE` (images bilinear in [0, 1], labels nearest)."""
    images, labels = [], []
    for path in sorted((CAMVID_ROOT / split).glob("*.png"))[:count]:
        image = Image.open(path).convert("RGB").resize(SIZE[::-1], Image.BILINEAR)
        label = Image.open(CAMVID_ROOT / f"{split}annot" / path.name).resize(SIZE[::-1], Image.NEAREST)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        label_ids = torch.from_numpy(np.asarray(label).astype(np.int64))
        labels.append(torch.where(label_ids == NUM_CLASSES, 255, label_ids))
    return torch.stack(images), torch.stack(labels)


def miou(logits: np.ndarray, labels: torch.Tensor) -> float:
    confusion = ConfusionMatrix(NUM_CLASSES)
    confusion.update(torch.from_numpy(logits.argmax(1)), labels)
    return confusion.compute()["miou"]


@pytest.fixture(scope="module")
def camvid() -> dict[str, torch.Tensor]:
    if not CAMVID_ROOT.is_dir():
        pytest.skip(f"{CAMVID_ROOT} not present")
    train_images, train_labels = load_camvid("train", 24)
    val_images, val_labels = load_camvid("val", 16)
    return {"train": train_images, "train_labels": train_labels, "val": val_images, "val_labels": val_labels}


@pytest.fixture(scope="module")
def trained(camvid) -> Segmentor:
    """A tiny ViT-S/16-shaped segmentor trained for 150 steps on 24 CamVid frames (well above chance)."""
    segmentor = tiny_segmentor().train()
    optimizer = torch.optim.AdamW(segmentor.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        index = torch.randint(0, len(camvid["train"]), (8,), generator=generator)
        loss = F.cross_entropy(segmentor(camvid["train"][index]), camvid["train_labels"][index], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return segmentor.eval()


@pytest.fixture(scope="module")
def exported(trained, camvid, tmp_path_factory) -> tuple[Path, dict]:
    """The export stage on CPU with TensorRT made unimportable, so its skip path runs on every machine."""
    out_dir = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", None)
        summary = export_artifacts(
            trained,
            SIZE,
            out_dir,
            ExportConfig(aoti=False, calibration_images=16),
            camvid["train"][:16],
            camvid["val"][:4],
            torch.device("cpu"),
        )
    return out_dir, summary


def test_configs_validate():
    assert ExportConfig(precisions=("int8",)).precisions == ("fp32", "int8")  # fp32 is the reference, always
    assert ExportConfig().opset == 18
    with pytest.raises(ValidationError, match="extra"):
        ExportConfig(opset_version=17)
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        ExportConfig(batch_range=(4, 2, 8))
    with pytest.raises(ValidationError):
        ExportConfig(opset=16)  # LayerNormalization needs opset 17
    config = BenchmarkConfig()
    assert (config.batch_sizes, config.iterations, config.warmup_iterations) == ((1, 8), 20, 5)
    assert (config.tolerance("fp16"), config.tolerance("bf16"), config.tolerance("int8")) == (0.5, 0.5, 1.5)
    with pytest.raises(ValidationError):
        BenchmarkConfig(runtimes=["onnxruntime", "tvm"])


def _aten_ops(model: torch.nn.Module, images: torch.Tensor) -> set[str]:
    program = torch.export.export(model, (images,))
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


def test_prepare_for_export_removes_the_position_embedding_resize():
    segmentor = tiny_segmentor(depth=2, decoder="linear")
    images = torch.rand(2, 3, *SIZE)
    assert any("bicubic" in op for op in _aten_ops(segmentor, images))  # the dynamic model resamples every call
    prepared = prepare_for_export(segmentor, SIZE)
    assert not any("bicubic" in op for op in _aten_ops(prepared, images))
    assert segmentor.encoder.model.dynamic_img_size  # the caller's model is left as it was
    with torch.no_grad():
        torch.testing.assert_close(prepared(images), segmentor(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "size"),
    [("vit_small_patch16_224", SIZE), ("vit_small_patch14_dinov2", (98, 126)), ("eva02_small_patch14_224", (90, 120))],
)
def test_onnx_dynamic_batch_at_baked_size(arch, size, tmp_path):
    segmentor = tiny_segmentor(arch, depth=2, decoder="linear")
    path = tmp_path / "model.onnx"
    info = export_onnx(prepare_for_export(segmentor, size), path, size, opset=18, batch_range=(1, 4, 8))
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, *size]
    assert not unsafe_resizes(model) and info["ops"]["LayerNormalization"] > 0
    session = onnx_session(path)
    for batch in (1, 3):
        images = torch.rand(batch, 3, *size)
        with torch.no_grad():
            expected = segmentor(images).numpy()  # the original dynamic-size model
        np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected, atol=1e-4)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_unsafe_resizes_finds_cubic_and_antialiased_nodes():
    def resize(name: str, **attributes) -> onnx.NodeProto:
        return helper.make_node("Resize", ["x", "", "scales"], [name], name=name, **attributes)

    graph = helper.make_graph(
        [resize("linear", mode="linear"), resize("cubic", mode="cubic"), resize("aa", mode="linear", antialias=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("linear", "cubic", "aa")],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    assert unsafe_resizes(helper.make_model(graph)) == ["cubic", "aa"]


def test_export_refuses_an_unprepared_graph_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("gkd.export.onnx.unsafe_resizes", lambda model: ["node_upsample_bicubic2d"])
    with pytest.raises(ExportError, match="prepare_for_export"):
        export_onnx(
            prepare_for_export(tiny_segmentor(depth=1, decoder="linear"), (32, 32)), tmp_path / "m.onnx", (32, 32)
        )
    assert not list(tmp_path.iterdir())


def test_fp32_onnx_matches_pytorch(exported, trained, camvid):
    out_dir, summary = exported
    fp32 = summary["artifacts"]["onnx/fp32"]
    assert summary["opset"] == fp32["opset"] == 18 and fp32["file"] == "model.onnx"
    assert fp32["parity"]["passed"] and fp32["parity"]["max_abs_diff"] < 1e-4 and not summary["failed"]
    session = onnx_session(out_dir / "model.onnx")
    for batch in (1, 3):
        images = camvid["val"][4 : 4 + batch]
        with torch.no_grad():
            expected = trained(images).numpy()
        np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected, atol=1e-4)


def test_parity_miss_beyond_tolerance_is_judged_not_raised(exported, trained, camvid):
    out_dir, _ = exported
    shifted = copy.deepcopy(trained)
    with torch.no_grad():
        shifted.decoder.classifier.bias += 0.05
    fp32 = ExportConfig().parity.fp32
    result = check_parity(shifted, out_dir / "model.onnx", camvid["val"][:2], fp32)
    assert not result["passed"] and "max |logit difference|" in result["reason"]
    assert result["max_abs_diff"] == pytest.approx(0.05, abs=1e-4)
    assert result["max_abs_diff"] > result["limit"]
    loose = fp32.model_copy(update={"atol": 0.06})
    assert check_parity(shifted, out_dir / "model.onnx", camvid["val"][:2], loose)["passed"]


def test_fp16_graph_is_fp16_with_layernorm_in_fp32(exported):
    out_dir, summary = exported
    model = onnx.load(str(out_dir / "model.fp16.onnx"))
    graph = model.graph
    assert graph.input[0].type.tensor_type.elem_type == graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    initializers = {init.name: init for init in graph.initializer}
    matmul_weights = [
        initializers[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers
    ]
    assert matmul_weights and all(init.data_type == TensorProto.FLOAT16 for init in matmul_weights)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    assert norms and all(dtypes[node.input[0]] == dtypes[node.output[0]] == TensorProto.FLOAT for node in norms)
    assert summary["artifacts"]["onnx/fp16"]["parity"]["argmax_agreement"] > 0.98


def test_int8_qdq_runs_in_onnxruntime_within_tolerance_on_camvid(exported, trained, camvid):
    out_dir, summary = exported
    info = summary["artifacts"]["onnx/int8"]
    model = onnx.load(str(out_dir / "model.int8.onnx"))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") == info["quantize_linear_nodes"] > 0 and ops.count("DequantizeLinear") > 0
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8, as TensorRT needs
    convolutions = {node.name: node for node in model.graph.node if node.op_type == "Conv"}
    for name in info["excluded_nodes"]:  # patch embedding and classifier keep float weights
        assert convolutions[name].input[1] in initializers

    images, labels = camvid["val"], camvid["val_labels"]
    with torch.no_grad():
        reference = trained(images).numpy()
    int8 = onnx_session(out_dir / "model.int8.onnx").run(None, {"images": images.numpy()})[0]
    assert miou(reference, labels) > 15  # trained: well above chance for 11 classes
    assert miou(int8, labels) >= miou(reference, labels) - BenchmarkConfig().tolerance_int8
    assert (int8.argmax(1) == reference.argmax(1)).mean() > 0.95


def test_tensorrt_missing_is_skipped_with_reason(exported, monkeypatch):
    _, summary = exported
    for precision in ("fp16", "int8"):
        assert f"tensorrt/{precision}" not in summary["artifacts"]
        assert "TensorRT is not installed" in summary["skipped"][f"tensorrt/{precision}"]
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert "needs a CUDA device" in trt_export.tensorrt_unavailable(torch.device("cpu"))


class FakeTensorRT(types.ModuleType):
    """Just enough of the TensorRT Python API to drive `build_engine`: records what the builder was told.

    Like TensorRT 11 it has no weak-typing API (no ``BuilderFlag.FP16``, no ``set_flag``), so a builder that
    reaches for one fails here. ``cache_matches=False`` makes it reject a saved timing cache (another GPU).
    The enum values are the headers' (NvInfer.h) of each major version: ``NetworkDefinitionCreationFlag``
    is ``kEXPLICIT_BATCH = 0, kSTRONGLY_TYPED = 1`` on 10.x; 11.0 removed ``kEXPLICIT_BATCH`` and made
    ``kSTRONGLY_TYPED = 0``.
    """

    def __init__(self, version: str, parses: bool = True, builds: bool = True, cache_matches: bool = True) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls = {"network_flags": [], "cache_in": [], "cache_set": []}
        major = int(version.split(".")[0])
        flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 0}
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        calls = self.calls
        profile = types.SimpleNamespace(set_shape=lambda name, *shapes: calls.update(profile=(name, shapes)))

        def set_timing_cache(cache, ignore_mismatch: bool) -> bool:
            accepted = cache_matches or cache.data == b""
            calls["cache_set"].append((cache.data, accepted))
            return accepted

        def create_timing_cache(data: bytes):
            calls["cache_in"].append(bytes(data))
            return types.SimpleNamespace(data=bytes(data), serialize=lambda: b"timings")

        config = types.SimpleNamespace(
            set_memory_pool_limit=lambda pool, size: calls.update(pool=(pool, size)),
            add_optimization_profile=lambda p: 0,
            create_timing_cache=create_timing_cache,
            set_timing_cache=set_timing_cache,
            get_timing_cache=lambda: types.SimpleNamespace(serialize=lambda: b"timings"),
        )
        self.Builder = lambda logger: types.SimpleNamespace(
            create_network=lambda flags: calls["network_flags"].append(flags) or types.SimpleNamespace(),
            create_builder_config=lambda: config,
            create_optimization_profile=lambda: profile,
            build_serialized_network=lambda n, c: b"engine" if builds else None,
        )
        self.OnnxParser = lambda n, logger: types.SimpleNamespace(
            parse_from_file=lambda path: parses, num_errors=1, get_error=lambda i: "Unsupported op Foo"
        )


def _build(tmp_path: Path, precision: str = "fp16") -> dict:
    return trt_export.build_engine(
        tmp_path / "model.onnx", tmp_path / "model.engine", precision, (64, 64), (1, 8, 32), 256, tmp_path / "t.cache"
    )


# create_network takes a bit mask, bit i = NetworkDefinitionCreationFlag value i (TensorRT Python API, Builder):
# strongly typed is bit 1 on 10.x and bit 0 on 11.x, where the flag is accepted and ignored.
@pytest.mark.parametrize(("version", "strongly_typed_mask"), [("10.13.0", 0b10), ("11.4.0", 0b01)])
def test_tensorrt_networks_are_strongly_typed_on_10_and_11(version, strongly_typed_mask, tmp_path, monkeypatch):
    fake = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    info = _build(tmp_path, "int8")
    assert fake.calls["network_flags"] == [strongly_typed_mask] and info["typing"].startswith("strong")
    assert fake.calls["profile"] == ("images", ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64)))
    assert fake.calls["pool"] == ("workspace", 256 * 1024 * 1024)  # set_memory_pool_limit takes bytes
    assert (tmp_path / "model.engine").read_bytes() == b"engine"
    _build(tmp_path, "fp16")
    assert fake.calls["cache_in"] == [b"", b"timings"]  # the first build's timings are reused


def test_tensorrt_timing_cache_of_another_gpu_starts_fresh(tmp_path, monkeypatch, caplog):
    (tmp_path / "t.cache").write_bytes(b"other gpu")
    fake = FakeTensorRT("11.4.0", cache_matches=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    _build(tmp_path)
    assert fake.calls["cache_set"] == [(b"other gpu", False), (b"", True)]
    assert "does not match" in caplog.text
    assert (tmp_path / "t.cache").read_bytes() == b"timings"


def test_tensorrt_build_failures_leave_no_engine(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("11.4.0", parses=False))
    with pytest.raises(trt_export.EngineBuildError, match="Unsupported op Foo"):
        _build(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("11.4.0", builds=False))
    with pytest.raises(trt_export.EngineBuildError, match="failed to build"):
        _build(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="AOTInductor needs a C++ compiler"
)
def test_aoti_round_trip_with_dynamic_batch(tmp_path):
    segmentor = tiny_segmentor(depth=2, decoder="linear")
    path = tmp_path / "model.pt2"
    info = compile_aoti(prepare_for_export(segmentor, (64, 64)), path, (64, 64), (1, 4, 8), torch.device("cpu"))
    assert info["file"] == "model.pt2" and path.stat().st_size == info["bytes"]
    compiled = load_aoti(path)
    for batch in (1, 3):
        images = torch.rand(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(compiled(images), segmentor(images), rtol=0, atol=1e-4)


def _camvid_evaluator(camvid):
    def evaluate(predict) -> dict[str, float]:
        return {"camvid_val": miou(predict(camvid["val"].numpy()), camvid["val_labels"])}

    return evaluate


def test_benchmark_stage_accuracy_latency_and_skips(exported, trained, camvid):
    out_dir, summary = exported
    config = BenchmarkConfig(batch_sizes=(1, 2), iterations=5, warmup_iterations=1)
    result = benchmark_artifacts(
        trained, SIZE, out_dir, summary, config, torch.device("cpu"), _camvid_evaluator(camvid)
    )
    assert result["ok"] and result["failed"] == []
    expected = {"torch/fp32", "onnxruntime/fp32", "onnxruntime/fp16", "onnxruntime/int8"}
    assert set(result["runtimes"]) == expected
    for key, entry in result["runtimes"].items():
        assert set(entry["latency"]) == {"1", "2"}, key
        assert entry["miou_drop"]["camvid_val"] <= entry["tolerance"] and not entry["failed"]
        assert entry["parity"]["argmax_agreement"] > 0.95
    assert result["runtimes"]["onnxruntime/fp32"]["parity"]["max_abs_diff"] < 1e-4
    assert "TensorRT is not installed" in result["skipped"]["tensorrt/int8"]
    assert "needs a CUDA device" in result["skipped"]["onnxruntime-trt/fp32"]
    assert set(result["paired"]["runtimes"]) == expected and result["paired"]["reference"] == "onnxruntime/fp32"
    json.dumps(summary), json.dumps(result)  # the stages' files are these dicts as JSON


def test_broken_artifact_fails_the_benchmark(exported, trained, camvid, tmp_path):
    out_dir, summary = exported
    broken_dir = tmp_path / "broken"
    shutil.copytree(out_dir, broken_dir)
    # Break the int8 model: a +100 bias on class 0 of its classifier makes it predict class 0 everywhere.
    model = onnx.load(str(broken_dir / "model.int8.onnx"))
    classifier = [node for node in model.graph.node if node.op_type == "Conv"][-1]
    bias = next(init for init in model.graph.initializer if init.name == classifier.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 100
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(broken_dir / "model.int8.onnx"))

    config = BenchmarkConfig(batch_sizes=(1,), iterations=5, warmup_iterations=1, runtimes=["onnxruntime"])
    result = benchmark_artifacts(
        trained, SIZE, broken_dir, summary, config, torch.device("cpu"), _camvid_evaluator(camvid)
    )
    assert result["ok"] is False and result["failed"] == ["onnxruntime/int8"]
    assert result["runtimes"]["onnxruntime/int8"]["failed"] is True
    assert result["runtimes"]["onnxruntime/fp32"]["failed"] is False
    assert set(result["runtimes"]) == {"onnxruntime/fp32", "onnxruntime/fp16", "onnxruntime/int8"}


def test_runtime_that_does_not_load_says_why(exported, trained, tmp_path):
    out_dir, summary = exported
    missing = copy.deepcopy(summary)
    missing["artifacts"]["onnx/fp16"]["file"] = "absent.onnx"
    loaders, _ = runtime_loaders(trained, SIZE, out_dir, missing, torch.device("cpu"), ["onnxruntime"])
    assert set(loaders) == {"onnxruntime/fp32", "onnxruntime/fp16", "onnxruntime/int8"}
    loaded = {key: load_runtime(loader) for key, loader in loaders.items()}
    assert {key for key, (runtime, _) in loaded.items() if runtime is not None} == {
        "onnxruntime/fp32",
        "onnxruntime/int8",
    }
    assert loaded["onnxruntime/fp16"][0] is None and "absent.onnx" in loaded["onnxruntime/fp16"][1]


def test_cuda_graph_runtimes_exist_only_on_cuda(exported, trained):
    out_dir, summary = exported
    loaders, _ = runtime_loaders(trained, SIZE, out_dir, summary, torch.device("cpu"))
    assert loaders and not [key for key in loaders if "cudagraph" in key]
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        CudaGraphRuntime(TorchRuntime(trained, SIZE, "fp32", torch.device("cpu")), SIZE)


def test_aoti_packages_replayed_as_cuda_graphs_load_without_thread_sync(trained, tmp_path, monkeypatch):
    """AOTInductor's runner waits on events unless loaded with ``run_single_threaded``, which a capture refuses
    (H100, 2026-11-26): the graph runtime of a package loads its own runner that way, the plain one does not."""
    import gkd.export.runtimes.aoti as aoti_runtime
    import gkd.export.runtimes.cudagraph as cudagraph_runtime

    loaded = []
    monkeypatch.setattr(aoti_runtime, "load_aoti", lambda path, device, for_cuda_graph: loaded.append(for_cuda_graph))
    monkeypatch.setattr(cudagraph_runtime, "CudaGraphRuntime", lambda inner, img_size: inner)
    summary = {"batch_range": [1, 2, 4], "artifacts": {"aoti/fp32": {"file": "model.pt2", "device": "cuda"}}}
    loaders, _ = runtime_loaders(trained, SIZE, tmp_path, summary, torch.device("cuda"), ["aoti", "aoti-cudagraph"])
    assert set(loaders) == {"aoti/fp32", "aoti-cudagraph/fp32"}  # built, not run: no GPU needed
    loaders["aoti/fp32"]()
    loaders["aoti-cudagraph/fp32"]()
    assert loaded == [False, True]

"""A bare install (no ONNX Runtime): `gkd-compress run` writes the ONNX file, completes, exits 0, and the report
says what was not checked and which extra adds it."""

from __future__ import annotations

import json
import sys

import pytest

from gkd.cli import main
from gkd.export.onnx import onnxruntime_unavailable
from tests.helpers.paths import TINY_SWEEP

pytestmark = pytest.mark.slow


@pytest.fixture
def without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import onnxruntime` (and its submodules) raise ImportError, as on a bare install.
    for name in [name for name in sys.modules if name.startswith("onnxruntime.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def test_unavailable_names_the_extra(without_onnxruntime):
    assert onnxruntime_unavailable() == "install gkd-compress[cpu] (or [gpu]) for ONNX Runtime"


def test_onnxruntime_present_is_available():
    pytest.importorskip("onnxruntime")
    assert onnxruntime_unavailable() is None


def test_run_completes_and_reports_what_was_not_checked(without_onnxruntime, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {TINY_SWEEP}\nname: bare\nexport: {{precisions: [fp32, int8]}}\n")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "model.onnx").stat().st_size > 0 and not (out / "model.int8.onnx").exists()

    missing = "install gkd-compress[cpu] (or [gpu]) for ONNX Runtime"
    export = json.loads((out / "export.json").read_text())
    assert export["failed"] == {} and "parity" not in export["artifacts"]["onnx/fp32"]
    assert export["not_checked"] == {"onnx/fp32": missing}
    assert export["skipped"]["onnx/int8"] == f"not quantized (ONNX Runtime's quantizer): {missing}"
    benchmark = json.loads((out / "benchmark.json").read_text())
    assert benchmark["ok"] and benchmark["not_checked"] == {"onnxruntime/fp32": missing}
    assert "needs a CUDA device" in benchmark["skipped"]["onnxruntime-trt/fp32"]  # the device comes first on a CPU
    assert "torch/fp32" in benchmark["runtimes"]
    assert not any(key.startswith("onnxruntime") for key in benchmark["runtimes"])

    report = (out / "report.md").read_text()
    assert f"| onnx/fp32 | `model.onnx` | n/a | n/a | n/a % | not checked: {missing} |" in report
    assert f"| onnxruntime/fp32 | | | | | | | not checked: {missing} |" in report
    assert f"| onnx/int8 | not built: not quantized (ONNX Runtime's quantizer): {missing} |" in report
    assert f"| onnxruntime/fp32 | | not checked: {missing} | | | |" in (out / "MODEL_CARD.md").read_text()
    summary = capsys.readouterr().out
    assert f"not checked: onnx/fp32 parity, onnxruntime/fp32 latency ({missing})" in summary

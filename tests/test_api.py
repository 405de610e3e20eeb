"""The public API: `import gkd` is light, and the README's Python section runs as written, driving the smoke
pipeline, a prediction and the exports through `gkd` alone."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gkd
from tests.helpers.paths import REPO

pytestmark = pytest.mark.slow


def _readme_python_section() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_gkd_is_light_and_every_public_name_resolves():
    code = "import gkd, sys; print('torch' in sys.modules)"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert light.stdout.strip() == "False"
    assert set(gkd.__all__) == {"__version__", *gkd._API}
    for name in gkd.__all__:
        assert getattr(gkd, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = gkd.nothing


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's Python block, executed as written in a folder holding the repository's recipes."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "recipes").symlink_to(REPO / "recipes")
    (folder / "gkd").symlink_to(REPO / "gkd")  # recipes/smoke.yaml's base is ../gkd/recipes/default.yaml
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(_readme_python_section(), "README.md#python", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return folder / "runs" / "smoke", namespace


def test_readme_python_section_runs_the_pipeline_and_predicts(readme_run):
    run_dir, namespace = readme_run
    result = namespace["result"]
    assert result.failed == [] and "distill" in result.ran and "report" in result.ran
    evaluated = json.loads((run_dir / "eval.json").read_text())["models"]["student"]["domains"]
    assert result.metrics["student"] == {domain: metrics["miou"] for domain, metrics in evaluated.items()}
    labels = namespace["labels"]
    assert labels[0].shape == (120, 160) and labels[0].dtype == np.uint8
    assert int(labels[0].max()) < len(namespace["predictor"].class_names)


def test_api_runs_named_stages_under_the_engine_rule(readme_run):
    run_dir, namespace = readme_run
    pipeline = namespace["pipeline"]
    assert pipeline.run(stages=["export", "benchmark"]).ran == []  # up to date
    assert pipeline.run(stages=["export"], force=["export"]).ran == ["export"]
    assert "export.json" in pipeline.outputs and pipeline.file("model.onnx").is_file()
    assert pipeline.plan().to_run == ["benchmark", "report"]  # downstream of the new export
    frozen = pipeline.run_stage("train-frozen-head")  # an on-request stage: a record like every stage
    assert frozen.ran == ["train-frozen-head"] and (run_dir / "frozen_segmentor.safetensors").is_file()
    assert json.loads((run_dir / "stages" / "train-frozen-head.json").read_text())["status"] == "complete"
    assert "train-frozen-head" not in pipeline.run().ran  # a whole run leaves on-request stages alone
    torch_labels = gkd.Predictor.from_run(run_dir).predict(namespace["frames"])
    assert (torch_labels[0] == namespace["labels"][0]).mean() > 0.99  # PyTorch and ONNX Runtime agree
    models = pipeline.export_triton(run_dir / "triton")
    assert models and all((run_dir / "triton" / model / "config.pbtxt").is_file() for model in models)

"""Contract tests of every registered runtime (`gkd.export.runtimes.RUNTIMES`), one parametrized case each, as
segmentation-models-pytorch's tests/models/base.py does for its models: registering a runtime makes it tested.

Each entry must be well formed, and on a tiny model it must export (where it has an exporter), load, and match
PyTorch fp32 within its precision's parity tolerance. A runtime that needs CUDA, or a library or device the
export found missing (TensorRT), is skipped with the reason; on a GPU machine they all run.
"""

from __future__ import annotations

import pytest
import torch

from gkd.export.config import ExportConfig
from gkd.export.parity import compare_logits, judge
from gkd.export.precisions import PRECISIONS, ParityConfig
from gkd.export.runtimes import RUNTIME_NAMES, RUNTIMES, RuntimeEntry, load_runtime, runtime_loaders
from gkd.export.runtimes.aoti import AOTI
from gkd.export.stage import export_artifacts
from tests.helpers.tiny_models import tiny_segmentor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = (32, 48)  # a 2 x 3 patch grid
IDS = [entry.name for entry in RUNTIMES]
ENTRIES = dict(zip(IDS, RUNTIMES, strict=True))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Every registered exporter's artifacts of a tiny segmentor, written once for all the entries."""
    segmentor = tiny_segmentor(depth=1, decoder="linear", num_classes=5)
    generator = torch.Generator().manual_seed(0)
    calibration, parity = torch.rand(8, 3, *SIZE, generator=generator), torch.rand(2, 3, *SIZE, generator=generator)
    config = ExportConfig(
        calibration_images=4,
        int8_fallback={"holdout_images": 4},
        batch_range=(1, 2, 4),
        aoti_precisions=AOTI.precisions,
    )
    out_dir = tmp_path_factory.mktemp("runtimes")
    summary = export_artifacts(segmentor, SIZE, out_dir, config, calibration, parity, DEVICE)
    return {"segmentor": segmentor, "out_dir": out_dir, "summary": summary, "parity": parity.numpy()}


@pytest.mark.parametrize("entry", RUNTIMES, ids=IDS)
def test_entry_is_well_formed(entry: RuntimeEntry):
    assert RUNTIME_NAMES.count(entry.name) == 1 and ENTRIES[entry.name] is entry
    assert entry.precisions and set(entry.precisions) <= set(PRECISIONS)
    assert set(entry.cuda_precisions) <= set(entry.precisions)
    assert entry.devices and set(entry.devices) <= {"cpu", "cuda"}
    if entry.artifact is None:
        assert not entry.files and entry.exporter is None
    else:
        assert set(entry.files) == set(entry.precisions) and len(set(entry.files.values())) == len(entry.files)
        # exactly one entry writes each kind of artifact; the others of that kind reuse its files
        writers = [other for other in RUNTIMES if other.artifact == entry.artifact and other.exporter is not None]
        assert len(writers) == 1 and writers[0].files == entry.files
    if entry.wraps is not None:
        inner = ENTRIES[entry.wraps]
        assert RUNTIMES.index(inner) < RUNTIMES.index(entry) and inner.wraps is None
        assert (entry.precisions, entry.artifact, entry.exporter) == (inner.precisions, inner.artifact, None)


def test_artifact_files_are_distinct_across_kinds():
    files = {(entry.artifact, file) for entry in RUNTIMES if entry.artifact for file in entry.files.values()}
    assert len({file for _, file in files}) == len(files)


def _skip_unless_it_runs_here(entry: RuntimeEntry, summary: dict) -> None:
    """Skip, saying why, where ``entry`` cannot run on this machine."""
    if DEVICE.type not in entry.devices:
        pytest.skip(f"{entry.name} needs a {' or '.join(entry.devices)} device; this machine runs on {DEVICE.type}")
    missing = entry.library_missing() if entry.library_missing is not None else None
    if missing:
        pytest.skip(f"{entry.name}: {missing}")
    kind = entry.artifact
    if kind is not None and not any(key.split("/")[0] == kind for key in summary["artifacts"]):
        reasons = {key: why for key, why in summary["skipped"].items() if key.split("/")[0] == kind}
        if reasons:
            pytest.skip(f"no {kind} artifact exported here: {reasons}")


@pytest.mark.parametrize("entry", RUNTIMES, ids=IDS)
def test_runtime_exports_loads_and_matches_pytorch(entry: RuntimeEntry, exported: dict):
    summary = exported["summary"]
    _skip_unless_it_runs_here(entry, summary)
    if entry.artifact is not None:
        assert not [key for key in summary["failed"] if key.split("/")[0] == entry.artifact], summary["failed"]
        written = {
            key.split("/")[1]: info
            for key, info in summary["artifacts"].items()
            if key.startswith(entry.artifact + "/")
        }
        assert written and all(info["file"] == entry.files[p] for p, info in written.items())
        precisions = set(written)
    else:
        precisions = set(entry.offered(DEVICE))
    segmentor, parity = exported["segmentor"], exported["parity"]
    loaders, skipped = runtime_loaders(segmentor, SIZE, exported["out_dir"], summary, DEVICE, [entry.name])
    assert set(loaders) == {f"{entry.name}/{p}" for p in precisions}, skipped
    with torch.no_grad():
        reference = segmentor.to(DEVICE)(torch.from_numpy(parity).to(DEVICE)).float().cpu().numpy()
    for key, loader in loaders.items():
        runtime, why = load_runtime(loader)
        assert runtime is not None, f"{key}: {why}"
        assert (runtime.runtime, runtime.precision) == tuple(key.split("/"))
        logits = runtime.predict(parity)
        assert logits.shape == reference.shape and logits.dtype == reference.dtype
        verdict = judge(compare_logits(reference, logits), ParityConfig().tolerance(runtime.precision))
        assert verdict["passed"], f"{key}: {verdict.get('reason')}"

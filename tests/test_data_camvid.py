"""CamVid from the shared SegNet copy (read in place, never copied): split and domain sizes, labels,
and ``inspect_dataset`` against a direct numpy count."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gkd.data.base import DataError
from gkd.data.config import DatasetConfig, build_dataset, inspect_dataset
from tests.helpers.benchmarks import BENCHMARKS
from tests.helpers.paths import CAMVID_ROOT

pytestmark = pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason=f"{CAMVID_ROOT} not present")


def camvid(split: str, **options) -> DatasetConfig:
    return DatasetConfig(name="camvid", root=CAMVID_ROOT, split=split, options=options)


@pytest.mark.parametrize(
    ("split", "day", "dusk"),
    [("train", 305, 62), ("val", 101, 0), ("test", 171, 62)],  # counted from the folders' file-name prefixes
)
def test_split_and_domain_sizes(split, day, dusk):
    assert len(build_dataset(camvid(split))) == day + dusk
    assert len(build_dataset(camvid(split, domain="day"))) == day
    if dusk:
        dataset = build_dataset(camvid(split, domain="dusk"))
        assert len(dataset) == dusk and all(name.split("/")[1].startswith("0001TP_") for name in dataset.names)
    else:
        with pytest.raises(DataError, match="no camvid samples in split 'val'"):
            build_dataset(camvid(split, domain="dusk"))


def test_split_files_agree_with_folders():
    listed = build_dataset(camvid("test")).names
    assert listed == sorted(f"test/{p.name}" for p in (CAMVID_ROOT / "test").glob("*.png"))


def test_sequences_option_and_benchmark():
    assert len(build_dataset(camvid("test", sequences=["Seq05VD"]))) == 171
    data = BENCHMARKS["camvid_day2dusk"].configs({"camvid": CAMVID_ROOT})
    configs = (data.source, data.source_val, data.targets["dusk"], data.targets["day_test"])
    assert [len(build_dataset(c)) for c in configs] == [305, 101, 124, 171]


def test_void_is_ignored_and_inspect_matches_numpy():
    config = camvid("train", domain="dusk").model_copy(update={"limit": 3})
    dataset = build_dataset(config)
    expected = np.zeros(12, dtype=np.int64)
    for index in range(3):
        raw = np.asarray(Image.open(CAMVID_ROOT / "trainannot" / Path(dataset.names[index]).name)).astype(np.int64)
        label = dataset[index]["label"].numpy()
        np.testing.assert_array_equal(label == 255, raw == 11)
        np.testing.assert_array_equal(label[raw != 11], raw[raw != 11])
        expected += np.bincount(raw.ravel(), minlength=12)
    result = inspect_dataset(config)
    assert result["num_samples"] == 3 and result["num_classes"] == 11
    assert result["class_pixels"] == expected[:11].tolist() and result["ignored_pixels"] == expected[11]
    assert result["image_sizes"] == {"480x360": 3}
    assert sum(result["class_pixels"]) + result["ignored_pixels"] == 3 * 480 * 360


def test_joined_splits_and_empty_parts():
    dusk = build_dataset(camvid("train+test", domain="dusk"))
    assert len(dusk) == 124
    assert {name.split("/")[0] for name in dusk.names} == {"train", "test"}
    with pytest.raises(DataError, match="empty part"):
        build_dataset(camvid("train+", domain="dusk"))


def test_cache_decodes_each_frame_once_and_still_transforms(monkeypatch):
    from gkd.data import base

    reads = []
    original = base.read_image
    monkeypatch.setattr(base, "read_image", lambda path: reads.append(path) or original(path))
    config = camvid("train", domain="dusk").model_copy(update={"limit": 2, "cache": True})
    flips = build_dataset(config, transform=lambda sample: {**sample, "image": sample["image"].flip(-1)})
    first, again = flips[0], flips[0]
    assert len(reads) == 1
    assert (first["image"] == again["image"]).all()
    assert (first["image"] == flips.load(0)["image"].flip(-1)).all()

"""Bad input: each kind is a DataError naming the file, or with skip_bad a logged, listed skip."""

import logging

import numpy as np
import pytest

from gkd.data.base import DataError
from gkd.data.config import DatasetConfig, build_dataset, inspect_dataset
from tests.helpers.data_layouts import bdd100k, ids_grid, image, save_ids, save_rgb

SPLIT = "val"


@pytest.fixture
def root(tmp_path):
    """A BDD100K val split of 4 frames; ``masks`` / ``images`` hold the files."""
    return bdd100k(tmp_path / "bdd", SPLIT, frames=4)


def frame(root, index: int, kind: str):
    name = f"{index:04d}abcd-0000{index}"
    if kind == "image":
        return root / "images" / "10k" / SPLIT / f"{name}.jpg"
    return root / "labels" / "sem_seg" / "masks" / SPLIT / f"{name}.png"


def config(root, **kwargs) -> DatasetConfig:
    return DatasetConfig(name="bdd100k", root=root, split=SPLIT, **kwargs)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


def wrong_size(path):
    save_ids(path, ids_grid([1, 2], 5, 8))


def unknown_id(path):
    save_ids(path, ids_grid([1, 200]))


BAD_LABELS = {
    "truncated": (truncate, "corrupt or unreadable"),
    "corrupt": (corrupt, "corrupt or unreadable"),
    "size": (wrong_size, r"label size \(8, 5\) differs from image \(8, 6\)"),
    "unknown id": (unknown_id, r"label ids \[200\]"),
}


def test_missing_root_and_missing_split(tmp_path, root):
    with pytest.raises(DataError, match=r"nowhere: bdd100k root not found"):
        build_dataset(config(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"images/10k/train: not found"):
        build_dataset(DatasetConfig(name="bdd100k", root=root, split="train"))
    with pytest.raises(DataError, match="no root given"):
        build_dataset(DatasetConfig(name="bdd100k"))


def test_image_without_label_fails_at_construction_or_is_skipped(root, caplog):
    frame(root, 2, "label").unlink()
    with pytest.raises(DataError, match=r"0002abcd-00002\.png: label file not found"):
        build_dataset(config(root))
    with caplog.at_level(logging.WARNING, logger="gkd.data"):
        dataset = build_dataset(config(root, skip_bad=True))
    assert len(dataset) == 3 and "0002abcd" not in " ".join(dataset.names)
    assert len(dataset.skipped) == 1 and "0002abcd-00002.png" in dataset.skipped[0]
    assert "0002abcd-00002.png" in caplog.text


@pytest.mark.parametrize("kind", list(BAD_LABELS))
def test_bad_label_fails_at_load_naming_the_file(root, kind):
    damage, message = BAD_LABELS[kind]
    damage(frame(root, 1, "label"))
    dataset = build_dataset(config(root))  # decoding is left to load time
    dataset[0]
    with pytest.raises(DataError, match=r"0001abcd-00001\.png: " + message):
        dataset[1]


@pytest.mark.parametrize("kind", list(BAD_LABELS))
def test_skip_bad_drops_bad_samples_before_training(root, kind, caplog):
    damage, _ = BAD_LABELS[kind]
    damage(frame(root, 1, "label"))
    with caplog.at_level(logging.WARNING, logger="gkd.data"):
        dataset = build_dataset(config(root, skip_bad=True))
    assert len(dataset) == 3 and dataset.indices == [0, 2, 3]
    assert all(dataset[i]["label"].shape == (6, 8) for i in range(len(dataset)))
    assert len(dataset.skipped) == 1 and "0001abcd-00001.png" in dataset.skipped[0]
    assert "skipping" in caplog.text and "0001abcd-00001.png" in caplog.text


def test_corrupt_image_is_named(root):
    truncate(frame(root, 3, "image"))
    with pytest.raises(DataError, match=r"0003abcd-00003\.jpg: corrupt or unreadable"):
        build_dataset(config(root))[3]


def test_listed_image_missing_from_disk(tmp_path):
    root = tmp_path / "camvid"
    for split in ("train",):
        save_rgb(root / split / "0001TP_000010.png", image(0))
        save_ids(root / f"{split}annot" / "0001TP_000010.png", ids_grid([0, 11]))
    (root / "train.txt").write_text(
        "/SegNet/CamVid/train/0001TP_000010.png /SegNet/CamVid/trainannot/0001TP_000010.png\n"
        "/SegNet/CamVid/train/0001TP_000020.png /SegNet/CamVid/trainannot/0001TP_000020.png\n"
    )
    with pytest.raises(DataError, match=r"0001TP_000020\.png: image file not found"):
        build_dataset(DatasetConfig(name="camvid", root=root))
    assert len(build_dataset(DatasetConfig(name="camvid", root=root, skip_bad=True))) == 1
    (root / "train.txt").write_text("/SegNet/CamVid/train/0001TP_000010.png\n")
    with pytest.raises(DataError, match=r"train\.txt:1: expected 'image label'"):
        build_dataset(DatasetConfig(name="camvid", root=root))


def test_all_samples_bad_is_an_error(root):
    for index in range(4):
        unknown_id(frame(root, index, "label"))
    with pytest.raises(DataError, match="no samples left"):
        build_dataset(config(root, skip_bad=True))


def test_inspect_counts_good_samples_and_lists_bad_ones(root):
    truncate(frame(root, 0, "label"))
    with pytest.raises(DataError, match=r"0000abcd-00000\.png"):
        inspect_dataset(config(root))
    result = inspect_dataset(config(root, skip_bad=True))
    per_frame = np.bincount(ids_grid([*range(19), 255]).ravel(), minlength=256)
    assert result["num_samples"] == 3 and len(result["skipped"]) == 1
    assert result["class_pixels"] == (3 * per_frame[:19]).tolist()
    assert result["ignored_pixels"] == 3 * per_frame[255]

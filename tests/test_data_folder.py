"""The ``folder`` dataset (bring your own data): both layouts, classes from dataset.yaml or the options, id,
16-bit and colour-coded masks, bad input named, ``skip_bad``, the pre-flight check, images-only proxy
sets, and the same class pixel counts as ``camvid`` on CamVid frames laid out as a folder dataset."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gkd.data.base import IGNORE_INDEX, DataError, ImageListDataset
from gkd.data.camvid import CAMVID_PALETTE
from gkd.data.config import DatasetConfig, build_dataset, dataset_info, describe_dataset, inspect_dataset
from gkd.evaluate.inference import evaluate_predictor, torch_predictor
from gkd.preflight import DataUse, check_dataset
from gkd.recipe import load_recipe
from gkd.stages import STAGES
from gkd.stages.checks import stage_data
from tests.helpers.data_layouts import ids_grid, image, save_ids, save_rgb
from tests.helpers.paths import CAMVID_ROOT, TINY_RECIPE
from tests.helpers.tiny_models import tiny_segmentor

CLASSES = ["road", "building", "vegetation", "sky", "car", "person", "water"]
PALETTE = [(128, 64, 128), (70, 70, 70), (107, 142, 35), (70, 130, 180), (0, 0, 142), (220, 20, 60), (0, 80, 200)]
H, W = 6, 8


def mask_ids(index: int) -> np.ndarray:
    """Class ids 0..6 and ignored pixels, shifted per frame."""
    return ids_grid(list(np.roll([*range(len(CLASSES)), IGNORE_INDEX], index)), H, W)


def dirs(root: Path, split: str, layout: str) -> tuple[Path, Path]:
    if layout == "mmseg":
        return root / "img_dir" / split, root / "ann_dir" / split
    return root / split / "images", root / split / "masks"


def save_jpeg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)
    return path


def save_mask(path: Path, ids: np.ndarray, kind: str) -> Path:
    """Class ids as ``kind``: ``ids`` (8-bit), ``ids16`` (16-bit, raw id = 1000 + class) or ``rgb`` (palette)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "ids":
        return save_ids(path, ids)
    if kind == "ids16":
        Image.fromarray(np.where(ids == IGNORE_INDEX, IGNORE_INDEX, 1000 + ids).astype(np.uint16)).save(path)
        return path
    colors = np.array([*PALETTE, *[(0, 0, 0)] * (256 - len(PALETTE))], dtype=np.uint8)
    return save_rgb(path, colors[ids])


def make_dataset(root: Path, layout: str = "split", kind: str = "ids", frames: int = 3, **meta) -> Path:
    """A train and a val split of JPEG images and PNG masks; ``meta`` is written as dataset.yaml."""
    for split in ("train", "val"):
        images, masks = dirs(root, split, layout)
        for i in range(frames):
            save_jpeg(images / f"{split}_{i:03d}.jpg", image(i))
            save_mask(masks / f"{split}_{i:03d}.png", mask_ids(i), kind)
    if meta:
        (root / "dataset.yaml").write_text(yaml.safe_dump(meta))
    return root


def folder(root: Path, split: str = "train", **kwargs) -> DatasetConfig:
    return DatasetConfig(name="folder", root=root, split=split, **kwargs)


def expected_pixels(frames: int = 3) -> list[int]:
    counts = sum(np.bincount(mask_ids(i).ravel(), minlength=256) for i in range(frames))
    return counts[: len(CLASSES)].tolist()


# -- reading -------------------------------------------------------------------------------------------------
KINDS = {  # mask kind: dataset.yaml beyond the classes
    "ids": {},
    "ids16": {"label_map": {1000 + k: k for k in range(len(CLASSES))}},
    "rgb": {"palette": [list(c) for c in PALETTE], "ignore_colors": [[0, 0, 0]]},
}


@pytest.mark.parametrize("layout", ["split", "mmseg"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("classes", ["list", "map"])
def test_reads_both_layouts_and_mask_kinds_with_its_own_classes(tmp_path, layout, kind, classes):
    names = CLASSES if classes == "list" else dict(enumerate(CLASSES))
    root = make_dataset(tmp_path, layout, kind, classes=names, **KINDS[kind])
    for split in ("train", "val"):
        dataset = build_dataset(folder(root, split))
        assert len(dataset) == 3 and dataset.num_classes == 7 and dataset.class_names == CLASSES
        assert dataset.names == [
            f"{dirs(root, split, layout)[0].relative_to(root)}/{split}_{i:03d}.jpg" for i in range(3)
        ]
        for i in range(3):
            assert np.array_equal(dataset[i]["label"].numpy(), mask_ids(i))
            assert dataset[i]["image"].shape == (3, H, W)
    info = inspect_dataset(folder(root))
    assert info["class_names"] == CLASSES and info["class_pixels"] == expected_pixels()
    assert info["ignored_pixels"] == 3 * H * W - sum(expected_pixels())
    assert dataset_info(folder(root))[1] == tuple(CLASSES)
    assert describe_dataset(folder(root))["layout"] == ("mmseg" if layout == "mmseg" else "split/images+masks")


def test_classes_and_mapping_from_the_options(tmp_path):
    root = make_dataset(tmp_path, classes=["wrong"])  # the recipe's options win over dataset.yaml
    shifted = folder(root, options={"classes": CLASSES[:6], "palette": PALETTE[:6], "reduce_zero_label": True})
    dataset = build_dataset(shifted)
    assert dataset.class_names == CLASSES[:6] and [tuple(c) for c in dataset.palette] == PALETTE[:6]
    expected = np.where((mask_ids(1) == 0) | (mask_ids(1) == IGNORE_INDEX), IGNORE_INDEX, mask_ids(1) - 1)
    assert np.array_equal(dataset[1]["label"].numpy(), expected)
    ignore_sky = folder(root, options={"classes": CLASSES, "ignore_index": 3, "label_map": {3: 3, 255: 4}})
    with pytest.raises(DataError, match=r"train_000\.png: label ids \[0, 1, 2, 4, 5, 6\]"):
        build_dataset(ignore_sky)[0]  # a label_map lists every raw id
    remapped = folder(root, options={"classes": ["a", "b"], "label_map": {k: k % 2 for k in range(7)}})
    assert np.array_equal(
        build_dataset(remapped)[0]["label"].numpy(), np.where(mask_ids(0) == 255, 255, mask_ids(0) % 2)
    )


def test_suffixes_image_formats_and_sub_folders(tmp_path):
    images, masks = dirs(tmp_path, "train", "split")
    (images / "city").mkdir(parents=True)
    for i, fmt in enumerate(["png", "tiff", "webp", "jpeg"]):
        Image.fromarray(image(i)).save(images / "city" / f"f{i}.{fmt}", **({"lossless": True} if fmt == "webp" else {}))
        save_ids(masks / "city" / f"f{i}_gtFine.png", mask_ids(i))
    dataset = build_dataset(folder(tmp_path, options={"classes": CLASSES, "mask_suffix": "_gtFine.png"}))
    assert [Path(n).suffix for n in dataset.names] == [".png", ".tiff", ".webp", ".jpeg"]
    for i in range(3):  # the lossless formats read back exactly
        assert np.array_equal(dataset[i]["image"].mul(255).round().byte().permute(1, 2, 0).numpy(), image(i))
        assert np.array_equal(dataset[i]["label"].numpy(), mask_ids(i))
    only_png = folder(tmp_path, options={"classes": CLASSES, "img_suffix": ".png", "mask_suffix": "_gtFine.png"})
    assert len(build_dataset(only_png, labeled=False)) == 1  # the other masks would lack their image


# -- bad input ------------------------------------------------------------------------------------------------
def frame(root: Path, index: int, kind: str) -> Path:
    images, masks = dirs(root, "train", "split")
    return images / f"train_{index:03d}.jpg" if kind == "image" else masks / f"train_{index:03d}.png"


def without_image(root: Path) -> None:
    frame(root, 1, "image").unlink()


def without_mask(root: Path) -> None:
    frame(root, 1, "mask").unlink()


def corrupt_mask(root: Path) -> None:
    frame(root, 1, "mask").write_bytes(b"not a png at all")


def corrupt_image(root: Path) -> None:
    path = frame(root, 1, "image")
    path.write_bytes(path.read_bytes()[:100])


def wrong_size(root: Path) -> None:
    save_ids(frame(root, 1, "mask"), np.zeros((H + 1, W), dtype=np.int64))


def unknown_ids(root: Path) -> None:
    save_ids(frame(root, 1, "mask"), ids_grid([0, 7, 9, 255]))


BAD = {  # damage: (message, found when the dataset is built rather than when the sample is loaded)
    "image without mask": (without_mask, r"train_001\.png: label file not found \(for image .*train_001\.jpg\)", True),
    "mask without image": (without_image, r"train_001\.png: mask without an image", True),
    "corrupt mask": (corrupt_mask, r"train_001\.png: corrupt or unreadable image", False),
    "corrupt image": (corrupt_image, r"train_001\.jpg: corrupt or unreadable image", False),
    "mask of another size": (wrong_size, r"train_001\.png: label size \(8, 7\) differs from image \(8, 6\)", False),
    "ids outside the classes": (unknown_ids, r"train_001\.png: label ids \[7, 9\]", False),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_input_is_an_error_naming_the_file(tmp_path, bad):
    damage, message, at_build = BAD[bad]
    root = make_dataset(tmp_path, classes=CLASSES)
    damage(root)
    if at_build:
        with pytest.raises(DataError, match=message):
            build_dataset(folder(root))
        return
    dataset = build_dataset(folder(root))
    dataset[0]
    with pytest.raises(DataError, match=message):
        dataset[1]


@pytest.mark.parametrize("bad", list(BAD))
def test_skip_bad_skips_and_reports(tmp_path, bad, caplog):
    damage, message, _ = BAD[bad]
    root = make_dataset(tmp_path, classes=CLASSES)
    damage(root)
    with caplog.at_level(logging.WARNING, logger="gkd.data"):
        dataset = build_dataset(folder(root, skip_bad=True))
    assert len(dataset) == 2 and all("train_001" not in dataset.names[i] for i in dataset.indices)
    assert len(dataset.skipped) == 1 and re.search(message, dataset.skipped[0])
    assert "skipping" in caplog.text and "train_001" in caplog.text
    info = inspect_dataset(folder(root, skip_bad=True))
    assert info["num_samples"] == 2 and len(info["skipped"]) == 1


def test_the_preflight_check_names_bad_files(tmp_path):
    root = make_dataset(tmp_path, classes=CLASSES)
    use = DataUse("source", folder(root), labeled=True)
    assert check_dataset(use, None, full=False)[2] == []
    wrong_size(root)
    _, samples, problems = check_dataset(use, None, full=False)
    assert samples == 3 and len(problems) == 1 and "train_001.png: label size (8, 7) differs" in problems[0]
    unknown_ids(root)  # ids are checked by the full check only, as for every dataset
    assert check_dataset(use, None, full=False)[2] == []
    assert "train_001.png: label ids [7, 9]" in check_dataset(use, None, full=True)[2][0]
    without_image(root)
    assert "train_001.png: mask without an image" in check_dataset(use, None, full=False)[2][0]
    (root / "dataset.yaml").unlink()
    assert "has no classes: write" in check_dataset(use, None, full=False)[2][0]


def test_bad_class_tables_are_errors(tmp_path):
    root = make_dataset(tmp_path)
    with pytest.raises(DataError, match=r"has no classes: write .*dataset\.yaml"):
        build_dataset(folder(root))
    (root / "dataset.yaml").write_text("classes: [a, b\n")
    with pytest.raises(DataError, match=r"dataset\.yaml: unreadable"):
        build_dataset(folder(root))
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": {0: "a", 2: "b"}}))
    with pytest.raises(DataError, match=r"dataset\.yaml: class ids \[0, 2\] must be 0\.\.N-1"):
        build_dataset(folder(root))
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": CLASSES, "palette": PALETTE[:2], "colour": 1}))
    with pytest.raises(DataError, match=r"dataset\.yaml: colour: extra inputs are not permitted"):
        build_dataset(folder(root))
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": CLASSES, "palette": [list(c) for c in PALETTE[:2]]}))
    with pytest.raises(DataError, match=r"dataset\.yaml: palette has 2 colours for 7 classes"):
        build_dataset(folder(root))
    with pytest.raises(ValueError, match="label_map and reduce_zero_label exclude each other"):
        folder(root, options={"label_map": {0: 0}, "reduce_zero_label": True})


def test_colour_masks_need_the_palette_and_known_colours(tmp_path):
    root = make_dataset(tmp_path, kind="rgb", classes=CLASSES)
    with pytest.raises(DataError, match=r"train_000\.png: colour-coded mask, but no palette"):
        build_dataset(folder(root))[0]
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": CLASSES, "palette": [list(c) for c in PALETTE]}))
    with pytest.raises(DataError, match=r"train_000\.png: label colours \[\(0, 0, 0\)\] are not in"):
        build_dataset(folder(root))[0]  # the ignored pixels' black is no class colour


def test_two_images_of_one_name_are_an_error(tmp_path):
    root = make_dataset(tmp_path, classes=CLASSES)
    save_rgb(frame(root, 1, "image").with_suffix(".png"), image(1))
    with pytest.raises(DataError, match=r"train_001\.png: same name as .*train_001\.jpg"):
        build_dataset(folder(root))


# -- images only: an unlabelled proxy set ---------------------------------------------------------------------
def test_images_only_is_an_unlabelled_proxy_set(tmp_path):
    labelled = make_dataset(tmp_path / "labelled", classes=CLASSES)
    proxy = tmp_path / "proxy"
    for i in range(4):
        save_jpeg(proxy / "train" / "images" / f"p{i}.jpg", image(10 + i))
    images = build_dataset(folder(proxy), labeled=False)
    assert isinstance(images.dataset, ImageListDataset) and len(images) == 4 and "label" not in images[0]
    with pytest.raises(DataError, match=r"train/masks: not found \(folder split 'train'\)"):
        build_dataset(folder(proxy))
    data = {
        "source": {"name": "folder", "root": str(labelled)},
        "source_val": {"name": "folder", "root": str(labelled), "split": "val"},
        "proxy": {"name": "folder", "root": str(proxy)},
        "targets": {"val": {"name": "folder", "root": str(labelled), "split": "val"}},
        "teacher_source": None,
    }
    recipe = load_recipe(
        TINY_RECIPE,
        [f"data.{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in data.items()],
    )
    assert dataset_info(recipe.data.source)[:2] == (7, tuple(CLASSES))
    uses = {use.role: use for use in stage_data(recipe, [s for s in STAGES if s.needed(recipe)])}
    assert uses["proxy"].config.root == proxy and not uses["proxy"].labeled
    for use in uses.values():
        assert check_dataset(use, None, full=True)[2] == []


# -- CamVid as a folder dataset -------------------------------------------------------------------------------
@pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason=f"{CAMVID_ROOT} not present")
@pytest.mark.parametrize("masks", ["ids", "rgb"])
def test_camvid_frames_as_a_folder_dataset_count_the_same_pixels_and_score_the_same(tmp_path, masks):
    """ids: CamVid's own images and id maps linked in place, void (11) ignored by ``ignore_index``; rgb: the
    id maps drawn in CamVid's palette into the mmseg layout, void drawn black and ignored by colour. One model
    scores the same mIoU on both."""
    camvid = DatasetConfig(name="camvid", root=CAMVID_ROOT, split="train", limit=4)
    selection = build_dataset(camvid, labeled=False)
    frames = [Path(selection.dataset.paths[i]) for i in selection.indices]
    images, labels = dirs(tmp_path, "train", "split" if masks == "ids" else "mmseg")
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for path in frames:
        (images / path.name).symlink_to(path)
        annot = CAMVID_ROOT / "trainannot" / path.name
        if masks == "ids":
            (labels / path.name).symlink_to(annot)
        else:
            colors = np.array([*CAMVID_PALETTE, *[(0, 0, 0)] * (256 - len(CAMVID_PALETTE))], dtype=np.uint8)
            save_rgb(labels / path.name, colors[np.asarray(Image.open(annot))])
    meta = {"classes": list(dataset_info("camvid")[1]), "palette": [list(c) for c in CAMVID_PALETTE]}
    meta.update({"ignore_index": 11} if masks == "ids" else {"ignore_colors": [[0, 0, 0]]})
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(meta))
    ours, theirs = inspect_dataset(folder(tmp_path)), inspect_dataset(camvid)
    assert ours["num_samples"] == theirs["num_samples"] == 4
    assert ours["class_names"] == theirs["class_names"]
    assert ours["class_pixels"] == theirs["class_pixels"] and sum(ours["class_pixels"]) > 0
    assert ours["ignored_pixels"] == theirs["ignored_pixels"] and ours["image_sizes"] == theirs["image_sizes"]
    predict = torch_predictor(tiny_segmentor(), torch.device("cpu"))
    scores = [
        evaluate_predictor(predict, build_dataset(config), 11, (64, 96), show_progress=False)
        for config in (folder(tmp_path), camvid)
    ]
    assert scores[0]["miou"] == scores[1]["miou"] and scores[0]["iou"] == scores[1]["iou"]

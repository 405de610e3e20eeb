"""Each dataset read from its exact on-disk layout; mapped labels checked pixel for pixel against tables
written out here independently of the code."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gkd.data.base import DataError
from gkd.data.config import DatasetConfig, build_dataset, describe_dataset
from tests.helpers.data_layouts import H, W, bdd100k, cityscapes, ids_grid, image, save_ids, save_rgb

IGN = 255
# cityscapesScripts labels.py: label id -> train id, ids 0..33
CITYSCAPES_TRAIN_IDS = [IGN] * 7 + [0, 1, IGN, IGN, 2, 3, 4, IGN, IGN, IGN, 5, IGN, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
CITYSCAPES_TRAIN_IDS += [IGN, IGN, 16, 17, 18]


def build(name: str, root: Path, split: str, **kwargs):
    return build_dataset(DatasetConfig(name=name, root=root, split=split, **kwargs))


def raw(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def test_cityscapes_label_ids_map_to_train_ids_pixel_for_pixel(tmp_path):
    assert len(CITYSCAPES_TRAIN_IDS) == 34
    root = cityscapes(tmp_path / "cs", "val", frames=3)
    dataset = build("cityscapes", root, "val")
    assert len(dataset) == 3
    assert dataset.names[0] == "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png"
    for index, (_, label_path) in enumerate(dataset.dataset.pairs):
        sample = dataset[index]
        expected = np.array(CITYSCAPES_TRAIN_IDS)[raw(label_path)]
        assert sample["label"].dtype.is_floating_point is False
        np.testing.assert_array_equal(sample["label"].numpy(), expected)
        assert set(np.unique(raw(label_path))) == set(range(34))  # every id, ignored ones included
        assert sample["image"].shape == (3, H, W) and sample["image"].min() >= 0 and sample["image"].max() <= 1


def test_cityscapes_train_id_files_option(tmp_path):
    dataset = build("cityscapes", cityscapes(tmp_path / "cs"), "train", options={"labels": "labelTrainIds"})
    np.testing.assert_array_equal(dataset[0]["label"].numpy(), ids_grid([0, 18, 255]))


def test_gtav_palette_labels_and_standard_split_file(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path / "gtav"
    palette = [(i * 7 % 256, i * 13 % 256, i * 29 % 256) for i in range(34)]
    for frame in range(1, 6):
        save_rgb(root / "images" / f"{frame:05d}.png", image(frame))
        save_ids(root / "labels" / f"{frame:05d}.png", ids_grid(list(range(frame, 34)) + list(range(frame))), palette)
    everything = build("gtav", root, "train")  # no split.mat: every split is all frames
    assert len(everything) == 5
    label_file = root / "labels" / "00002.png"
    assert Image.open(label_file).mode == "P"
    np.testing.assert_array_equal(everything[1]["label"].numpy(), np.array(CITYSCAPES_TRAIN_IDS)[raw(label_file)])

    scipy_io.savemat(root / "split.mat", {"trainIds": [[4], [1], [2]], "valIds": [[3]], "testIds": [[5]]})
    assert build("gtav", root, "train").names == ["images/00001.png", "images/00002.png", "images/00004.png"]
    assert build("gtav", root, "val").names == ["images/00003.png"]
    assert len(build("gtav", root, "all")) == 5
    with pytest.raises(DataError, match="no split 'training'"):
        build("gtav", root, "training")


def test_bdd100k_train_ids_pass_through_and_unknown_id_fails(tmp_path):
    root = bdd100k(tmp_path / "bdd", "val")
    dataset = build("bdd100k", root, "val")
    np.testing.assert_array_equal(dataset[0]["label"].numpy(), ids_grid([*range(19), 255]))
    save_ids(root / "labels" / "sem_seg" / "masks" / "val" / "0001abcd-00001.png", ids_grid([0, 19]))
    with pytest.raises(DataError, match=r"0001abcd-00001\.png: label ids \[19\]"):
        dataset[1]


# Mapillary v1.2 id -> Cityscapes train id, everything else ignored (Rein's name rules on the v1.2 names)
MAPILLARY_KEPT = {
    13: 0, 7: 0, 8: 0, 10: 0, 14: 0, 23: 0, 24: 0,  # road, bike lane, crosswalk plain, parking, service lane, markings
    15: 1, 2: 1, 9: 1, 11: 1,  # sidewalk, curb, curb cut, pedestrian area
    17: 2, 6: 3, 3: 4,  # building, wall, fence
    45: 5, 47: 5, 44: 5,  # pole, utility pole, street light
    48: 6, 50: 7, 49: 7, 46: 7,  # traffic light; traffic sign front, back, frame
    30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12,  # vegetation, terrain, sky, person, riders
    55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,  # car, truck, bus, on rails, motorcycle, bicycle
}  # fmt: skip


@pytest.mark.parametrize(("split_folder", "versioned"), [("validation", False), ("training", True)])
def test_mapillary_palette_labels_map_66_to_19(tmp_path, split_folder, versioned):
    from gkd.data.mapillary import MAPILLARY_V12_LABELS

    palette = [label.color for label in MAPILLARY_V12_LABELS]
    assert len(palette) == 66 and len(set(palette)) == 66
    root = tmp_path / "mapillary"
    labels = root / split_folder / ("v1.2/labels" if versioned else "labels")
    save_rgb(root / split_folder / "images" / "abc.jpg", image(0, 6, 12))
    label_file = save_ids(labels / "abc.png", ids_grid(list(range(66)), 6, 12), palette)
    if versioned:  # a v2.0 download also ships v2.0 labels (124 classes): they must not be read
        save_ids(root / split_folder / "v2.0" / "labels" / "abc.png", ids_grid([123], 6, 12))
    dataset = build("mapillary", root, "val" if split_folder == "validation" else "train")
    expected = np.vectorize(lambda i: MAPILLARY_KEPT.get(i, IGN))(raw(label_file))
    np.testing.assert_array_equal(dataset[0]["label"].numpy(), expected)
    by_folder_name = DatasetConfig(name="mapillary", root=root, split=split_folder)
    assert describe_dataset(by_folder_name)["missing"] == []
    assert len(build_dataset(by_folder_name)) == 1


def test_acdc_conditions_are_domains(tmp_path):
    root = tmp_path / "acdc"
    for n, condition in enumerate(("night", "fog")):
        for frame in range(n + 1):
            stem = f"GOPR0{n}_frame_{frame:06d}"
            save_rgb(root / "rgb_anon" / condition / "val" / f"GOPR0{n}" / f"{stem}_rgb_anon.png", image(frame))
            gt = root / "gt" / condition / "val" / f"GOPR0{n}" / f"{stem}_gt_labelTrainIds.png"
            save_ids(gt, ids_grid([n, 255, 18]))
    night = build("acdc", root, "val", options={"condition": "night"})
    fog = build("acdc", root, "val", options={"condition": "fog"})
    assert (len(night), len(fog)) == (1, 2)
    np.testing.assert_array_equal(night[0]["label"].numpy(), ids_grid([0, 255, 18]))
    np.testing.assert_array_equal(fog[1]["label"].numpy(), ids_grid([1, 255, 18]))
    with pytest.raises(DataError, match=r"rgb_anon/rain/val"):  # all four conditions need their folders
        build("acdc", root, "val")


# ISPRS colour code -> class id (impervious, building, low vegetation, tree, car, clutter); black = eroded boundary
ISPRS_COLORS = {
    (255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4, (255, 0, 0): 5,
    (0, 0, 0): IGN,
}  # fmt: skip


def colour_label(seed: int, height: int = H, width: int = W) -> tuple[np.ndarray, np.ndarray]:
    """A colour-coded label tile and the class ids it encodes."""
    colours = list(ISPRS_COLORS)
    order = np.random.default_rng(seed).permutation(height * width)
    picks = (order % len(colours)).reshape(height, width)
    return np.array(colours, dtype=np.uint8)[picks], np.array(list(ISPRS_COLORS.values()))[picks]


def save_tif(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, "RGB").save(path, format="TIFF")


def test_potsdam_original_colour_tiles(tmp_path):
    from gkd.data.isprs import POTSDAM_TILES

    assert (len(POTSDAM_TILES["train"]), len(POTSDAM_TILES["val"])) == (24, 14)
    root = tmp_path / "potsdam"
    expected = {}
    for n, tile in enumerate(POTSDAM_TILES["train"] + POTSDAM_TILES["val"]):
        save_tif(root / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", image(n))
        save_tif(root / "3_Ortho_IRRG" / f"top_potsdam_{tile}_IRRG.tif", image(n + 100))
        colours, ids = colour_label(n)
        save_tif(root / "5_Labels_all_noBoundary" / f"top_potsdam_{tile}_label_noBoundary.tif", colours)
        full, full_ids = colour_label(n + 100)
        save_tif(root / "5_Labels_all" / f"top_potsdam_{tile}_label.tif", full)
        expected[tile] = ids, full_ids
    train = build("potsdam", root, "train")
    assert len(train) == 24 and train.names[0] == "2_Ortho_RGB/top_potsdam_2_10_RGB.tif"  # mmseg: 2_10 is train
    np.testing.assert_array_equal(train[0]["label"].numpy(), expected["2_10"][0])
    irrg = build("potsdam", root, "val", options={"modality": "irrg", "eroded": False})
    assert irrg.names[0] == "3_Ortho_IRRG/top_potsdam_2_13_IRRG.tif"  # mmseg: 2_13 is val
    n = (POTSDAM_TILES["train"] + POTSDAM_TILES["val"]).index("2_13")
    np.testing.assert_array_equal(irrg[0]["image"].numpy(), image(n + 100).transpose(2, 0, 1) / np.float32(255))
    np.testing.assert_array_equal(irrg[0]["label"].numpy(), expected["2_13"][1])
    assert len(build("potsdam", root, "all")) == 38
    assert describe_dataset(DatasetConfig(name="potsdam", root=root))["layout"] == "original"

    colours = np.zeros((H, W, 3), np.uint8)
    colours[0, 0] = (250, 255, 0)  # almost car yellow: an error, never a guess
    save_tif(root / "5_Labels_all_noBoundary" / "top_potsdam_2_10_label_noBoundary.tif", colours)
    with pytest.raises(DataError, match=r"top_potsdam_2_10_label_noBoundary\.tif: label colours \[\(250, 255, 0\)\]"):
        build("potsdam", root, "train")[0]


@pytest.mark.parametrize("name", ["potsdam", "vaihingen"])
def test_isprs_mmseg_converted_ids_reduce_zero_label(tmp_path, name):
    root = tmp_path / name
    for split in ("train", "val"):
        save_rgb(root / "img_dir" / split / "2_10_0_0_512_512.png", image(0))
        save_ids(root / "ann_dir" / split / "2_10_0_0_512_512.png", ids_grid([0, 1, 2, 3, 4, 5, 6]))
    dataset = build(name, root, "val")
    np.testing.assert_array_equal(dataset[0]["label"].numpy(), ids_grid([IGN, 0, 1, 2, 3, 4, 5]))
    assert describe_dataset(DatasetConfig(name=name, root=root, split="val"))["layout"] == "mmseg"
    save_ids(root / "ann_dir" / "train" / "2_10_0_0_512_512.png", ids_grid([7]))
    with pytest.raises(DataError, match=r"label ids \[7\]"):
        build(name, root, "train")[0]


def test_vaihingen_original_tiles_by_area(tmp_path):
    from gkd.data.isprs import VAIHINGEN_AREAS

    root = tmp_path / "vaihingen"
    eroded = root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"
    expected = {}
    for n, area in enumerate(VAIHINGEN_AREAS["train"] + VAIHINGEN_AREAS["val"]):
        save_tif(root / "top" / f"top_mosaic_09cm_{area}.tif", image(n))
        colours, expected[area] = colour_label(n)
        save_tif(eroded / f"top_mosaic_09cm_{area}_noBoundary.tif", colours)
    train, val = build("vaihingen", root, "train"), build("vaihingen", root, "val")
    assert (len(train), len(val)) == (16, 17)
    assert "top/top_mosaic_09cm_area1.tif" in train.names and "top/top_mosaic_09cm_area2.tif" in val.names
    index = val.names.index("top/top_mosaic_09cm_area2.tif")
    np.testing.assert_array_equal(val[index]["label"].numpy(), expected["area2"])
    with pytest.raises(DataError, match="ground_truth_COMPLETE"):  # full labels not unpacked here
        build("vaihingen", root, "val", options={"eroded": False})


def test_image_folder_flat_and_imagenet_style(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        save_rgb(flat / f"{i}.jpg", image(i))
    (flat / "notes.txt").write_text("not an image")
    nested = tmp_path / "imagenet"
    for wnid in ("n01440764", "n01443537"):
        save_rgb(nested / "train" / wnid / f"{wnid}_1.JPEG", image(1))
    flat_set = build_dataset(DatasetConfig(name="image_folder", root=flat), labeled=False)
    assert len(flat_set) == 3 and "label" not in flat_set[0]
    nested_set = build_dataset(DatasetConfig(name="image_folder", root=nested, split="train"), labeled=False)
    assert nested_set.names == ["train/n01440764/n01440764_1.JPEG", "train/n01443537/n01443537_1.JPEG"]
    with pytest.raises(DataError, match="has no labels"):
        build_dataset(DatasetConfig(name="image_folder", root=flat))


def test_unlabeled_view_of_a_labeled_dataset_reads_no_label(tmp_path):
    root = cityscapes(tmp_path / "cs", "test")
    for label in (root / "gtFine").rglob("*.png"):
        label.unlink()  # e.g. a split whose labels are withheld
    view = build_dataset(DatasetConfig(name="cityscapes", root=root, split="test"), labeled=False)
    assert len(view) == 2 and set(view[0]) == {"image", "path"}
    with pytest.raises(DataError, match="label file not found"):
        build("cityscapes", root, "test")

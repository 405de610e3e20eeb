"""``gkd-compress predict``: a run's segmentor on the user's own images, folders, globs and videos.

Every input frame goes through the same inference as the recipe's evaluation (``whole``: resized to the
model's input size, logits resized back; ``slide``: windows of the input size), so labels come back at the
frame's native size whatever its size. The model runs in any runtime of `gkd.export.runtimes` (PyTorch, or an
artifact the export stage wrote). ``--out`` receives::

    labels/<name>.png      class ids, palette PNG in the dataset's colours (opens as a colour image)
    overlays/<name>.png    the frame with its label colours blended in
    contact_sheet.png      up to 16 frames and overlays side by side, with the class legend
    summary.json           per frame: input, size, share of each class; the inputs skipped and why

Each file is written atomically and ``summary.json`` last. Video frames (``<video stem>_f<index>``) are
decoded by PyAV (the ``video`` extra). An unreadable input is logged with its name and listed in the summary
(``strict`` stops at it instead).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from gkd.data.base import IMAGE_SUFFIXES, DataError, read_image
from gkd.data.config import DatasetConfig, dataset_info
from gkd.predictor import PredictError, Predictor
from gkd.utils.io import atomic_path, write_json

log = logging.getLogger("gkd")

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
SUMMARY_FILE = "summary.json"
CONTACT_SHEET_FILE = "contact_sheet.png"
SHEET_FRAMES = 16
SHEET_WIDTH = 240  # pixels of one thumbnail
SHEET_PAIRS_PER_ROW = 2
OVERLAY_ALPHA = 0.5


@dataclass
class Frame:
    """One image to segment: a picture file, or one frame of a video."""

    name: str
    source: Path
    index: int | None  # frame index in a video, None for a picture
    image: np.ndarray  # RGB uint8 (H, W, 3)


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named by ``inputs`` (files, folders, glob patterns), in order, each once.

    A folder gives its pictures and videos (by suffix, sorted, not recursive); a pattern the files it matches
    (``**`` recurses). A file given by name is taken whatever its suffix (so an unreadable one is reported).
    """
    found: list[Path] = []
    suffixes = (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES)
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).suffix.lower() in suffixes]
        if not matches:
            raise FileNotFoundError(f"{item}: no such file or folder, and no picture or video matches it")
        found += matches
    return list(dict.fromkeys(found))


def _video_frames(path: Path, frame_step: int) -> Iterator[tuple[int, np.ndarray]]:
    try:
        import av
    except ImportError as error:
        raise PredictError(f"{path}: video input needs PyAV: pip install 'gkd-compress[video]'") from error
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            for index, frame in enumerate(container.decode(video=0)):
                if index % frame_step == 0:
                    yield index, frame.to_ndarray(format="rgb24")
    except av.FFmpegError as error:
        raise DataError(f"{path}: corrupt or unreadable video ({error})") from error


def _video_length(path: Path, frame_step: int) -> int | None:
    """Frames a video will give (from its header; None when unknown or unreadable)."""
    try:
        import av

        with av.open(str(path)) as container:
            frames = container.streams.video[0].frames if container.streams.video else 0
    except Exception:  # an unreadable video is reported when it is decoded
        return None
    return -(-frames // frame_step) if frames else None


def iter_frames(
    paths: Sequence[Path], frame_step: int = 1, strict: bool = False, skipped: list[dict] | None = None
) -> Iterator[Frame]:
    """Every picture and video frame of ``paths``.

    Args:
        paths: pictures and videos (`collect_inputs`).
        frame_step: keep every n-th video frame.
        strict: raise at an unreadable input instead of skipping it.
        skipped: unreadable inputs are appended here (file and reason).
    """
    used: set[str] = set()

    def unique(name: str) -> str:
        candidate, count = name, 1
        while candidate in used:
            count += 1
            candidate = f"{name}-{count}"
        used.add(candidate)
        return candidate

    for path in paths:
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                stem = unique(path.stem)
                for index, image in _video_frames(path, frame_step):
                    yield Frame(f"{stem}_f{index:06d}", path, index, image)
            else:
                image = read_image(path)
                yield Frame(unique(path.stem), path, None, image)
        except DataError as error:
            if strict:
                raise PredictError(str(error)) from error
            log.error("predict: skipped %s", error)
            if skipped is not None:
                skipped.append({"input": str(path), "error": str(error)})


def _palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    flat = [int(v) for color in palette for v in color]
    return flat + [0] * (768 - len(flat))


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with its label colours blended in (``alpha`` of colour)."""
    colors = palette[label]
    return (image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha).round().astype(np.uint8)


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")


def _thumbnail(image: np.ndarray) -> Image.Image:
    height = max(1, round(image.shape[0] * SHEET_WIDTH / image.shape[1]))
    return Image.fromarray(image).resize((SHEET_WIDTH, height))


class SheetSampler:
    """Evenly spaced thumbnails of a stream of unknown length in bounded memory: every ``stride``-th frame
    is kept, and when more than twice the wanted count are held, every other one is dropped and the stride
    doubles."""

    def __init__(self, count: int = SHEET_FRAMES) -> None:
        self.count = count
        self.stride = 1
        self.seen = 0
        self.kept: list[tuple[int, str, Image.Image, Image.Image]] = []

    def add(self, name: str, image: np.ndarray, overlay_image: np.ndarray) -> None:
        if self.seen % self.stride == 0:
            self.kept.append((self.seen, name, _thumbnail(image), _thumbnail(overlay_image)))
            if len(self.kept) > 2 * self.count:
                self.stride *= 2
                self.kept = [item for item in self.kept if item[0] % self.stride == 0]
        self.seen += 1

    def picks(self) -> list[tuple[str, Image.Image, Image.Image]]:
        """At most ``count`` of the kept frames, evenly spaced, first and last included."""
        if not self.kept:
            return []
        indices = np.unique(np.linspace(0, len(self.kept) - 1, min(self.count, len(self.kept))).round().astype(int))
        return [self.kept[int(i)][1:] for i in indices]


def contact_sheet(
    cells: Sequence[tuple[str, Image.Image, Image.Image]], class_names: Sequence[str], palette: np.ndarray, path: Path
) -> None:
    """A PNG grid of ``(name, image, overlay)`` thumbnail pairs, ``SHEET_PAIRS_PER_ROW`` to a row, and a legend
    of the class colours below."""
    text_height, legend_columns = 12, 4
    cell_width = 2 * SHEET_WIDTH
    cell_height = max(image.height for _, image, _ in cells) + text_height + 4
    columns = min(SHEET_PAIRS_PER_ROW, len(cells))
    rows = -(-len(cells) // columns)
    width = columns * cell_width
    legend_height = (text_height + 4) * -(-len(class_names) // legend_columns) + 4
    sheet = Image.new("RGB", (width, rows * cell_height + legend_height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, image, overlay_image) in enumerate(cells):
        x, y = (i % columns) * cell_width, (i // columns) * cell_height
        draw.text((x + 2, y), name, fill="black")
        sheet.paste(image, (x, y + text_height + 2))
        sheet.paste(overlay_image, (x + SHEET_WIDTH, y + text_height + 2))
    legend_width = width // legend_columns
    for c, name in enumerate(class_names):
        x = (c % legend_columns) * legend_width + 2
        top = rows * cell_height + 4 + (c // legend_columns) * (text_height + 4)
        draw.rectangle((x, top, x + text_height, top + text_height), fill=tuple(int(v) for v in palette[c]))
        draw.text((x + text_height + 4, top), name, fill="black")
    _save_png(sheet, path)


def _frame_count(paths: Sequence[Path], frame_step: int) -> int | None:
    """How many frames ``iter_frames`` yields (for the progress bar); ``None`` when a video's length is unknown."""
    lengths = [1 if p.suffix.lower() not in VIDEO_SUFFIXES else _video_length(p, frame_step) for p in paths]
    return None if None in lengths else sum(lengths)


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    """``frames`` in lists of ``size`` (the last one shorter)."""
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _FrameWriter:
    """Writes each frame's label PNG (palette image of the class ids) and overlay into ``out``, keeps its
    summary record and offers it to the contact sheet."""

    def __init__(self, out: Path, dataset: DatasetConfig) -> None:
        self.out = out
        _, self.class_names, self.palette_tuple = dataset_info(dataset)
        self.palette = np.zeros((256, 3), dtype=np.uint8)
        self.palette[: len(self.palette_tuple)] = np.asarray(self.palette_tuple, dtype=np.uint8)
        self.palette_bytes = _palette_bytes(self.palette_tuple)
        self.sheet = SheetSampler()
        self.records: list[dict] = []

    def summary(self) -> dict:
        """The summary's classes, palette and one record per frame written."""
        palette = [list(color) for color in self.palette_tuple]
        return {"class_names": list(self.class_names), "palette": palette, "frames": self.records}

    def write(self, frame: Frame, label: np.ndarray) -> None:
        label_file, overlay_file = f"labels/{frame.name}.png", f"overlays/{frame.name}.png"
        label_image = Image.fromarray(label)  # uint8 ids; a palette makes it a "P" image, ids unchanged
        label_image.putpalette(self.palette_bytes)
        _save_png(label_image, self.out / label_file)
        blended = overlay(frame.image, label, self.palette)
        _save_png(Image.fromarray(blended), self.out / overlay_file)
        self.sheet.add(frame.name, frame.image, blended)
        counts = np.bincount(label.ravel(), minlength=len(self.class_names))[: len(self.class_names)]
        self.records.append(
            {
                "name": frame.name,
                "input": str(frame.source),
                **({"frame": frame.index} if frame.index is not None else {}),
                "size": [int(label.shape[0]), int(label.shape[1])],
                "label": label_file,
                "overlay": overlay_file,
                "class_area": {
                    n: round(float(c) / label.size, 6) for n, c in zip(self.class_names, counts, strict=True)
                },
            }
        )


def predict(
    run_dir: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    runtime: str = "torch",
    precision: str = "fp32",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    strict: bool = False,
    frame_step: int = 1,
    show_progress: bool = True,
    model: str = "student",
) -> dict:
    """Segment every picture and video frame of ``inputs`` with the run's model; write labels, overlays,
    a contact sheet and ``summary.json`` into ``out``; return the summary.

    Args:
        run_dir: a finished run directory (``recipe.resolved.yaml``, ``segmentor.safetensors``; ``export.json``
            and its artifacts for runtimes other than torch).
        inputs: files, folders and glob patterns of pictures and videos.
        out: output folder (created; files of the same names are replaced).
        runtime: ``torch`` or a runtime of `gkd.export.runtimes` whose artifact the run exported.
        precision: the artifact's precision (``fp32``, ``fp16``, ``int8``; ``bf16``/``fp16`` autocast for torch).
        batch_size: frames per model call (``whole``) or windows per call (``slide``).
        device: where the model runs.
        strict: stop at the first unreadable input instead of skipping it.
        frame_step: keep every n-th video frame.
        show_progress: a progress bar on stderr.
        model: ``student`` (default), or the run's ``no_kd`` / ``teacher`` reference (torch only).
    """
    if batch_size < 1 or frame_step < 1:
        raise ValueError("--batch-size and --frame-step must be at least 1")
    out, paths = Path(out), collect_inputs(inputs)
    predictor = Predictor.from_run(run_dir, runtime, precision, device, model, batch_size)
    loaded, recipe = predictor.runtime, predictor.recipe
    writer = _FrameWriter(out, recipe.data.source)
    skipped: list[dict] = []
    total = _frame_count(paths, frame_step)
    progress = tqdm(total=total, desc=f"predict ({runtime}/{precision})", unit="frame", disable=not show_progress)
    with progress:
        for batch in _batches(iter_frames(paths, frame_step, strict, skipped), batch_size):
            for frame, label in zip(batch, predictor.predict([f.image for f in batch]), strict=True):
                writer.write(frame, label)
                progress.update()
    summary = {
        "run_dir": str(run_dir),
        "model": model,
        "runtime": loaded.info,
        "img_size": list(recipe.data.img_size),
        "mode": recipe.evaluate.mode,
        **writer.summary(),
        "skipped": skipped,
    }
    if writer.records:
        contact_sheet(writer.sheet.picks(), writer.class_names, writer.palette, out / CONTACT_SHEET_FILE)
        summary["contact_sheet"] = CONTACT_SHEET_FILE
    write_json(out / SUMMARY_FILE, summary)
    log.info("predict: %d frames, %d inputs skipped; %s", len(writer.records), len(skipped), out / SUMMARY_FILE)
    return summary

"""A teacher-output cache: the frozen teacher run once over ``K`` augmented views of every image, its outputs
written to disk, and every later training step (every method, seed and student that shares the teacher, data,
transform and ``K``) reading them instead of running the teacher again.

Views. View ``v`` of image ``i`` is the dataset's own augmentation run under the seed `view_seed` ``(i, v)``
(through the trainer's `SeededDataset`). The trainer still draws ``(index, sample_seed)`` per job as always;
`TeacherViews` turns the sample seed into a view number (``0 .. K-1``) and regenerates that view. Regenerating
was chosen over storing the augmented image: a 384x288 float view is 1.3 MB, eight times the CamVid teacher's
tokens, and a stored image would have to be float32 to be the very image the live path sees. The risk of
regenerating, augmentation code (or a library under it) that no longer reproduces a view, is checked, not
assumed: the cache keeps a 64-bit hash of every view's image and `TeacherViews` compares it on every read.

Storage. Shards of ``views_per_shard`` consecutive views (ordinal ``index * K + view``), each one safetensors
file holding ``targets`` ``(n, record)`` in the cache dtype (every output of a view flattened into one row; the
manifest's ``fields`` give each output's name, offset and shape) and ``image_hash`` ``(n,)``. safetensors because
its header records dtype and shape (a truncated file is refused by the parser), it has bfloat16, which numpy
lacks, and `safe_open` memory-maps the file, so a read touches only the view's own rows. Shards are written
atomically (`gkd.utils.io.save_state_dict`); ``manifest.json`` names the cache's settings and every finished
shard with its size and SHA-256, and is rewritten after each shard, so a killed build resumes at the first
missing shard. Opening a cache checks every shard against the manifest; a missing, truncated or corrupt shard
is named in a warning and rebuilt, never read. A file lock serialises builders of one cache (parallel
comparison jobs): the first builds, the others wait and then read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset

from gkd.compress.sampling import SeededDataset
from gkd.models.features import ViTFeatures
from gkd.utils.io import file_sha256, read_json, save_state_dict, write_json

log = logging.getLogger("gkd.cache")

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TARGET_PREFIX = "teacher:"  # batch keys of cached teacher outputs (flat, so the trainer moves them to the device)
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

TeacherOutputs = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def cache_key(spec: dict[str, Any]) -> str:
    """The cache's name: a hash of everything its content depends on (teacher weights and settings, outputs,
    data, transform, ``K``, dtype)."""
    return hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **spec}, sort_keys=True).encode()).hexdigest()[:16]


def view_seed(index: int, view: int) -> int:
    """The augmentation seed of view ``view`` of image ``index``: the same for every job (unlike the trainer's
    sample seeds, which depend on the job's seed and epoch), so every job reads the views the teacher saw."""
    digest = hashlib.blake2b(f"{index}/{view}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 2**31


def image_hash(image: torch.Tensor) -> int:
    """A 64-bit hash of an image tensor's exact bytes (signed, to fit an int64 tensor)."""
    data = image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def feature_outputs(features: ViTFeatures) -> dict[str, torch.Tensor]:
    """The tensors of a teacher's `ViTFeatures` by name (what a feature loss consumes)."""
    outputs = {f"patch_tokens.{i}": tokens for i, tokens in enumerate(features.patch_tokens)}
    outputs.update({f"cls_tokens.{i}": cls for i, cls in enumerate(features.cls_tokens) if cls is not None})
    return outputs


def cached_outputs(batch: dict) -> dict[str, torch.Tensor] | None:
    """The cached teacher outputs of a batch of `TeacherViews` by name (None when the batch has none)."""
    outputs = {key.removeprefix(TARGET_PREFIX): value for key, value in batch.items() if key.startswith(TARGET_PREFIX)}
    return outputs or None


def cached_features(
    outputs: dict[str, torch.Tensor], grid: tuple[int, int], layers: tuple[int, ...], dtype: torch.dtype
) -> ViTFeatures:
    """`ViTFeatures` back from `feature_outputs` of a cache, in ``dtype`` (the live teacher's)."""
    return ViTFeatures(
        patch_tokens=[outputs[f"patch_tokens.{i}"].to(dtype) for i in range(len(layers))],
        cls_tokens=[
            outputs[f"cls_tokens.{i}"].to(dtype) if f"cls_tokens.{i}" in outputs else None for i in range(len(layers))
        ],
        grid=grid,
        layers=layers,
    )


@dataclass(frozen=True)
class CacheField:
    """One teacher output in a cache record: its columns ``offset .. offset + numel`` of the row."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class CorruptCacheError(RuntimeError):
    """A cache that cannot be used as it is (named); `open_or_build` rebuilds what it can."""


class TeacherCache:
    """A finished cache, read-only: ``cache[index, view]`` is that view's outputs by name. Open it with
    `open_or_build`. Shard handles are opened lazily in each process (loader workers open their own)."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.views: int = manifest["views"]
        self.views_per_shard: int = manifest["views_per_shard"]
        self.fields = [CacheField(f["name"], tuple(f["shape"]), f["offset"]) for f in manifest["fields"]]
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to worker processes

    def _shard(self, shard: int) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / shard_name(shard)), framework="pt")
        return self._handles[shard]

    def lookup(self, index: int, view: int) -> tuple[dict[str, torch.Tensor], int]:
        """The outputs of view ``view`` of image ``index`` by name, and the hash of the image the teacher saw."""
        ordinal = index * self.views + view
        handle = self._shard(ordinal // self.views_per_shard)
        row = ordinal % self.views_per_shard
        record = handle.get_slice("targets")[row : row + 1][0]
        expected_hash = int(handle.get_slice("image_hash")[row : row + 1][0])
        outputs = {f.name: record[f.offset : f.offset + f.numel].reshape(f.shape) for f in self.fields}
        return outputs, expected_hash

    @property
    def bytes_per_view(self) -> int:
        return sum(f.numel for f in self.fields) * STORAGE_DTYPES[self.manifest["dtype"]].itemsize


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.safetensors"


class TeacherViews(Dataset):
    """``K`` fixed views per image of ``dataset``, with the teacher's outputs of each view from ``cache``.

    Used inside the trainer's `SeededDataset`, which seeds the RNGs with the job's sample seed before calling
    ``[index]``: the view number is drawn from that seeded RNG (so each job samples views as it samples images,
    reproducibly), then the view itself is made under `view_seed`. Without ``cache`` it yields the same views
    with no teacher outputs (the live teacher then runs on exactly the cached views: a reference for tests).

    Args:
        dataset: the stage's dataset (its own augmentation makes each view).
        views: ``K``, views per image.
        cache: the teacher's outputs for every view (``cache.views`` must be ``views``).
    """

    def __init__(self, dataset: Dataset, views: int, cache: TeacherCache | None = None) -> None:
        if cache is not None and cache.views != views:
            raise ValueError(f"{cache.directory} holds {cache.views} views per image, not {views}")
        self.views = SeededDataset(dataset)
        self.count = views
        self.cache = cache

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict:
        view = int(torch.randint(self.count, ()))
        sample = self.views[index, view_seed(index, view)]
        if self.cache is None:
            return sample
        outputs, expected = self.cache.lookup(index, view)
        if image_hash(sample["image"]) != expected:
            raise CorruptCacheError(
                f"{self.cache.directory}: view {view} of image {index} is not the image the teacher saw (the "
                "augmentation no longer reproduces it: transform code or a library changed); delete the folder "
                "and re-run to rebuild the cache"
            )
        return {**sample, **{TARGET_PREFIX + name: tensor for name, tensor in outputs.items()}}


def _layout(outputs: dict[str, torch.Tensor]) -> list[CacheField]:
    fields, offset = [], 0
    for name, tensor in outputs.items():
        fields.append(CacheField(name, tuple(tensor.shape[1:]), offset))
        offset += fields[-1].numel
    return fields


def _records(outputs: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``(B, record)`` rows: every output of each view flattened, in field order, cast to the cache dtype."""
    return torch.cat([tensor.reshape(tensor.shape[0], -1).to(dtype) for tensor in outputs.values()], dim=1).cpu()


def _check_shard(directory: Path, shard: int, entry: dict[str, Any] | None, views: int) -> str | None:
    """Why shard ``shard`` cannot be read as the manifest describes it (None = it can)."""
    path = directory / shard_name(shard)
    if entry is None:
        return None if not path.exists() else f"{path} is not in the manifest (a build stopped while writing it)"
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{path} is truncated or overwritten ({path.stat().st_size} bytes, the manifest says {entry['bytes']})"
    if file_sha256(path) != entry["sha256"]:
        return f"{path} is corrupt (its SHA-256 differs from the manifest's)"
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.get_slice("targets").get_shape()[0] != views:
                return f"{path} holds the wrong number of views"
    except SafetensorError as error:
        return f"{path} does not parse ({error})"
    return None


def _missing_keys(shards: Sequence[int], views_per_shard: int, total: int, views: int) -> Iterator[tuple[int, int]]:
    """``(index, view_seed)`` of every view of ``shards``, in ordinal order."""
    for shard in shards:
        for ordinal in range(shard * views_per_shard, min((shard + 1) * views_per_shard, total)):
            index, view = divmod(ordinal, views)
            yield index, view_seed(index, view)


def open_or_build(
    directory: Path,
    spec: dict[str, Any],
    dataset: Dataset,
    teacher_outputs: TeacherOutputs,
    views: int,
    dtype: str,
    device: torch.device,
    batch_size: int = 16,
    views_per_shard: int = 256,
    workers: int = 0,
) -> TeacherCache:
    """The cache of ``spec`` in ``directory``: opened when complete and intact, else built (or finished, when a
    build was interrupted; a bad shard is named and rebuilt). Holds the folder's file lock meanwhile.

    Args:
        directory: the cache's folder (named by `cache_key` of ``spec`` by the caller).
        spec: what the content depends on; recorded in the manifest, and a folder of another spec is refused.
        dataset: the images (its augmentation makes each view; see `TeacherViews`).
        teacher_outputs: ``images (B, 3, H, W) -> {name: (B, ...)}``, the outputs the loss consumes, run without
            gradients; the same function the live objective calls.
        views: ``K``, views per image.
        dtype: ``fp16``, ``bf16`` or ``fp32``, the dtype outputs are stored in.
        device: where the teacher runs.
        batch_size: views per teacher pass while building.
        views_per_shard: views per shard file.
        workers: loader worker processes while building.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(directory / ".lock"):
        manifest_path = directory / MANIFEST_FILE
        manifest = read_json(manifest_path) if manifest_path.is_file() else None
        if manifest is not None and manifest["spec"] != spec:
            raise CorruptCacheError(f"{manifest_path} belongs to other settings than this cache's; delete the folder")
        total = len(dataset) * views
        if manifest is None or manifest["views_per_shard"] != views_per_shard or manifest["dtype"] != dtype:
            manifest = {
                "format": FORMAT_VERSION,
                "spec": spec,
                "views": views,
                "images": len(dataset),
                "dtype": dtype,
                "views_per_shard": views_per_shard,
                "fields": None,
                "shards": {},
            }
        shard_count = -(-total // views_per_shard)
        todo = _shards_to_build(directory, manifest, shard_count, total, views_per_shard)
        if todo:
            log.info("teacher cache %s: building %d of %d shards", directory, len(todo), shard_count)
            _build(directory, manifest, todo, dataset, teacher_outputs, device, batch_size, workers)
        return TeacherCache(directory, manifest)


def _shards_to_build(directory: Path, manifest: dict, shard_count: int, total: int, views_per_shard: int) -> list[int]:
    """Shards missing from ``manifest`` or failing their check (each problem logged, its entry dropped)."""
    todo = []
    for shard in range(shard_count):
        entry = manifest["shards"].get(str(shard))
        expected = min(views_per_shard, total - shard * views_per_shard)
        problem = _check_shard(directory, shard, entry, expected)
        if problem is not None:
            log.warning("teacher cache: %s; rebuilding it", problem)
            manifest["shards"].pop(str(shard), None)
        if str(shard) not in manifest["shards"]:
            todo.append(shard)
    return todo


def _build(
    directory: Path,
    manifest: dict[str, Any],
    shards: list[int],
    dataset: Dataset,
    teacher_outputs: TeacherOutputs,
    device: torch.device,
    batch_size: int,
    workers: int,
) -> None:
    """Write ``shards`` (each atomically), updating the manifest after each one."""
    views, per_shard, dtype = manifest["views"], manifest["views_per_shard"], STORAGE_DTYPES[manifest["dtype"]]
    total = manifest["images"] * views
    keys = list(_missing_keys(shards, per_shard, total, views))
    loader = DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=keys, num_workers=workers)
    pending = iter(shards)
    shard, rows, hashes = next(pending), [], []
    for batch in loader:
        images = batch["image"]
        with torch.inference_mode():
            outputs = teacher_outputs(images.to(device))
        if manifest["fields"] is None:
            manifest["fields"] = [vars(f) for f in _layout(outputs)]
        rows.append(_records(outputs, dtype))
        hashes += [image_hash(image) for image in images]
        while rows and len(hashes) >= min(per_shard, total - shard * per_shard):
            size = min(per_shard, total - shard * per_shard)
            stacked = torch.cat(rows)
            _write_shard(directory, manifest, shard, stacked[:size], hashes[:size])
            rows, hashes = ([stacked[size:]] if len(stacked) > size else []), hashes[size:]
            shard = next(pending, None)
            if shard is None:
                return


def _write_shard(
    directory: Path, manifest: dict[str, Any], shard: int, records: torch.Tensor, hashes: list[int]
) -> None:
    path = directory / shard_name(shard)
    save_state_dict(path, {"targets": records, "image_hash": torch.tensor(hashes, dtype=torch.int64)})
    manifest["shards"][str(shard)] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    write_json(directory / MANIFEST_FILE, manifest)

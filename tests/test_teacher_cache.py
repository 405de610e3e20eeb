"""The teacher-output cache: exact targets on the very views the teacher saw, runs that match the live teacher,
a build that resumes, bad shards named and rebuilt, and one key per teacher."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from gkd.compress.config import OptimConfig, TrainingConfig
from gkd.compress.losses import build_loss
from gkd.compress.objectives import DistillObjective
from gkd.compress.sampling import SeededDataset
from gkd.compress.teacher_cache import (
    MANIFEST_FILE,
    CorruptCacheError,
    TeacherViews,
    open_or_build,
    shard_name,
)
from gkd.compress.trainer import Trainer
from gkd.engine import FileHashes, consumed
from gkd.models.backbone import Backbone
from gkd.recipe import dump_recipe, load_recipe, merge, parse_recipe
from gkd.stages import STAGES
from gkd.stages.context import Run
from gkd.stages.distill import teacher_cache_keys
from gkd.utils.io import read_json, read_jsonl, save_state_dict
from gkd.utils.runtime import DistInfo

IMAGES, VIEWS, SIZE = 8, 2, 32
SPEC = {"test": "tiny"}


class AugmentedImages(Dataset):
    """Fixed images with a random flip and noise drawn from torch's RNG (the trainer seeds it per sample)."""

    def __init__(self, shift: float = 0.0) -> None:
        self.images = torch.rand(IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        self.shift = shift

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": (image + 0.1 * torch.rand_like(image) + self.shift).clamp(0, 1)}


def tiny_backbone(seed: int, width: int) -> Backbone:
    torch.manual_seed(seed)
    kwargs = {"img_size": SIZE, "patch_size": 8, "embed_dim": width, "depth": 2, "num_heads": 2}
    return Backbone(f"tiny{seed}", "vit_small_patch16_224", kwargs)


def objective(seed: int = 0) -> DistillObjective:
    torch.manual_seed(seed + 10)
    loss = build_loss("mse", {}, 16, 32)
    return DistillObjective(tiny_backbone(seed, 16), loss, tiny_backbone(100, 32), torch.float32)


def build(directory: Path, teacher_outputs, dtype: str = "fp16", batch_size: int = 4, **kwargs):
    return open_or_build(
        directory,
        SPEC,
        AugmentedImages(),
        teacher_outputs,
        VIEWS,
        dtype,
        torch.device("cpu"),
        batch_size=batch_size,
        views_per_shard=4,
        **kwargs,
    )


class Counting:
    """``teacher_outputs`` that counts the views it is asked for and can fail after some batches."""

    def __init__(self, function, fail_after: int | None = None) -> None:
        self.function, self.fail_after, self.views, self.batches = function, fail_after, 0, 0

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fail_after is not None and self.batches == self.fail_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.views += images.shape[0]
        return self.function(images)


def views_of(dataset: TeacherViews, index: int, sample_seed: int) -> dict:
    return SeededDataset(dataset)[index, sample_seed]


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 0.0), ("fp16", 2e-3)])
def test_cached_tokens_are_the_live_teachers_on_the_same_view(tmp_path: Path, dtype: str, tolerance: float) -> None:
    model = objective().eval()
    cache = build(tmp_path, model.teacher_outputs, dtype, batch_size=1)  # one view a pass, as checked below
    views = TeacherViews(AugmentedImages(), VIEWS, cache)
    for index, seed in [(0, 11), (3, 12), (7, 13), (7, 14)]:
        sample = views_of(views, index, seed)
        live = model.teacher_outputs(sample["image"][None])
        assert {f"teacher:{name}" for name in live} <= set(sample)
        for name, tokens in live.items():
            cached = sample[f"teacher:{name}"][None].float()
            torch.testing.assert_close(cached, tokens, rtol=tolerance, atol=tolerance)
    assert cache.bytes_per_view == (16 + 1) * 32 * {"fp32": 4, "fp16": 2}[dtype]  # 4x4 patch tokens + CLS, width 32


def test_a_view_the_augmentation_no_longer_makes_is_refused(tmp_path: Path) -> None:
    cache = build(tmp_path, objective().teacher_outputs)
    changed = TeacherViews(AugmentedImages(shift=0.01), VIEWS, cache)
    with pytest.raises(CorruptCacheError, match=r"view \d of image 2 is not the image the teacher saw"):
        views_of(changed, 2, 5)


def train(run_dir: Path, dataset: Dataset, seed: int = 0) -> DistillObjective:
    model = objective(seed)
    config = OptimConfig(steps=6, batch_size=4, lr=1e-3, checkpoint_every=100, log_every=3)
    trainer = Trainer(
        name="distill",
        objective=model,
        dataset=dataset,
        config=config,
        training=TrainingConfig(num_workers=0),
        run_dir=run_dir,
        device=torch.device("cpu"),
        info=DistInfo(),
        seed=0,
        settings_fingerprint="test",
    )
    trainer.fit()
    return model


def test_a_cached_run_matches_a_live_run_on_the_same_views(tmp_path: Path) -> None:
    live = train(tmp_path / "live", TeacherViews(AugmentedImages(), VIEWS))
    cache = build(tmp_path / "cache", objective().teacher_outputs, "fp16")
    cached = train(tmp_path / "cached", TeacherViews(AugmentedImages(), VIEWS, cache))
    for (name, a), b in zip(live.student.state_dict().items(), cached.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    losses = [logged_losses(tmp_path / run / "logs" / "distill.jsonl") for run in ("live", "cached")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-3, atol=0)


def logged_losses(path: Path) -> list[float]:
    return [entry["loss"] for _, entry in read_jsonl(path)]


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path: Path) -> None:
    teacher = objective().eval().teacher_outputs
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "cache", Counting(teacher, fail_after=2))  # 2 batches of 4 views = shards 0 and 1
    assert sorted(read_json(tmp_path / "cache" / MANIFEST_FILE)["shards"]) == ["0", "1"]
    resumed = Counting(teacher)
    cache = build(tmp_path / "cache", resumed)
    assert resumed.views == IMAGES * VIEWS - 8
    fresh = build(tmp_path / "fresh", teacher)
    for index in range(IMAGES):
        for view in range(VIEWS):
            for name, tensor in cache.lookup(index, view)[0].items():
                torch.testing.assert_close(tensor, fresh.lookup(index, view)[0][name], rtol=0, atol=0)


def test_a_truncated_shard_is_named_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    teacher = objective().eval().teacher_outputs
    before = {name: t.clone() for name, t in build(tmp_path, teacher).lookup(5, 1)[0].items()}  # shard 2 (mmapped)
    shard = tmp_path / shard_name(2)
    shard.write_bytes(shard.read_bytes()[:-100])
    again = Counting(teacher)
    with caplog.at_level(logging.WARNING, logger="gkd.cache"):
        after = build(tmp_path, again).lookup(5, 1)[0]
    assert f"{shard} is truncated" in caplog.text and "rebuilding it" in caplog.text
    assert again.views == 4  # that shard only
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)


def cached_recipe(weights: Path, **distill: object):
    recipe = load_recipe().model_dump(mode="json")
    recipe["models"]["teacher"].update(train_encoder=False, weights=str(weights))
    overrides = {"teacher_training": None, "distill": {"teacher_cache": {"views": 2}, **distill}}
    return parse_recipe(merge(recipe, overrides))


def test_the_cache_key_follows_the_teacher_and_is_recorded_with_the_stage(tmp_path: Path) -> None:
    weights = tmp_path / "teacher.safetensors"
    save_state_dict(weights, tiny_backbone(0, 32).model.state_dict())
    hashes = FileHashes(tmp_path / "hashes.json")
    run = Run(cached_recipe(weights), tmp_path / "run", torch.device("cpu"), DistInfo())
    keys = teacher_cache_keys(run, hashes)
    assert set(keys) == {"distill_task_agnostic", "distill_domain_agnostic"} and len(set(keys.values())) == 2
    no_cls = Run(cached_recipe(weights, loss={"options": {"cls_token": False}}), run.dir, run.device, run.info)
    assert teacher_cache_keys(no_cls, hashes) == keys  # another loss term, the same teacher outputs: shared
    distill = next(stage for stage in STAGES if stage.name == "distill")
    assert consumed(run, distill, hashes)["caches"] == keys
    save_state_dict(weights, tiny_backbone(1, 32).model.state_dict())
    new = teacher_cache_keys(run, FileHashes(tmp_path / "hashes.json"))
    assert set(new.values()).isdisjoint(keys.values())


def test_a_recipe_without_the_cache_is_unchanged() -> None:
    recipe = load_recipe()
    assert "teacher_cache" not in dump_recipe(recipe)
    distill = next(stage for stage in STAGES if stage.name == "distill")
    run = Run(recipe, Path("unused"), torch.device("cpu"), DistInfo())
    assert "caches" not in consumed(run, distill, FileHashes(Path("unused/hashes.json")))

"""The pre-flight check (`gkd.preflight`) of the stages about to run: the splits they read, the models they
build and the trainings they run."""

from __future__ import annotations

from gkd.engine import Stage
from gkd.preflight import CHECKS_DIR, CheckResult, DataUse, preflight
from gkd.recipe import Recipe
from gkd.stages.context import Run


def stage_data(recipe: Recipe, stages: list[Stage]) -> list[DataUse]:
    """The splits ``stages`` read, each role once (labeled if any of them reads its labels)."""
    uses: dict[str, DataUse] = {}
    for stage in stages:
        for use in stage.data(recipe):
            known = uses.get(use.role)
            uses[use.role] = use if known is None or use.labeled else known
    return list(uses.values())


def check_run_inputs(run: Run, stages: list[Stage], full: bool = False, use_cache: bool = True) -> CheckResult:
    """The pre-flight check of everything ``stages`` read and build (see `gkd.preflight`); the data
    fingerprints are kept on ``run`` for the stage records. Problems are listed, not raised.

    Args:
        run: the run (its recipe, directory and world size).
        stages: the stages about to run.
        full: decode every image and label instead of the header check.
        use_cache: read and write the record of passed data checks in the run directory.
    """
    recipe, models = run.recipe, run.recipe.models
    loads = {role for stage in stages for role in stage.weights}
    segmentors = {
        "teacher": (models.teacher, models.teacher_decoder or models.decoder),
        "student": (models.student, models.decoder),
    }
    segmentors = {
        role: (model if role in loads else model.model_copy(update={"weights": None}), decoder)
        for role, (model, decoder) in segmentors.items()
    }
    trainings = [use for stage in stages for use in stage.trainings(recipe)]
    result = preflight(
        stage_data(recipe, stages),
        segmentors,
        trainings,
        run.num_classes,
        tuple(recipe.data.img_size),
        run.info.world_size,
        run.file(CHECKS_DIR) if use_cache else None,
        full,
    )
    run.fingerprints.update(result.fingerprints)
    return result

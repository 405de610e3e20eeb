"""The jobs of a comparison (`gkd.compare`): one training run each, the teacher or one method at one seed;
what each trains, runs and spends."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gkd.progress import JobSteps
from gkd.recipe import Recipe, RecipeError, merge, parse_recipe
from gkd.rundir import MODEL_FILES, RESULT_FILE, SOURCE_DOMAIN, TEACHER_FILE, TEACHER_JOB, JobKind


@dataclass(frozen=True)
class Job:
    """One training run of the comparison: the teacher, or one method at one seed."""

    method: str
    label: str
    seed: int
    student: JobKind
    recipe: Recipe
    dir: Path

    @property
    def result_file(self) -> Path:
        return self.dir / RESULT_FILE

    def done(self) -> bool:
        return self.result_file.is_file()


def _teacher_settings(recipe: Recipe) -> dict:
    models, data = recipe.models, recipe.data
    return {
        "teacher": models.teacher.model_dump(mode="json"),
        "teacher_decoder": (models.teacher_decoder or models.decoder).model_dump(mode="json"),
        "teacher_training": recipe.teacher_training and recipe.teacher_training.model_dump(mode="json"),
        "source": (data.teacher_source or data.source).model_dump(mode="json"),
        "teacher_transform": (data.teacher_transform or data.train_transform).model_dump(mode="json"),
        "img_size": data.img_size,
    }


def method_recipe(recipe: Recipe, name: str, seed: int) -> Recipe:
    """The recipe of one method at one seed: ``recipe`` with the method's overrides, its methods list cleared."""
    method = recipe.compare.methods[name]
    base = recipe.model_dump(mode="json")
    base["compare"]["methods"] = {}
    try:
        variant = parse_recipe({**merge(base, method.overrides), "seed": seed, "name": f"{recipe.name}_{name}"})
    except RecipeError as error:
        raise RecipeError(f"compare.methods.{name}.overrides: {error}") from None
    if _teacher_settings(variant) != _teacher_settings(recipe):
        raise RecipeError(f"compare.methods.{name}.overrides: methods share the recipe's teacher; do not change it")
    if method.student == JobKind.NO_KD and variant.compare.no_kd is None:
        raise RecipeError(f"compare.methods.{name}: student no_kd needs compare.no_kd settings")
    return variant


def plan(recipe: Recipe, out: Path, methods: list[str] | None = None, max_seeds: int | None = None) -> list[Job]:
    """Every job of the comparison, the teacher first; ``methods`` restricts the recipe's methods,
    ``max_seeds`` runs only the first seeds of each."""
    listed = recipe.compare.methods
    if not listed:
        raise RecipeError("compare.methods: the recipe lists no methods to compare")
    unknown = sorted(set(methods or ()) - set(listed))
    if unknown:
        raise RecipeError(f"unknown methods {', '.join(unknown)}; the recipe lists {', '.join(listed)}")
    domains = [SOURCE_DOMAIN, *recipe.data.targets]
    if recipe.compare.figure_domain not in (None, *domains):
        raise RecipeError(f"compare.figure_domain {recipe.compare.figure_domain!r} is none of {', '.join(domains)}")
    base = recipe.model_copy(update={"compare": recipe.compare.model_copy(update={"methods": {}})})
    # no teacher job when nothing trains one (a frozen VFM distilled by feature losses only)
    jobs = (
        [Job(TEACHER_JOB, "teacher", recipe.seed, JobKind.TEACHER, base, out / TEACHER_JOB)]
        if recipe.teacher_training
        else []
    )
    for name, method in listed.items():
        if methods and name not in methods:
            continue
        for seed in method.seeds[:max_seeds]:
            variant = method_recipe(recipe, name, seed)
            jobs.append(Job(name, method.label, seed, method.student, variant, out / name / f"seed{seed}"))
    return jobs


def needs_teacher(job: Job) -> bool:
    from gkd.stages.distill import distill_inputs

    if job.student == JobKind.CEILING:
        return job.recipe.models.teacher.train_encoder
    return job.student == JobKind.DISTILLED and TEACHER_FILE in distill_inputs(job.recipe)


def model_file(job: Job) -> str:
    """The segmentor file a job trains, in its run directory."""
    return MODEL_FILES[job.student]


def schedule(job: Job) -> dict:
    """The optimizer steps a job spends: ``labelled_steps`` (on labelled source: the task schedule every
    method shares under the paper's protocol) and ``distill_steps`` (label-free stage-1 steps, extra)."""
    recipe, distill = job.recipe, job.recipe.distill
    if job.student == JobKind.TEACHER:
        return {"labelled_steps": recipe.teacher_training.steps, "distill_steps": 0}
    if job.student == JobKind.NO_KD:
        return {"labelled_steps": recipe.compare.no_kd.steps, "distill_steps": 0}
    if job.student in (JobKind.FROZEN, JobKind.CEILING):
        return {"labelled_steps": recipe.head.steps, "distill_steps": 0}
    if distill.schedule == "one_stage":  # distillation rides on the labelled steps
        return {"labelled_steps": distill.joint.steps, "distill_steps": 0}
    phases = (distill.task_agnostic, distill.domain_agnostic)
    return {"labelled_steps": recipe.head.steps, "distill_steps": sum(p.steps for p in phases if p is not None)}


def job_name(job: Job) -> str:
    """A job's name in the live view, ``status.json`` and trackers: ``teacher``, ``<method>/seed<k>``."""
    return job.method if job.method == TEACHER_JOB else f"{job.method}/seed{job.seed}"


# The pipeline stages each kind of job runs.
JOB_STAGES = {
    JobKind.TEACHER: ("train-teacher",),
    JobKind.NO_KD: ("train-no-kd",),
    JobKind.DISTILLED: ("distill", "train-head"),
    JobKind.FROZEN: ("train-frozen-head",),
    JobKind.CEILING: ("train-ceiling-head",),
}


def job_stages(job: Job) -> list:
    """The stages of the pipeline's graph that ``job`` runs, in graph order."""
    from gkd.stages import STAGES

    names = JOB_STAGES.get(job.student, ())
    return [stage for stage in STAGES if stage.name in names and stage.needed(job.recipe)]


def job_steps(job: Job) -> JobSteps:
    """A job's training phases in order with their steps (the live view's progress and ETA), as its stages
    declare them."""
    phases = [(use.name, use.config.steps) for stage in job_stages(job) for use in stage.trainings(job.recipe)]
    return JobSteps(job_name(job), job.dir, tuple(phases))

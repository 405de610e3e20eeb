"""``gkd-compress sweep``: which student to deploy. One student per size (and input size) distilled through the
pipeline, each exported and benchmarked in every runtime here, and the latency vs target-mIoU Pareto front
across students x runtimes x precisions.

A student is ``NAME[,key=value...]``: a zoo or timm ViT name and, optionally, its timm kwargs and ``weights``
(``deit_small,weights=deit_small.safetensors``; ``vit_small_patch16_224,embed_dim=96,depth=6,num_heads=3``).
The recipe's own student kwargs are replaced, except ``img_size``. Training reuses `gkd.compare`: the students
are the methods of a comparison from one shared teacher, trained by its pool of workers, and finished ones
are skipped on a re-run, so students can be added to a sweep later. Export and benchmark then run in this
process, one student at a time, so no latency is measured while anything else trains. With ``img_sizes``,
each input size is its own comparison (its own teacher) in ``<out>/<H>x<W>/``.

``<out>`` holds ``sweep.json`` (every point), ``sweep.md`` (the table, and the front read as "for a latency
budget of L ms, deploy ...") and ``pareto.png``; each student's run directory is
``<out>[/<H>x<W>]/<student>/seed<k>/``.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from gkd.compare import ComparisonError, track_jobs
from gkd.compare_config import MethodConfig
from gkd.compare_jobs import JOB_STAGES, plan
from gkd.compare_pool import run_jobs
from gkd.progress import STATUS_FILE
from gkd.recipe import Recipe, RecipeError, dump_recipe, load_recipe, parse_recipe, results_settings
from gkd.report.pareto import pareto_front, pareto_plot
from gkd.rundir import JobKind
from gkd.utils.io import write_json, write_text

log = logging.getLogger("gkd")

SWEEP_RECIPE_FILE = "sweep.recipe.yaml"
DEPLOY = ("export", "benchmark")  # the stages the sweep runs on each trained student, one at a time


@dataclass(frozen=True)
class StudentSpec:
    """One student of a sweep: its timm/zoo name, kwargs and optional weights; ``key`` names its folder."""

    key: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None


def parse_student(text: str) -> StudentSpec:
    """``NAME[,key=value...]`` -> `StudentSpec` (values parsed as YAML scalars: ``depth=6`` is an int)."""
    name, *pairs = [part.strip() for part in text.split(",")]
    kwargs: dict[str, Any] = {}
    weights = None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--students {text!r}: {pair!r} is not key=value")
        if key == "weights":
            weights = value
        else:
            kwargs[key] = yaml.safe_load(value)
    if not name:
        raise ValueError(f"--students {text!r}: no model name")
    return StudentSpec(re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-"), name, kwargs, weights)


def parse_img_size(text: str) -> tuple[int, int]:
    """``512`` (square) or ``HxW`` -> ``(H, W)``."""
    parts = text.lower().split("x")
    try:
        size = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else None
    except ValueError:
        size = None
    if size is None or min(size) < 1:
        raise ValueError(f"--img-sizes {text!r}: expected N or HxW")
    return size


def sized_recipe(recipe: Recipe, img_size: tuple[int, int]) -> Recipe:
    """The recipe at another input size: ``data.img_size``, the training crops, a fixed evaluation resize and
    the models' ``img_size`` kwargs follow it."""
    data = recipe.model_dump(mode="json")
    size = list(img_size)
    data["name"] = f"{recipe.name}_{img_size[0]}x{img_size[1]}"
    data["data"]["img_size"] = size
    for transform in ("train_transform", "teacher_transform"):
        if data["data"].get(transform):
            data["data"][transform]["crop_size"] = size
    if data["data"]["eval_transform"].get("size"):
        data["data"]["eval_transform"]["size"] = size
    for role in ("teacher", "student"):
        if "img_size" in (data["models"][role].get("kwargs") or {}):
            data["models"][role]["kwargs"]["img_size"] = size
    return parse_recipe(data)


def sweep_recipe(recipe: Recipe, students: list[StudentSpec]) -> Recipe:
    """``recipe`` with one `gkd.compare` method per student (its first seed), nothing else compared."""
    data = recipe.model_dump(mode="json")
    kept = {k: v for k, v in (data["models"]["student"].get("kwargs") or {}).items() if k == "img_size"}
    data["models"]["student"]["kwargs"] = kept  # each student brings its own shape
    data["models"]["student"]["weights"] = None
    data["compare"]["methods"] = {
        spec.key: MethodConfig(
            label=spec.key,
            seeds=[recipe.seed],
            overrides={"models": {"student": {"name": spec.name, "kwargs": spec.kwargs, "weights": spec.weights}}},
        ).model_dump(mode="json")
        for spec in students
    }
    return parse_recipe(data)


def _benchmark_jobs(jobs: list, device: str) -> list[str]:
    """Export and benchmark every trained student (skipping up-to-date stages), one at a time."""
    from gkd.engine import run_all
    from gkd.stages import STAGES
    from gkd.stages.context import Run
    from gkd.utils.runtime import DistInfo

    failures = []
    for job in jobs:
        if job.student != JobKind.DISTILLED or not job.done():
            continue
        run = Run(job.recipe, job.dir, torch.device(device), DistInfo())
        try:
            run_all(STAGES, run, only=DEPLOY)
        except Exception as error:  # one student failing to export leaves the others' results
            failures.append(f"{job.method}: export / benchmark failed: {type(error).__name__}: {error}")
            log.error("sweep: %s", failures[-1])
    return failures


def _points(jobs: list, size: tuple[int, int]) -> list[dict]:
    from gkd.rundir import BENCHMARK_FILE
    from gkd.utils.io import read_json

    points = []
    for job in jobs:
        benchmark_file = job.dir / BENCHMARK_FILE
        if job.student != JobKind.DISTILLED or not benchmark_file.is_file():
            continue
        benchmark = read_json(benchmark_file)
        result = read_json(job.result_file)
        batch = str(min(benchmark["config"]["batch_sizes"]))
        for key, entry in benchmark["runtimes"].items():
            latency = entry.get("latency", {}).get(batch, {})
            if "p50_ms" not in latency or not entry.get("miou"):
                continue
            points.append(
                {
                    "student": job.method,
                    "img_size": list(size),
                    "runtime": key,
                    "params_m": result["params_m"],
                    "batch": int(batch),
                    "latency_ms": latency["p50_ms"],
                    "miou": statistics.fmean(entry["miou"].values()),
                    "miou_per_domain": entry["miou"],
                    "failed": bool(entry.get("failed")),
                    "environment": benchmark.get("environment", {}),
                }
            )
    return points


def best_under(points: list[dict], max_latency_ms: float) -> dict | None:
    """The most accurate point at or under ``max_latency_ms`` (None if none is that fast)."""
    fast = [p for p in points if p["latency_ms"] <= max_latency_ms and not p["failed"]]
    return max(fast, key=lambda p: (p["miou"], -p["latency_ms"])) if fast else None


def render_sweep(recipe_name: str, points: list[dict], front: list[int], failures: list[str]) -> str:
    """``sweep.md``: every point, then the front as the answer to "which student for <= X ms"."""
    environment = points[0]["environment"] if points else {}
    machine = environment.get("gpu") or environment.get("cpu", "?")
    lines = [
        f"# Student sweep: {recipe_name}",
        "",
        f"Latency: p50 per batch of {points[0]['batch'] if points else '?'} on {machine} "
        f"({environment.get('cpu_count', '?')} logical CPUs); mIoU: mean over the target domains, measured with "
        "each runtime's own outputs.",
        "",
        "![latency vs target mIoU](pareto.png)",
        "",
        "## Which student for a latency budget",
        "",
        "| budget (ms) | student | input | runtime / precision | p50 ms | mean target mIoU |",
        "|---:|---|---|---|---:|---:|",
    ]
    for index in front:
        point = points[index]
        size = "x".join(str(s) for s in point["img_size"])
        lines.append(
            f"| >= {point['latency_ms']:.2f} | {point['student']} | {size} | {point['runtime']} "
            f"| {point['latency_ms']:.2f} | {point['miou']:.1f} |"
        )
    lines += [
        "",
        "Each row is on the Pareto front: from its latency up to the next row's, nothing measured is more accurate.",
        "",
        "## Every student x runtime x precision",
        "",
        "| student | input | params (M) | runtime / precision | p50 ms | mean target mIoU | front |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for index, point in sorted(enumerate(points), key=lambda item: item[1]["latency_ms"]):
        size = "x".join(str(s) for s in point["img_size"])
        status = "yes" if index in front else ("FAILED accuracy check" if point["failed"] else "")
        lines.append(
            f"| {point['student']} | {size} | {point['params_m']:.2f} | {point['runtime']} "
            f"| {point['latency_ms']:.2f} | {point['miou']:.1f} | {status} |"
        )
    if failures:
        lines += ["", "## Failures", "", *(f"- {failure}" for failure in failures)]
    return "\n".join([*lines, ""])


def _base(recipe: Recipe) -> Recipe:
    """The sweep's base recipe: ``recipe`` without compare methods."""
    return recipe.model_copy(update={"compare": recipe.compare.model_copy(update={"methods": {}})})


def _jobs_by_size(base: Recipe, students: list[str], out: Path, img_sizes: list[str] | None) -> list[tuple]:
    """``(input size, its folder, its jobs)`` for every size (default: the recipe's; each size in a folder of its
    own when sizes are given): one `gkd.compare` method per student (`sweep_recipe`)."""
    specs = [parse_student(text) for text in students]
    if len({spec.key for spec in specs}) != len(specs):
        raise ValueError("--students lists a student twice")
    if not img_sizes:
        return [(tuple(base.data.img_size), out, plan(sweep_recipe(base, specs), out))]
    by_size = []
    for size in (parse_img_size(text) for text in img_sizes):
        folder = out / f"{size[0]}x{size[1]}"
        by_size.append((size, folder, plan(sweep_recipe(sized_recipe(base, size), specs), folder)))
    return by_size


def _claim_folder(recipe: Recipe, out: Path) -> Recipe:
    """The sweep's base recipe (`_base`), saved in ``out``; a folder holding a sweep of another recipe is
    refused."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / SWEEP_RECIPE_FILE
    base = _base(recipe)
    if saved.is_file() and results_settings(load_recipe(saved)) != results_settings(base):  # trackers may change
        raise RecipeError(f"{out} holds a sweep of another recipe ({saved}); use a new --out directory")
    write_text(saved, dump_recipe(base))
    return base


def _plot(points: list[dict], path: Path, recipe_name: str, with_size: bool) -> None:
    """Latency vs target mIoU of every point, one colour per student (labels add the input size ``with_size``)."""
    plot_points = [
        {
            "label": f"{p['runtime']}" + (f" @{p['img_size'][0]}" if with_size else ""),
            "group": p["student"],
            "latency_ms": p["latency_ms"],
            "miou": p["miou"],
        }
        for p in points
    ]
    pareto_plot(plot_points, path, title=f"{recipe_name}: students x runtimes, latency vs target mIoU")


def run_sweep(
    recipe: Recipe,
    students: list[str],
    out: Path,
    img_sizes: list[str] | None = None,
    workers: int = 2,
    device: str = "cpu",
    max_latency_ms: float | None = None,
) -> dict:
    """Train (or reuse), export and benchmark every student at every input size; write the sweep's files.

    Args:
        recipe: the base recipe (its teacher, data and stages; its student is replaced by each of ``students``).
        students: ``NAME[,key=value...]`` specs (see `parse_student`).
        out: the sweep's folder.
        img_sizes: input sizes (``N`` or ``HxW``); default the recipe's.
        workers: training jobs at once (`gkd.compare`).
        device: ``cpu`` or ``cuda``.
        max_latency_ms: also report the best student x runtime at or under this latency.
    """
    from gkd.tracking import trackers

    specs = [parse_student(text) for text in students]
    by_size = _jobs_by_size(_base(recipe), students, out, img_sizes)  # bad students or sizes fail before any write
    base = _claim_folder(recipe, out)
    backends = trackers(recipe, out)  # connected now: a tracker that is not installed fails before any training
    points: list[dict] = []
    every_job: list = []
    failures: list[str] = []
    for size, folder, jobs in by_size:
        failures += run_jobs(jobs, folder, workers, device, out / STATUS_FILE, "sweep")
        failures += _benchmark_jobs(jobs, device)
        points += _points(jobs, size)
        every_job += jobs
    if not points:
        raise ComparisonError("sweep: no student was benchmarked; " + "; ".join(failures))
    front = pareto_front(points)
    _plot(points, out / "pareto.png", recipe.name, with_size=bool(img_sizes))
    summary = {
        "recipe": recipe.name,
        "students": [asdict(spec) for spec in specs],
        "img_sizes": [list(size) for size, _, _ in by_size],
        "points": points,
        "front": front,
        "failures": failures,
        "pareto_plot": "pareto.png",
    }
    if max_latency_ms is not None:
        summary["max_latency_ms"] = max_latency_ms
        summary["best_under_max_latency"] = best_under(points, max_latency_ms)
    write_json(out / "sweep.json", summary)
    write_text(out / "sweep.md", render_sweep(recipe.name, points, front, failures))
    track_jobs(backends, base, "sweep", every_job, [out / name for name in ("sweep.json", "sweep.md", "pareto.png")])
    return summary


def sweep_students(
    recipe: Recipe | str | Path,
    students: list[str],
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    img_sizes: list[str] | None = None,
    workers: int = 2,
    device: str = "auto",
    max_latency_ms: float | None = None,
    dry_run: bool = False,
    tflops: float | None = None,
    ranks: int | None = None,
) -> dict:
    """``gkd-compress sweep``: `run_sweep` with the recipe loaded (a `Recipe` or a YAML path, with dotted
    overrides), ``device`` resolved (``auto``: CUDA when a GPU is visible) and ``out`` (default
    ``runs/<recipe name>_sweep``) locked while it runs; returns what ``sweep.json`` holds, with ``out``.
    ``dry_run``: trains and writes nothing, returns ``{"plans": [...], "out"}``: the shared teacher's `gkd.Plan`,
    then each student's, each restricted to the stages its job runs (training timed at ``tflops`` per rank over
    ``ranks``, see `gkd.Pipeline.plan`)."""
    from gkd.pipeline import recipe_and_folder
    from gkd.rundir import LOGS_DIR, setup_logging
    from gkd.utils.lock import RunDirLock
    from gkd.utils.runtime import resolve_device

    if workers < 1:
        raise ValueError("--workers must be at least 1")
    recipe, out = recipe_and_folder(recipe, overrides, out, "_sweep")
    if dry_run:
        return {"plans": _plans(recipe, students, out, img_sizes, device, tflops, ranks), "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    with RunDirLock(out):
        setup_logging(out / LOGS_DIR)
        summary = run_sweep(recipe, students, out, img_sizes, workers, resolve_device(device).type, max_latency_ms)
    return {**summary, "out": str(out)}


def _plans(
    recipe: Recipe,
    students: list[str],
    out: Path,
    img_sizes: list[str] | None,
    device: str,
    tflops: float | None,
    ranks: int | None,
) -> list:
    """The plan (`gkd.Pipeline.plan`) of every job at every input size, in the run directory the sweep would give
    it and restricted to the stages the job runs: the shared teacher's once, then each student's (distillation,
    head, export, benchmark); nothing is trained or written."""
    from gkd.pipeline import Pipeline

    student_stages = (*JOB_STAGES[JobKind.DISTILLED], *DEPLOY)
    stages = {JobKind.TEACHER: JOB_STAGES[JobKind.TEACHER], JobKind.DISTILLED: student_stages}
    return [
        Pipeline(job.recipe, job.dir, device=device).plan(tflops=tflops, ranks=ranks, stages=stages[job.student])
        for _, _, jobs in _jobs_by_size(_base(recipe), students, out, img_sizes)
        for job in jobs
        if job.student in stages
    ]

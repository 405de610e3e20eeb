"""The pipeline as a library: `Pipeline` plans and runs a recipe's stages in a run directory exactly as
``gkd-compress run`` does (the CLI is argument parsing over it)::

    pipeline = gkd.Pipeline("recipes/smoke.yaml", out="runs/smoke", device="cpu")
    print(pipeline.plan())       # each stage up to date or why it would run; models; data; problems
    result = pipeline.run()      # every needed stage; up-to-date ones are skipped, training resumes
    result.metrics["student"]    # mIoU per domain

A run directory behaves like a build (`gkd.engine`): a stage runs when its outputs are missing or anything it
consumed changed. `run` takes the directory's lock, sets up torchrun ranks when launched under torchrun, checks
every input before the first training step, and removes a directory it created when nothing ran.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.plan import Plan, make_plan
from gkd.recipe import Recipe, check_same_recipe, dump_recipe, load_recipe
from gkd.rundir import BENCHMARK_FILE, EVAL_FILE, EXPORT_FILE, LOGS_DIR, RECIPE_FILE, REPORT_JSON_FILE, setup_logging
from gkd.utils.io import read_json

log = logging.getLogger("gkd")

CHECK_DATA = ("fast", "full")


@dataclass(frozen=True)
class RunResult:
    """What `Pipeline.run` did: the stages that ran (the others were up to date) and the checks that failed
    (an artifact that missed parity or did not build, a benchmark check), each in words."""

    run_dir: Path
    ran: list[str]
    failed: list[str] = field(default_factory=list)
    main_rank: bool = True  # under torchrun, False on every rank but 0 (which alone reads and reports)

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """mIoU (%) per model and domain from ``eval.json`` (empty before the evaluate stage ran)."""
        file = self.run_dir / EVAL_FILE
        if not file.is_file():
            return {}
        models = read_json(file)["models"]
        return {name: {d: m["miou"] for d, m in model["domains"].items()} for name, model in models.items()}


def resolve_recipe(
    recipe: Recipe | str | Path | None, out: str | Path | None, overrides: Sequence[str] = ()
) -> tuple[Recipe, Path]:
    """The recipe and run directory: ``recipe`` (a `Recipe` or a YAML path), else the one ``out`` already holds,
    else the embedded default, with dotted ``key=value`` overrides applied. A run directory holding another
    recipe is an error, never silently mixed."""
    existing = Path(out) / RECIPE_FILE if out else None
    if recipe is None and existing is not None and existing.is_file():
        recipe = existing
    resolved, run_dir = recipe_and_folder(recipe, overrides, out, suffix="")
    check_same_recipe(run_dir, resolved)
    return resolved, run_dir


def recipe_and_folder(
    recipe: Recipe | str | Path | None, overrides: Sequence[str], out: str | Path | None, suffix: str
) -> tuple[Recipe, Path]:
    """A command's recipe (a `Recipe`, a YAML path, or None: the embedded default; with dotted overrides) and its
    folder: ``out``, by default ``runs/<recipe name><suffix>``."""
    recipe = with_overrides(recipe, overrides) if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    return recipe, Path(out) if out else Path("runs") / f"{recipe.name}{suffix}"


def with_overrides(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """``recipe`` with dotted ``key=value`` overrides applied and validated."""
    from gkd.recipe import apply_overrides, parse_recipe

    return parse_recipe(apply_overrides(recipe.model_dump(mode="json"), overrides)) if overrides else recipe


class Pipeline:
    """A recipe in a run directory.

    Args:
        recipe: a `Recipe`, a recipe YAML path, or None (the recipe ``out`` holds, else the embedded default).
        out: the run directory (default ``runs/<recipe name>``).
        overrides: dotted ``key=value`` overrides, validated like the recipe (``head.lr=1e-3``).
        device: ``auto`` (CUDA when a GPU is visible), ``cpu`` or ``cuda``.
        threads: CPU threads for torch and ONNX Runtime (default: the CPUs free when the run starts).
        check_data: ``fast`` reads every data file's header before training, ``full`` decodes every file.
    """

    def __init__(
        self,
        recipe: Recipe | str | Path | None = None,
        out: str | Path | None = None,
        *,
        overrides: Sequence[str] = (),
        device: str = "auto",
        threads: int | None = None,
        check_data: str = "fast",
    ) -> None:
        if check_data not in CHECK_DATA:
            raise ValueError(f"check_data must be one of {', '.join(CHECK_DATA)}, got {check_data!r}")
        self.recipe, run_dir = resolve_recipe(recipe, out, overrides)
        self.run_dir = run_dir.resolve()  # absolute: the object keeps working after a change of directory
        self.device = device
        self.threads = threads
        self.check_data = check_data

    def file(self, name: str) -> Path:
        """A file of the run directory (e.g. ``pipeline.file("model.onnx")``)."""
        return self.run_dir / name

    @property
    def outputs(self) -> dict[str, Path]:
        """Every file the recipe's stages write that exists now, by name."""
        from gkd.stages import STAGES

        names = [name for stage in STAGES if stage.needed(self.recipe) for name in stage.outputs(self.recipe)]
        return {name: self.file(name) for name in names if self.file(name).is_file()}

    def plan(self, tflops: float | None = None, ranks: int | None = None, stages: Sequence[str] | None = None) -> Plan:
        """What `run` would do, checking every input and training nothing; ``plan().ok`` when nothing is missing.

        Args:
            tflops: the sustained TFLOP/s of one rank to time the training at (default: this device's matmul
                rate, measured now, when it is visible; a lower bound).
            ranks: the ranks the run will use (default: torchrun's ``WORLD_SIZE``, else 1).
            stages: the plan of ``run(stages=...)``: only these stages run and are costed.
        """
        import torch

        from gkd.utils.runtime import device_kind

        ranks = ranks or int(os.environ.get("WORLD_SIZE", "1"))
        kind = device_kind(self.device)
        device = torch.device(kind) if kind == "cpu" or torch.cuda.is_available() else None  # None: not timed
        only = tuple(stages) if stages is not None else None
        return make_plan(self.recipe, self.run_dir, self.check_data == "full", device, ranks, tflops, only)

    def run(self, stages: Sequence[str] | None = None, force: Sequence[str] = ()) -> RunResult:
        """Run the recipe's stages in build order, skipping those up to date.

        Args:
            stages: only these stages (default: every stage the recipe needs); each still runs only when its
                outputs are missing or something it consumed changed.
            force: redo these stages from scratch, and every stage downstream of them.
        """
        from gkd.engine import run_all

        only = tuple(stages) if stages is not None else None
        ran, main = self._execute(lambda graph, run, synced: run_all(graph, run, tuple(force), synced, only=only), only)
        return RunResult(self.run_dir, ran, self.failed_checks() if main else [], main)

    def run_stage(self, name: str) -> RunResult:
        """One stage as its own command: it runs even when up to date (a finished training resumes to its end and
        trains nothing), from scratch when something it consumed changed; its inputs must exist."""
        from gkd.engine import run_one
        from gkd.stages import STAGES
        from gkd.stages.context import Run

        stage = self._stage(name)
        stage.check_inputs(Run(self.recipe, self.run_dir, device=None, info=None), STAGES)  # type: ignore[arg-type]
        _, main = self._execute(lambda graph, run, synced: run_one(graph, run, stage), (name,))
        return RunResult(self.run_dir, [name], self.failed_checks(name) if main else [], main)

    def _stage(self, name: str):
        from gkd.stages import STAGES

        stage = next((s for s in STAGES if s.name == name), None)
        if stage is None:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
        if not (stage.needed(self.recipe) or stage.on_request):
            raise ValueError(f"stage {stage.name} is not part of this recipe")
        return stage

    def _execute(self, body: Callable, stage_names: tuple[str, ...] | None) -> tuple[Any, bool]:
        """Ranks, device, lock, logging, threads, pre-flight check, resolved recipe, seed and tracking around
        ``body(graph, run, on_stage_end)``; returns its value and whether this is rank 0. A run directory this
        call created is removed when nothing ran."""
        import torch

        from gkd.engine import RECORDS_DIR
        from gkd.stages import STAGES
        from gkd.stages.checks import check_run_inputs
        from gkd.stages.context import Run
        from gkd.tracking import tracked_run
        from gkd.utils.cpu import choose_threads
        from gkd.utils.install import onnxruntime_install_problem
        from gkd.utils.io import remove_temporary_files, write_text
        from gkd.utils.lock import RunDirLock
        from gkd.utils.runtime import (
            device_kind,
            init_distributed,
            resolve_device,
            resolve_num_workers,
            seed_everything,
        )

        recipe, run_dir = self.recipe, self.run_dir
        names = stage_names or tuple(s.name for s in STAGES if s.needed(recipe))
        stages = [self._stage(name) for name in names]
        info = init_distributed(device_kind(self.device))
        device = resolve_device(self.device, info)
        created = info.is_main and not run_dir.exists()
        try:
            with RunDirLock(run_dir) if info.is_main else nullcontext():
                level = logging.INFO if info.is_main else logging.WARNING  # other ranks: warnings only
                setup_logging(run_dir / LOGS_DIR if info.is_main else None, level=level)
                install_problem = onnxruntime_install_problem(gpu=device.type == "cuda")
                if install_problem and info.is_main:
                    log.warning(install_problem)
                if info.is_main:
                    for temp in remove_temporary_files(run_dir):
                        log.info("removed %s (left by a killed run)", temp)
                local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                workers = resolve_num_workers(recipe.training.num_workers, device, local_ranks)
                threads, why = choose_threads(self.threads, workers, local_ranks)
                torch.set_num_threads(threads)
                log.info("run directory %s (device %s, world size %d)", run_dir, device, info.world_size)
                log.info("%d CPU threads (%s)", threads, why)
                run = Run(recipe, run_dir, device, info)
                if info.is_main:
                    check_run_inputs(run, stages, full=self.check_data == "full").raise_if_problems()
                    write_text(run_dir / RECIPE_FILE, dump_recipe(recipe))
                seed_everything(recipe.seed + info.rank)
                with tracked_run(recipe, run_dir) if info.is_main else nullcontext() as tracking:
                    synced = None if tracking is None else lambda stage: tracking.sync_metrics(run_dir)
                    return body(STAGES, run, synced), info.is_main
        except BaseException:
            if created and not (run_dir / RECORDS_DIR).exists():  # nothing ran: leave no half-made run dir behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def failed_checks(self, command: str = "run") -> list[str]:
        """Artifacts that missed parity or did not build, and benchmark checks that failed, each in words (the
        files a stage command ``command`` is answerable for)."""
        export, benchmark = self.file(EXPORT_FILE), self.file(BENCHMARK_FILE)
        failed = []
        if command in ("run", "export", "benchmark", "report") and export.is_file():
            for key, reason in read_json(export).get("failed", {}).items():
                failed.append(f"export: {key} failed: {reason} (see {export})")
        if command in ("run", "benchmark", "report") and benchmark.is_file():
            failures = read_json(benchmark)["failed"]
            failed += [f"benchmark: {key} failed its checks (see {benchmark})" for key in failures]
        return failed

    def summary(self) -> str:
        """The last lines of a run: the distilled student's mIoU, the fastest runtime, where the report is."""
        lines = [f"done: {self.run_dir}"]
        report_file = self.file(REPORT_JSON_FILE)
        if not report_file.is_file():
            return lines[0]
        report = read_json(report_file)
        student = report["models"].get("student")
        if student:
            domains = ", ".join(f"{domain} {miou:.1f}" for domain, miou in student["miou"].items())
            lines.append(f"  distilled student mIoU (%): {domains}")
        timings = [
            (latency["p50_ms"], key, batch)
            for key, entry in ((report.get("benchmark") or {}).get("runtimes") or {}).items()
            if not entry.get("failed")
            for batch, latency in entry["latency"].items()
            if "p50_ms" in latency and batch == min(entry["latency"], key=int)
        ]
        if timings:
            p50, key, batch = min(timings)
            lines.append(f"  fastest runtime: {key}, {p50:.2f} ms p50 at batch {batch}")
        not_checked: dict[str, list[str]] = {}  # reason -> what (e.g. ONNX parity and latency without ONNX Runtime)
        for section in ("export", "benchmark"):
            for key, reason in ((report.get(section) or {}).get("not_checked") or {}).items():
                not_checked.setdefault(reason, []).append(f"{key} {'parity' if section == 'export' else 'latency'}")
        for reason, what in not_checked.items():
            lines.append(f"  not checked: {', '.join(what)} ({reason})")
        lines.append(f"  report: {self.file('report.md')}")
        return "\n".join(lines)

    def export_triton(self, repository: str | Path, name: str | None = None) -> dict[str, dict]:
        """A Triton Inference Server model repository of the exported artifacts (run the export stage first);
        returns ``{model: {"platform", "file", "artifact", "max_batch_size"}}``."""
        from gkd.export.triton import write_triton_repository

        return write_triton_repository(self.run_dir, repository, name or self.recipe.name)

"""The build engine of a run directory: which stages of a graph run, in which order, and what each consumed.

It knows no model and no data: a stage (`Stage`) declares the files it reads and writes, the recipe sections,
weights, data and caches it consumes, and a body the engine calls. ``stages/<stage>.json`` records what a
stage consumed (hashes of its recipe sections, of the run-directory files and weights it read, fingerprints
of its data). ``run_all`` skips a stage only when its outputs exist and nothing it consumed has changed; a
changed input reruns it from scratch and, through its new outputs, everything downstream. An interrupted
training stage resumes from its checkpoint. The stage graph is an argument (`gkd.stages.STAGES` is the
pipeline's); stages run in the order their files impose (`order`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from gkd.utils.io import file_sha256, read_json, write_json

if TYPE_CHECKING:
    from gkd.preflight import DataUse, TrainingUse
    from gkd.recipe import Recipe
    from gkd.utils.runtime import DistInfo

log = logging.getLogger("gkd")

RECORDS_DIR = "stages"  # stages/<stage>.json: what each stage consumed; stages/file_hashes.json
HASHES_FILE = "file_hashes.json"

T = TypeVar("T")


class Context(Protocol):
    """A run as the engine sees it: a recipe, a directory, the ranks it runs on, and its data fingerprints."""

    recipe: Recipe
    dir: Path
    info: DistInfo
    fingerprints: dict[str, str]

    def file(self, name: str) -> Path: ...

    def settings(self) -> dict: ...

    def weights_file(self, role: str) -> str | None: ...

    def barrier(self, what: str) -> None: ...

    def broadcast(self, value: T) -> T: ...


@dataclass(frozen=True)
class Stage:
    """A stage: what it runs, the files it writes and reads, and what else it consumes.

    ``inputs`` are files of earlier stages it cannot run without; ``reads`` every run-directory file it
    consumes when present (default: ``inputs``); ``side_outputs`` files it writes only in some recipes.
    ``data`` and ``trainings`` name the splits it reads and the training phases it runs (their checkpoints);
    ``sections`` the recipe keys (dotted) its results depend on.
    """

    name: str
    run: Callable[[Any], None]
    outputs: Callable[[Recipe], tuple[str, ...]]
    needed: Callable[[Recipe], bool] = lambda recipe: True
    distributed: bool = False  # runs on every rank (training) or on rank 0 only
    inputs: Callable[[Recipe], tuple[str, ...]] = lambda recipe: ()
    reads: Callable[[Recipe], tuple[str, ...]] | None = None
    data: Callable[[Recipe], list[DataUse]] = lambda recipe: []
    trainings: Callable[[Recipe], list[TrainingUse]] = lambda recipe: []
    sections: tuple[str, ...] = ("",)
    weights: tuple[str, ...] = ()  # model roles whose recipe weights it loads
    side_outputs: tuple[str, ...] = ()  # files it may also write (not needed for completeness); cleared on a redo
    caches: Callable[[Any, FileHashes], dict[str, str]] = lambda run, hashes: {}  # keys of the caches it reads
    on_request: bool = False  # not part of a whole run: runs when named (its command, a comparison's job)

    def consumed_files(self, recipe: Recipe) -> tuple[str, ...]:
        """Every run-directory file it reads when present."""
        return (self.reads or self.inputs)(recipe)

    def complete(self, run: Context) -> bool:
        """Whether every output exists."""
        return all(run.file(name).is_file() for name in self.outputs(run.recipe))

    def check_inputs(self, run: Context, graph: Sequence[Stage]) -> None:
        """Files of earlier stages this one reads; a clear error naming the stage of ``graph`` that writes each."""
        for name in self.inputs(run.recipe):
            if not run.file(name).is_file():
                writer = next(s.name for s in graph if name in s.outputs(run.recipe))
                raise FileNotFoundError(
                    f"stage {self.name} needs {run.file(name)}, written by stage {writer}: "
                    f"run `gkd-compress {writer}` (or `gkd-compress run`) on this run directory first"
                )


def order(graph: Sequence[Stage], recipe: Recipe) -> list[Stage]:
    """``graph`` in build order: each stage after every stage writing a file it consumes, ties broken by the
    order of ``graph``; a ``ValueError`` when stages consume each other's files."""
    writes = {stage.name: {*stage.outputs(recipe), *stage.side_outputs} for stage in graph}
    after: dict[str, set[str]] = {}  # stage -> the stages writing a file it consumes
    for stage in graph:
        reads = set(stage.consumed_files(recipe))
        after[stage.name] = {other.name for other in graph if other is not stage and writes[other.name] & reads}
    ordered: list[Stage] = []
    while len(ordered) < len(graph):
        placed = {stage.name for stage in ordered}
        ready = next((s for s in graph if s.name not in placed and after[s.name] <= placed), None)
        if ready is None:
            raise ValueError(f"stages {sorted(set(writes) - placed)} consume each other's files")
        ordered.append(ready)
    return ordered


def _section(dumped: dict, dotted: str) -> object:
    value: object = dumped
    for key in filter(None, dotted.split(".")):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FileHashes:
    """Content hashes of files, remembered with each file's size and mtime in ``stages/file_hashes.json`` so
    an unchanged file (a multi-GB teacher) is hashed once, not on every run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known: dict[str, list] = read_json(path) if path.is_file() else {}
        self.changed = False

    def __call__(self, file: Path) -> str | None:
        """The file's SHA-256 (None when it does not exist)."""
        if not file.is_file():
            return None
        stat = file.stat()
        key = str(file.resolve())
        known = self.known.get(key)
        if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            return known[2]
        digest = file_sha256(file)
        self.known[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        """Write the hashes back when any is new."""
        if self.changed:
            write_json(self.path, self.known)
            self.changed = False


def _record_file(run: Context, stage: Stage) -> Path:
    return run.file(RECORDS_DIR) / f"{stage.name}.json"


def consumed(run: Context, stage: Stage, hashes: FileHashes) -> dict:
    """What ``stage`` consumes now: hashes of its recipe sections, its run-directory inputs, the recipe's
    weight files it loads, and the fingerprints of the splits it reads (from the pre-flight check)."""
    recipe = run.recipe
    dumped = run.settings()
    weights = {role: run.weights_file(role) for role in stage.weights}
    record = {
        "recipe": {section or "(all)": _hash_json(_section(dumped, section)) for section in stage.sections},
        "inputs": {name: hashes(run.file(name)) for name in stage.consumed_files(recipe)},
        "weights": {role: hashes(Path(path)) if path else None for role, path in weights.items()},
        "data": {use.role: run.fingerprints.get(use.role) for use in stage.data(recipe)},
    }
    caches = stage.caches(run, hashes)
    return {**record, "caches": caches} if caches else record  # no key without caches: records stay as they were


def _changes(before: dict, now: dict) -> list[str]:
    """What differs between two `consumed` records, in words (an unknown data fingerprint is no change)."""
    changes = []
    kinds = (("recipe", "recipe section"), ("inputs", "input"), ("weights", "weights of"), ("data", "data"))
    for kind, label in (*kinds, ("caches", "teacher cache of")):
        old, new = before.get(kind, {}), now.get(kind, {})
        for key in sorted(set(old) | set(new)):
            if kind == "data" and (old.get(key) is None or new.get(key) is None):
                continue
            if old.get(key) != new.get(key):
                changes.append(f"{label} {key} changed")
    return changes


@dataclass(frozen=True)
class Decision:
    """Whether a stage runs, from scratch (checkpoints dropped) or resuming, and why."""

    run: bool
    scratch: bool
    reason: str


def decide(run: Context, stage: Stage, hashes: FileHashes, forced: bool = False) -> Decision:
    """Run ``stage``? Like a build system: when forced, when an output is missing, when it did not finish,
    or when anything it consumed changed since it ran (then from scratch, as it also is when forced)."""
    if forced:
        return Decision(True, True, "forced")
    record_file = _record_file(run, stage)
    record = read_json(record_file) if record_file.is_file() else None
    changes = _changes(record["consumed"], consumed(run, stage, hashes)) if record else []
    if changes:
        return Decision(True, True, "; ".join(changes))
    if not stage.complete(run):
        interrupted = record is not None and record["status"] != "complete"
        return Decision(True, False, "interrupted, resuming" if interrupted else "outputs missing")
    if record is None:
        return Decision(True, False, "no record of what it consumed")
    if record["status"] != "complete":
        return Decision(True, False, "did not finish")
    return Decision(False, False, "up to date")


def downstream(graph: Sequence[Stage], recipe: Recipe, names: tuple[str, ...]) -> set[str]:
    """``names`` and every needed stage of ``graph`` that consumes their outputs, transitively."""
    selected = set(names)
    for stage in order(graph, recipe):  # in build order, so one pass sees every producer before its consumers
        if not stage.needed(recipe) or stage.name in selected:
            continue
        produced = {file for s in graph if s.name in selected for file in (*s.outputs(recipe), *s.side_outputs)}
        if produced & set(stage.consumed_files(recipe)):
            selected.add(stage.name)
    return selected


def _drop_training_state(run: Context, stage: Stage) -> None:
    """Checkpoints, JSONL metrics and TensorBoard events of the stage's training phases, and its side outputs
    (a fresh start: a validation history must not carry over)."""
    for name in stage.side_outputs:
        run.file(name).unlink(missing_ok=True)
    for use in stage.trainings(run.recipe):
        shutil.rmtree(run.file("checkpoints") / use.name, ignore_errors=True)
        shutil.rmtree(run.file("tensorboard") / use.name, ignore_errors=True)
        run.file("logs").joinpath(f"{use.name}.jsonl").unlink(missing_ok=True)


def run_stage(
    graph: Sequence[Stage], run: Context, stage: Stage, scratch: bool = False, hashes: FileHashes | None = None
) -> None:
    """Run one stage of ``graph`` on the ranks it belongs to (``scratch``: drop its checkpoints first); everyone
    waits for it to finish. Rank 0 records what it consumed, before ("running") and after ("complete")."""
    stage.check_inputs(run, graph)
    hashes = hashes or FileHashes(run.file(RECORDS_DIR) / HASHES_FILE)
    if run.info.is_main:
        if scratch:
            _drop_training_state(run, stage)
        record = {"stage": stage.name, "status": "running", "consumed": consumed(run, stage, hashes)}
        write_json(_record_file(run, stage), record)
    run.barrier(f"start stage {stage.name}")
    if stage.distributed or run.info.is_main:
        log.info("stage %s", stage.name)
        stage.run(run)
    run.barrier(f"finish stage {stage.name} (rank 0 may run it alone)")
    if run.info.is_main:
        outputs = {name: hashes(run.file(name)) for name in stage.outputs(run.recipe)}
        write_json(_record_file(run, stage), {**record, "status": "complete", "outputs": outputs})
        hashes.save()


def _decide_on_main(run: Context, stage: Stage, hashes: FileHashes, forced: bool) -> Decision:
    """Rank 0 decides (it alone read the data); the other ranks take its decision."""
    return run.broadcast(decide(run, stage, hashes, forced) if run.info.is_main else None)


def run_one(graph: Sequence[Stage], run: Context, stage: Stage) -> None:
    """A stage's own subcommand: it runs even when up to date (resuming a finished checkpoint trains
    nothing), and from scratch when something it consumed changed since it last ran."""
    hashes = FileHashes(run.file(RECORDS_DIR) / HASHES_FILE)
    decision = _decide_on_main(run, stage, hashes, forced=False)
    if decision.run:
        log.info("stage %s: %s", stage.name, decision.reason)
    run_stage(graph, run, stage, decision.scratch, hashes)


def asked_for(stage: Stage, recipe: Recipe, only: Collection[str] | None) -> bool:
    """Whether `run_all` with ``only`` builds ``stage`` when it is out of date: named in ``only``, else needed by
    ``recipe`` and not `Stage.on_request`."""
    return stage.name in only if only is not None else stage.needed(recipe) and not stage.on_request


def run_all(
    graph: Sequence[Stage],
    run: Context,
    force: tuple[str, ...] = (),
    on_stage_end: Callable[[Stage], None] | None = None,
    only: Collection[str] | None = None,
) -> list[str]:
    """Every needed stage of ``graph`` in build order, skipping those that are up to date; ``force`` names stages
    to redo from scratch with everything downstream of them; ``on_stage_end(stage)`` runs after each stage that
    ran (e.g. `gkd.tracking`); ``only`` restricts the stages to those named (a stage `Stage.on_request` runs only
    so), under the same rule. Returns the names of the stages that ran."""
    forced = downstream(graph, run.recipe, force) if force else set()
    hashes = FileHashes(run.file(RECORDS_DIR) / HASHES_FILE)
    ran = []
    for stage in order(graph, run.recipe):
        if not asked_for(stage, run.recipe, only):
            continue
        decision = _decide_on_main(run, stage, hashes, stage.name in forced)
        if not decision.run:
            log.info("stage %s: up to date, skipped", stage.name)
            continue
        log.info(
            "stage %s: %s%s",
            stage.name,
            decision.reason,
            " (from scratch)" if decision.scratch and stage.trainings(run.recipe) else "",
        )
        run_stage(graph, run, stage, decision.scratch, hashes)
        ran.append(stage.name)
        if on_stage_end is not None:
            on_stage_end(stage)
    if run.info.is_main:
        hashes.save()
    return ran

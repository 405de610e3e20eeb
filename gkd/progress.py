"""Progress of long commands: each job's own progress file, and one live view (plus ``DIR/status.json``) of
every job of ``compare`` and ``sweep``.

A job's worker process writes ``logs/progress.json`` in its run directory (its training phase and step, at most
once a second, atomically); the command's own process reads those files. A file per job, not a queue between
processes: it works whatever runs the job (a pool worker, another machine sharing the folder), and a crashed
worker leaves nothing to clean up. The state is written to ``status.json`` (temporary file + rename) whenever a
job changes, so ``cat DIR/status.json`` or ``watch`` in another terminal always reads whole JSON.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gkd.rundir import PROGRESS_FILE
from gkd.utils.io import read_json, write_json

STATUS_FILE = "status.json"
STATES = ("done", "running", "queued", "failed")


def write_progress(run_dir: Path, phase: str, step: int = 0, steps: int = 0) -> None:
    """Record that the job in ``run_dir`` is at ``step`` of ``steps`` of ``phase`` (a training phase, or
    ``starting`` / ``evaluate``)."""
    write_json(Path(run_dir) / PROGRESS_FILE, {"phase": phase, "step": step, "steps": steps, "time": time.time()})


def read_progress(run_dir: Path, since: float) -> dict | None:
    """The job's progress written at or after ``since`` (a timestamp), else None (not started this command)."""
    path = Path(run_dir) / PROGRESS_FILE
    try:
        progress = read_json(path)
    except (OSError, ValueError):
        return None
    return progress if progress.get("time", 0) >= since else None


@dataclass(frozen=True)
class JobSteps:
    """A job of the view: its name, run directory and training phases in order, ``(phase, steps)``."""

    name: str
    dir: Path
    phases: tuple[tuple[str, int], ...]

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.phases)


def job_state(job: JobSteps, state: str, since: float) -> dict:
    """One job's entry in ``status.json``: its state and, while it runs, its phase and step (a submitted job
    whose worker has not written progress this command is still queued)."""
    entry = {"name": job.name, "state": state, "phase": None, "step": 0, "steps": 0, "total_steps": job.total_steps}
    if state == "done":
        return {**entry, "done_steps": job.total_steps}
    progress = read_progress(job.dir, since) if state == "running" else None
    if progress is None:
        return {**entry, "state": "queued" if state == "running" else state, "done_steps": 0}
    names = [name for name, _ in job.phases]
    phase = progress["phase"]
    if phase in names:
        done = sum(steps for _, steps in job.phases[: names.index(phase)]) + int(progress["step"])
    else:  # starting (nothing trained yet) or evaluate (everything trained)
        done = job.total_steps if phase != "starting" else 0
    return {**entry, "phase": phase, "step": progress["step"], "steps": progress["steps"], "done_steps": done}


def status(command: str, entries: list[dict], started: float, first_done_steps: int) -> dict:
    """The whole command's state: counts per state, steps done of all, elapsed and the ETA from the step rate
    measured since the command started (``first_done_steps``: steps already done then)."""
    elapsed = time.time() - started
    done, total = sum(e["done_steps"] for e in entries), sum(e["total_steps"] for e in entries)
    rate = (done - first_done_steps) / elapsed if elapsed > 0 else 0.0
    return {
        "command": command,
        "counts": {state: sum(e["state"] == state for e in entries) for state in STATES},
        "steps": {"done": done, "total": total},
        "elapsed_s": round(elapsed, 1),
        "eta_s": round((total - done) / rate, 1) if rate > 0 else None,
        "updated": time.time(),
        "jobs": entries,
    }


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class LiveView:
    """The one live view of a multi-job command: an overall line (jobs done / running / queued, elapsed, ETA)
    and, on a terminal, a line per running job (phase and step); ``status.json`` rewritten on every change."""

    def __init__(self, command: str, jobs: list[JobSteps], status_file: Path, lines: int) -> None:
        self.command, self.jobs, self.status_file = command, jobs, status_file
        self.started = time.time()
        self.first_done_steps: int | None = None
        self.last: list[dict] | None = None
        terminal = sys.stderr.isatty()
        self.bar = tqdm(
            total=len(jobs),
            desc=command,
            dynamic_ncols=True,
            mininterval=0.5 if terminal else 30.0,  # a log file gets a line every 30 s, not every poll
            bar_format="{desc} {n}/{total} jobs done {postfix}",
        )
        self.lines = [tqdm(bar_format="{desc}", position=i + 1, leave=False) for i in range(lines if terminal else 0)]

    def update(self, states: dict[str, str]) -> dict:
        """Read every job's progress (``states``: job name -> done, running, queued or failed), show it and
        write ``status.json`` when a job changed; returns the status."""
        entries = [job_state(job, states.get(job.name, "queued"), self.started) for job in self.jobs]
        if self.first_done_steps is None:
            self.first_done_steps = sum(e["done_steps"] for e in entries)
        current = status(self.command, entries, self.started, self.first_done_steps)
        if entries != self.last:
            write_json(self.status_file, current)
            self.last = entries
        counts = current["counts"]
        self.bar.set_postfix_str(
            f"{counts['running']} running, {counts['queued']} queued, {counts['failed']} failed | "
            f"elapsed {_format_duration(current['elapsed_s'])}, ETA {_format_duration(current['eta_s'])}",
            refresh=False,
        )
        self.bar.update(counts["done"] - self.bar.n)  # redraws at most every mininterval
        running = [e for e in entries if e["state"] == "running"]
        for index, line in enumerate(self.lines):
            entry = running[index] if index < len(running) else None
            text = f"  {entry['name']}: {entry['phase']} {entry['step']}/{entry['steps']}" if entry else ""
            line.set_description_str(text)
        return current

    def write(self, message: str) -> None:
        """A line above the view (a finished job's result)."""
        self.bar.write(message)

    def close(self) -> None:
        for line in self.lines:
            line.close()
        self.bar.close()

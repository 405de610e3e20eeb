"""The run directory as a trustworthy build, through the CLI: bad input found before training, one run at a
time, Ctrl-C, stale stages, full disks and corrupt files as one-line errors with their own exit codes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gkd.cli import main
from gkd.engine import downstream
from gkd.recipe import load_recipe
from gkd.stages import STAGES
from gkd.utils.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUSY,
    EXIT_CORRUPT_FILE,
    EXIT_DISK_FULL,
    EXIT_INTERRUPTED,
    EXIT_NO_DEVICE,
    EXIT_NOT_WRITABLE,
    DiskFullError,
)
from gkd.utils.io import save_state_dict
from tests.helpers import data_layouts
from tests.helpers.interrupted_distill import train_teacher_and_arm_interrupt
from tests.helpers.paths import REPO, TINY_RECIPE


def _recipe(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({"base": str(TINY_RECIPE), **overrides}))
    return path


def _refuse_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("training ran")

    monkeypatch.setattr("gkd.compress.trainer.Trainer.fit", refuse)


def test_bad_target_frame_shape_and_batch_stop_run_before_training(tmp_path, monkeypatch, capsys):
    root = data_layouts.cityscapes(tmp_path / "cityscapes", split="val", frames=3)
    frame = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[1]
    frame.write_bytes(frame.read_bytes()[:60])  # truncated, as by an interrupted copy
    recipe = _recipe(
        tmp_path / "bad.yaml",
        name="bad",
        models={"student": {"kwargs": {"img_size": 112, "embed_dim": 30, "depth": 4, "num_heads": 4}}},
        data={"targets": {"city": {"name": "cityscapes", "root": str(root), "split": "val"}}},
        head={"batch_size": 64},
    )
    _refuse_training(monkeypatch)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--device", "cpu"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(frame) in err and "corrupt or unreadable image" in err  # the file, named
    assert "embed_dim" in err or "divisible by num_heads" in err  # every problem at once
    assert "head: batch_size 64 is larger than its dataset" in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing ran: no half-made run directory is left


def test_second_run_on_a_busy_directory_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gkd.utils.lock import RunDirLock\n"
         f"with RunDirLock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        assert main(["run", str(TINY_RECIPE), "--out", str(out), "--device", "cpu"]) == EXIT_BUSY
        assert time.monotonic() - started < 30  # refused at once, not after training
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and "in use by another run" in err
        assert not (out / "recipe.resolved.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_sigint_checkpoints_the_current_step_and_the_rerun_resumes_there(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # 1a done (6 steps); Ctrl-C during 1b's step 4 (checkpoints every 2 steps)
    calls = train_teacher_and_arm_interrupt(
        out, monkeypatch, interrupt=lambda: os.kill(os.getpid(), signal.SIGINT), at_call=10
    )
    capsys.readouterr()
    assert main(["distill", "--out", str(out), "--device", "cpu"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "distill_domain_agnostic: interrupted at step 4; re-run to resume" in err
    assert "Traceback" not in err
    assert calls.count == 10  # the step in flight finished, no further one started
    calls.count = 0
    assert main(["distill", "--out", str(out), "--device", "cpu"]) == 0
    assert calls.count == 2  # 1b steps 5 and 6 only
    assert "distill_domain_agnostic: resumed at step 4" in (out / "logs" / "gkd.log").read_text()


def test_force_reaches_every_stage_downstream():
    recipe = load_recipe(TINY_RECIPE)
    assert downstream(STAGES, recipe, ("benchmark",)) == {"benchmark", "report"}
    after_distill = {"distill", "train-head", "evaluate", "export", "benchmark", "report"}
    assert downstream(STAGES, recipe, ("distill",)) == after_distill
    assert "distill" in downstream(STAGES, recipe, ("train-teacher",))  # the tiny teacher's encoder is distilled


def test_disk_full_at_a_checkpoint_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save_then_fill_the_disk(obj, handle, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, handle)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    out = tmp_path / "run"
    assert main(["train-teacher", str(TINY_RECIPE), "--out", str(out), "--device", "cpu"]) == EXIT_DISK_FULL
    err = capsys.readouterr().err
    assert "disk full while writing" in err and "last.pt" in err and "Traceback" not in err
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("last.pt"))


def _mount_tmpfs(mount: Path, options: str) -> None:
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_disk_full_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=256k")
    try:
        with pytest.raises(DiskFullError, match="disk full while writing"):
            save_state_dict(mount / "big.safetensors", {"w": torch.zeros(200_000)})
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_read_only_out_is_one_line(tmp_path, capsys):
    mount = tmp_path / "read_only"
    _mount_tmpfs(mount, "ro,size=64k")
    try:
        assert main(["run", str(TINY_RECIPE), "--out", str(mount / "run"), "--device", "cpu"]) == EXIT_NOT_WRITABLE
        err = capsys.readouterr().err
        assert f"cannot write {mount / 'run'}" in err and "Read-only file system" in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_data_check_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    from gkd.data.config import DatasetConfig
    from gkd.preflight import DataUse, check_dataset

    root = data_layouts.cityscapes(tmp_path / "cityscapes", split="val", frames=2)
    use = DataUse("target city", DatasetConfig(name="cityscapes", root=root, split="val"), labeled=True)
    cache = tmp_path / "checks"
    fingerprint, samples, problems = check_dataset(use, cache, full=False)
    assert (samples, problems) == (2, [])

    def unreadable(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr("gkd.preflight._header_size", unreadable)
    assert check_dataset(use, cache, full=False) == (fingerprint, 2, [])  # stat only, nothing read
    frame = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    frame.write_bytes(frame.read_bytes()[:60])
    monkeypatch.undo()
    changed, _, problems = check_dataset(use, cache, full=False)
    assert changed != fingerprint and len(problems) == 1 and str(frame) in problems[0]


def test_corrupt_checkpoint_and_truncated_weights_name_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "teacher" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert main(["train-teacher", str(TINY_RECIPE), "--out", str(out), "--device", "cpu"]) == EXIT_CORRUPT_FILE
    err = capsys.readouterr().err
    assert f"{checkpoint} is truncated or corrupt" in err and "Traceback" not in err

    weights = tmp_path / "student.safetensors"
    save_state_dict(weights, {"w": torch.zeros(1000)})
    weights.write_bytes(weights.read_bytes()[:-100])
    recipe = _recipe(tmp_path / "weights.yaml", name="weights", models={"student": {"weights": str(weights)}})
    assert main(["run", str(recipe), "--out", str(tmp_path / "other"), "--device", "cpu"]) == EXIT_BAD_INPUT
    assert f"{weights} is truncated or corrupt" in capsys.readouterr().err


def test_unavailable_device_and_a_stage_without_inputs_leave_nothing_behind(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["run", str(TINY_RECIPE), "--out", str(tmp_path / "cuda"), "--device", "cuda"]) == EXIT_NO_DEVICE
        assert "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "cuda").exists()
    assert main(["report", str(TINY_RECIPE), "--out", str(tmp_path / "new")]) == EXIT_BAD_INPUT
    assert "written by stage evaluate" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_latency_on_a_busy_machine_is_marked_in_the_report(monkeypatch):
    from gkd.export.latency import measure_latency
    from gkd.report.report import _benchmark_markdown
    from gkd.utils.cpu import available_cpus

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    spin = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(available_cpus())]
    try:
        time.sleep(0.5)
        latency = measure_latency(lambda: time.sleep(0.05), lambda: None, 1, torch.device("cpu"), 10, 0)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert latency["machine_busy"] and latency["other_cpus"] > 0.5
    benchmark = {"device": "cpu", "runtimes": {"torch/fp32": {"latency": {"1": latency}}}}
    assert "| BUSY machine (" in "\n".join(_benchmark_markdown(benchmark))  # not "ok"


def test_threads_follow_the_request_then_the_environment(monkeypatch):
    from gkd.utils.cpu import available_cpus, choose_threads

    assert choose_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads() == (2, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads, why = choose_threads(loader_workers=1)
    assert 1 <= threads <= available_cpus() and "CPUs available" in why
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(0)


def test_export_without_room_for_its_files_stops_before_writing(tmp_path, monkeypatch, capsys):
    import shutil as shell

    out = tmp_path / "run"
    out.mkdir()
    save_state_dict(out / "segmentor.safetensors", {"w": torch.zeros(10)})
    usage = shell.disk_usage(tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage._replace(free=10 * 2**20))
    assert main(["export", str(TINY_RECIPE), "--out", str(out), "--device", "cpu"]) == EXIT_DISK_FULL
    assert "export needs about" in capsys.readouterr().err
    assert not (out / "model.onnx").exists()


def test_a_stage_redone_from_scratch_trains_every_step_again(tmp_path, monkeypatch):
    from gkd.compress.objectives import TaskObjective
    from gkd.engine import run_stage
    from gkd.stages.context import Run
    from gkd.utils.runtime import DistInfo

    out = tmp_path / "run"
    assert main(["train-teacher", str(TINY_RECIPE), "--out", str(out), "--device", "cpu"]) == 0
    original, calls = TaskObjective.forward, {"n": 0}

    def counting(self, batch):
        calls["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(TaskObjective, "forward", counting)
    run = Run(load_recipe(TINY_RECIPE), out, torch.device("cpu"), DistInfo())
    run_stage(STAGES, run, STAGES[0])  # the finished checkpoint: nothing to train
    assert calls["n"] == 0
    run_stage(STAGES, run, STAGES[0], scratch=True)  # as --force does: not "resumed at step 6"
    assert calls["n"] == 6

    record = out / "stages" / "train-teacher.json"
    stale = json.loads(record.read_text())
    stale["consumed"]["recipe"]["teacher_training"] = "another"
    record.write_text(json.dumps(stale))  # as if the stage had last run on other settings
    assert main(["train-teacher", "--out", str(out), "--device", "cpu"]) == 0
    assert calls["n"] == 12  # the subcommand saw it was stale and trained from scratch

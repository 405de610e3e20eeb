"""torchrun beyond one launcher: multi-node rendezvous, restarts after a killed worker, a killed launcher, a
checkpoint resumed at another world size.

Every run is ``tests.helpers.toy_training`` (8 steps, 2 ranks, gloo on loopback) compared bit for bit with one
uninterrupted single-launcher run; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gkd.utils.lock import RESTART_LOCK_WAIT_S, RunDirLock, lock_timeout
from tests.helpers.paths import REPO
from tests.helpers.toy_training import make_trainer, read_losses

STEPS = 8
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GKD_DIST_TIMEOUT": "60"}


def _command(run_dir: Path, launcher: list[str], *options: str) -> list[str]:
    toy = ["-m", "tests.helpers.toy_training", str(run_dir), str(STEPS), *options]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, *toy]


def _run(run_dir: Path, launcher: list[str], *options: str) -> subprocess.CompletedProcess:
    command = _command(run_dir, launcher, *options)
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _weights(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints/toy/last.pt", weights_only=False)
    assert state["finished"] and state["step"] == STEPS
    return state["objective"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One launcher, 2 processes, never interrupted."""
    run_dir = tmp_path_factory.mktemp("straight")
    _run(run_dir, ["--standalone", "--nproc-per-node", "2"])
    return run_dir


@pytest.mark.slow
def test_two_single_process_launchers_match_one_launcher_of_two(straight, tmp_path):
    """Two ``--nnodes 2 --nproc-per-node 1`` launchers meeting at a c10d rendezvous train the same weights."""
    port = _free_port()
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launcher += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two_nodes"]
    nodes = [
        subprocess.Popen(_command(tmp_path, launcher), cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        errors = [node.communicate(timeout=TIMEOUT_S)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    torch.testing.assert_close(_weights(tmp_path), _weights(straight), rtol=0, atol=0)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(straight, tmp_path):
    """kill -9 of rank 1 in step 6 (objective call 11) under ``--max-restarts 1``: torchrun restarts both ranks
    (rank 1 joins 5 s late, so rank 0 looks up its address first), which resume at step 3's checkpoint."""
    launcher = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    result = _run(tmp_path, launcher, "--sigkill-rank", "1", "--sigkill-at", "11")
    assert "exitcode: -9" in result.stderr  # the first attempt did die
    torch.testing.assert_close(_weights(tmp_path), _weights(straight), rtol=0, atol=0)
    losses, expected = read_losses(tmp_path), read_losses(straight)
    assert losses == expected[:5] + expected[3:]  # steps 1..5, then 4..8 after the restart


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Some thread of ``pid`` still runs: a thread-group leader turns zombie before its other threads (gloo's,
    TensorBoard's) have exited, and only the last one's exit closes the process's files (releasing its locks)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    states = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
    return any(state != "Z" for state in states)


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds:g} s for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_launcher_takes_its_workers_and_the_lock_with_it(straight, tmp_path):
    """kill -9 of torchrun while rank 0 is stuck in step 6: both ranks exit within seconds, the run directory's
    lock is free, and a re-run resumes at step 3's checkpoint and ends with the uninterrupted weights."""
    launcher = ["--standalone", "--nproc-per-node", "2"]
    command = _command(tmp_path, launcher, "--hang-at", "11")
    agent = subprocess.Popen(command, cwd=REPO, env=_env(), stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        log = tmp_path / "logs/toy.jsonl"
        _wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) == 5, TIMEOUT_S, "step 5's log line")
        workers = _children(agent.pid)
        assert len(workers) == 2
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        _wait_for(lambda: not any(_alive(pid) for pid in workers), 10, "both ranks to exit")
    finally:  # nothing may outlive the test (torchrun starts each rank in a session of its own)
        for pid in [agent.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with RunDirLock(tmp_path, timeout=0):
        pass
    _run(tmp_path, launcher)
    torch.testing.assert_close(_weights(tmp_path), _weights(straight), rtol=0, atol=0)
    losses, expected = read_losses(tmp_path), read_losses(straight)
    assert losses == expected[:5] + expected[3:]


@pytest.mark.slow
def test_checkpoint_of_two_ranks_is_refused_on_one_naming_both(tmp_path):
    command = _command(tmp_path, ["--standalone", "--nproc-per-node", "2"], "--crash-at", "11")
    killed = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, timeout=TIMEOUT_S)
    assert killed.returncode != 0 and (tmp_path / "checkpoints/toy/last.pt").is_file()
    with pytest.raises(RuntimeError, match=r"written by 2 rank\(s\), this run has 1: resume with the same number"):
        make_trainer(tmp_path, steps=STEPS, dropout=0.0, accumulate=2).fit()


@pytest.mark.slow
def test_checkpoint_of_one_rank_is_refused_on_two_naming_both(tmp_path):
    killed = make_trainer(tmp_path, steps=STEPS, dropout=0.0, accumulate=2)
    killed.objective.crash_at_step = 11  # in step 6, after step 3's checkpoint
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    command = _command(tmp_path, ["--standalone", "--nproc-per-node", "2"])
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    assert "written by 1 rank(s), this run has 2" in result.stderr, result.stderr[-3000:]


def test_a_restarted_rank_waits_for_the_lock_and_says_whose_it_is(tmp_path, monkeypatch, caplog):
    """The killed attempt's rank 0 may still be exiting: a restarted rank waits (bounded) instead of refusing."""
    monkeypatch.delenv("GKD_LOCK_TIMEOUT", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert lock_timeout() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert lock_timeout() == RESTART_LOCK_WAIT_S
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from gkd.utils.lock import RunDirLock\n"
         f"with RunDirLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(3)"],
        cwd=REPO, env={**_env(), "TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "0"},
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with RunDirLock(tmp_path, timeout=30):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert f"PID {holder.pid}" in caplog.text and "torchrun job job7 attempt 0" in caplog.text

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkd.compress.config import OptimConfig, TrainingConfig
from gkd.compress.optim import lr_factor, param_groups
from gkd.compress.sampling import ResumableSampler
from gkd.compress.trainer import NonFiniteLossError, Trainer
from gkd.utils.runtime import DistInfo, resolve_num_workers
from tests.helpers.paths import REPO
from tests.helpers.toy_training import ToyData, ToyObjective, make_trainer, read_losses


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight = make_trainer(tmp_path / "straight", steps=8)
    straight.fit()

    killed = make_trainer(tmp_path / "resumed", steps=8)
    killed.objective.crash_at_step = 6  # killed during step 6; the last checkpoint is step 3's
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = make_trainer(tmp_path / "resumed", steps=8)
    resumed.fit()
    assert resumed.objective.calls == 5  # steps 4..8 only
    torch.testing.assert_close(resumed.objective.state_dict(), straight.objective.state_dict(), rtol=0, atol=0)
    straight_losses = read_losses(tmp_path / "straight")
    resumed_losses = read_losses(tmp_path / "resumed")  # steps 1..5 of the killed run, then 4..8 resumed
    assert resumed_losses == straight_losses[:5] + straight_losses[3:]


def test_finished_stage_does_no_training_again(tmp_path):
    make_trainer(tmp_path, steps=4).fit()
    again = make_trainer(tmp_path, steps=4)
    assert again.finished()
    again.fit()
    assert again.objective.calls == 0


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    make_trainer(tmp_path, steps=3).fit()
    other = Trainer(
        name="toy",
        objective=ToyObjective(),
        dataset=ToyData(),
        config=OptimConfig(steps=3, batch_size=8),
        training=make_trainer(tmp_path, 1).training,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        info=DistInfo(),
        seed=0,
        settings_fingerprint="other",
    )
    with pytest.raises(RuntimeError, match="other settings"):
        other.fit()


def test_non_finite_loss_names_step_and_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, steps=10)
    trainer.objective.nan_at_step = 5
    with pytest.raises(NonFiniteLossError, match=r"step 5.*last good checkpoint: .*last\.pt"):
        trainer.fit()


def test_sampler_shards_a_global_batch_like_one_process():
    single = list(ResumableSampler(10, seed=3, info=DistInfo()))
    rank0 = list(ResumableSampler(10, seed=3, info=DistInfo(0, 2)))
    rank1 = list(ResumableSampler(10, seed=3, info=DistInfo(1, 2)))
    # global batch of 4 = two ranks x 2 samples
    for b in range(2):
        assert sorted(single[4 * b : 4 * b + 4]) == sorted(rank0[2 * b : 2 * b + 2] + rank1[2 * b : 2 * b + 2])
    # an epoch visits every sample once, whatever the world size; the next epoch in another order
    assert sorted(index for index, _ in rank0 + rank1) == sorted(index for index, _ in single) == list(range(10))
    next_epoch = ResumableSampler(10, seed=3, info=DistInfo())
    next_epoch.epoch = 1
    assert [index for index, _ in next_epoch] != [index for index, _ in single]


def test_lr_schedule_and_param_groups():
    config = OptimConfig(
        steps=10, warmup_steps=2, lr=1.0, schedule="cosine", min_lr_ratio=0.1, layer_decay=0.5, weight_decay=0.3
    )
    assert lr_factor(0, config) == pytest.approx(0.5)
    assert lr_factor(2, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(0.1)
    poly = config.model_copy(update={"schedule": "poly", "min_lr_ratio": 0.0})
    assert lr_factor(6, poly) == pytest.approx(0.5)

    module = torch.nn.Module()
    module.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    module.head = torch.nn.Linear(2, 2)
    groups = param_groups(module, config)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale_of[id(module.head.weight)] == 1.0
    assert scale_of[id(module.blocks[1].weight)] == 0.5
    assert scale_of[id(module.blocks[0].weight)] == 0.25
    assert decay_of[id(module.head.bias)] == 0.0 and decay_of[id(module.head.weight)] == 0.3


def _torchrun(run_dir: Path, steps: int, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    """``tests.helpers.toy_training`` on 2 CPU processes (gloo) under torchrun."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "tests.helpers.toy_training", str(run_dir), str(steps), *options]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"torchrun exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 8 = 2 ranks x 2 accumulation steps x 2: the same
    loss curve as 1 process with batch 8."""
    make_trainer(tmp_path / "single", steps=6, dropout=0.0).fit()
    _torchrun(tmp_path / "ddp", 6)
    assert read_losses(tmp_path / "ddp") == pytest.approx(read_losses(tmp_path / "single"), rel=1e-5)


@pytest.mark.slow
def test_ddp_resume_equals_an_uninterrupted_ddp_run(tmp_path):
    _torchrun(tmp_path / "straight", 8)
    # Each rank makes 2 objective calls per step: call 11 is in step 6, after step 3's checkpoint.
    killed = _torchrun(tmp_path / "resumed", 8, "--crash-at", "11", check=False)
    assert killed.returncode != 0
    _torchrun(tmp_path / "resumed", 8)
    straight, resumed = (
        torch.load(tmp_path / "straight/checkpoints/toy/last.pt", weights_only=False),
        torch.load(tmp_path / "resumed/checkpoints/toy/last.pt", weights_only=False),
    )
    assert straight["finished"] and resumed["finished"] and resumed["step"] == 8
    torch.testing.assert_close(resumed["objective"], straight["objective"], rtol=0, atol=0)
    assert read_losses(tmp_path / "resumed")[-5:] == read_losses(tmp_path / "straight")[-5:]


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_ranks(tmp_path):
    """Rank 1 alone sees a NaN loss; the check is all-reduced, so both ranks stop (no hang on a collective)."""
    result = _torchrun(tmp_path, 40, "--nan-rank", "1", "--nan-at", "7", "--log-every", "4", check=False)
    assert result.returncode != 0
    # Both ranks raise the same error naming the first bad step (objective call 7 is in step 4).
    assert result.stderr.count("NonFiniteLossError: toy: non-finite loss at step 4") == 2, result.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints/toy/last.pt", weights_only=False)["step"] == 3


def test_first_log_after_resume_averages_only_the_steps_it_saw(tmp_path):
    """A window that starts mid-way (after a resume) divides by the steps it holds, not by log_every."""
    per_step = make_trainer(tmp_path / "per_step", steps=4, dropout=0.0)
    per_step.fit()
    killed = make_trainer(tmp_path / "windowed", steps=4, dropout=0.0, log_every=4)
    killed.objective.crash_at_step = 4  # the checkpoint of step 3 exists
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    make_trainer(tmp_path / "windowed", steps=4, dropout=0.0, log_every=4).fit()
    assert read_losses(tmp_path / "windowed") == pytest.approx(read_losses(tmp_path / "per_step")[3:], rel=1e-6)


def test_num_workers_auto(monkeypatch):
    monkeypatch.setattr("gkd.utils.runtime.available_cpus", lambda: 16)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_num_workers("auto", cpu) == 0
    assert resolve_num_workers(3, cpu) == 3
    assert resolve_num_workers("auto", cuda, local_world_size=1) == 15
    monkeypatch.setattr("gkd.utils.runtime.available_cpus", lambda: 64)
    assert resolve_num_workers("auto", cuda, local_world_size=1) == 16  # capped
    monkeypatch.setattr("gkd.utils.runtime.available_cpus", lambda: 16)
    assert resolve_num_workers("auto", cuda, local_world_size=4) == 3  # 4 CPUs per rank, one for the trainer
    assert resolve_num_workers("auto", cuda, local_world_size=16) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_num_workers("auto", cuda) == 7
    with pytest.raises(ValueError, match="num_workers"):
        TrainingConfig(num_workers=-1)

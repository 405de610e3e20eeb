"""The training loop every stage uses: DDP (torchrun), mixed precision, gradient accumulation and
clipping, atomic resumable checkpoints (model, optimizer, scheduler, scaler, sampler position, RNG), JSONL +
TensorBoard metrics, a progress bar, and a hard stop on a non-finite loss. Ctrl-C (single process) finishes the
current step, checkpoints it and raises `TrainingInterrupted`; a second Ctrl-C stops at once. Its parts live
beside it: the sample order and loader (`gkd.compress.sampling`), AdamW with optional layer-wise lr decay and
the warm-up + cosine/poly schedule (`gkd.compress.optim`), the metrics between log lines
(`gkd.compress.train_metrics`).

An *objective* is an ``nn.Module`` whose ``forward(batch) -> dict[str, Tensor]`` returns the total
under ``"loss"``; its parameters with ``requires_grad`` are what the stage trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from gkd.compress.config import OptimConfig, TrainingConfig
from gkd.compress.optim import build_optimizer, param_groups
from gkd.compress.sampling import ResumableSampler, build_loader
from gkd.compress.train_metrics import MetricsWindow
from gkd.progress import write_progress
from gkd.utils.errors import TrainingInterrupted
from gkd.utils.io import torch_load, torch_save
from gkd.utils.runtime import DistInfo, barrier, resolve_num_workers, rng_state, set_rng_state

log = logging.getLogger("gkd.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class StopRequest:
    """While active, SIGINT asks the loop to stop at the next step boundary instead of raising mid-step (where
    the optimizer state could be half-updated); a second SIGINT raises ``KeyboardInterrupt`` at once. Inactive
    off the main thread (no signal handlers there) and under DDP, where ranks could see it at different steps."""

    def __init__(self, active: bool) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous)


def autocast_dtype(training: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): ``auto`` picks bf16 on GPU, fp32 on CPU."""
    precision = training.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def fingerprint(*parts: object) -> str:
    """Short hash of the settings a checkpoint belongs to (a resumed run must use the same ones)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Trains one objective for ``config.steps`` optimizer steps, resuming from its checkpoint
    (``<run_dir>/checkpoints/<name>/last.pt``). Arguments are keyword-only.

    Args:
        name: the stage's name: names its checkpoint, log (``logs/<name>.jsonl``) and progress bar.
        objective: module whose ``forward(batch)`` returns a dict with ``loss`` (and other terms to log).
        dataset: training samples (dicts with ``image``).
        config: steps, batch size, schedule and optimiser settings.
        training: precision, workers and compilation.
        run_dir: the run directory.
        device: where to train.
        info: this process's rank and world size.
        seed: seeds the sample order and each sample's augmentation.
        settings_fingerprint: identifies the settings; a checkpoint of other settings is refused.
    """

    def __init__(
        self,
        *,
        name: str,
        objective: nn.Module,
        dataset: Dataset,
        config: OptimConfig,
        training: TrainingConfig,
        run_dir: Path,
        device: torch.device,
        info: DistInfo,
        seed: int,
        settings_fingerprint: str,
    ) -> None:
        if info.enabled and device.type == "cuda":  # decoder BatchNorm statistics over the global batch, as mmseg
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        self.name, self.objective, self.config, self.training = name, objective, config, training
        self.run_dir, self.device, self.info, self.seed = Path(run_dir), device, info, seed
        self.checkpoint_path = self.run_dir / "checkpoints" / name / "last.pt"
        self.fingerprint = settings_fingerprint
        per_step = info.world_size * config.accumulate
        if config.batch_size % per_step:
            raise ValueError(
                f"{name}: batch_size {config.batch_size} is not divisible by world size x accumulate ({per_step})"
            )
        self.micro_batch = config.batch_size // per_step
        if len(dataset) < self.micro_batch * info.world_size:
            raise ValueError(f"{name}: {len(dataset)} samples are fewer than one global batch ({config.batch_size})")
        self.sampler = ResumableSampler(len(dataset), seed, info, config.repeated_augmentation)
        workers = resolve_num_workers(training.num_workers, device)
        self.loader = build_loader(dataset, self.micro_batch, self.sampler, workers, device, seed)
        log.info("%s: %d data-loading worker(s) per rank", name, workers)
        self.amp_dtype = autocast_dtype(training, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        groups = param_groups(objective, config)
        if not groups:
            raise ValueError(f"{name}: the objective has no trainable parameters")
        self.optimizer, self.scheduler = build_optimizer(groups, config, fused=device.type == "cuda")
        # find_unused_parameters: distillers switch terms (and their heads) on and off by recipe.
        self.model: nn.Module = (
            DistributedDataParallel(objective, find_unused_parameters=True) if info.enabled else objective
        )
        self.forward_module = torch.compile(self.model) if training.compile else self.model
        self.step = 0
        self.batches_in_epoch = 0
        self.progress_written = 0.0  # when logs/progress.json was last written (time.monotonic)

    # -- checkpoints -------------------------------------------------------------------------------
    def finished(self) -> bool:
        """True when a checkpoint of a completed run of this stage exists."""
        state = self._load_checkpoint_file()
        return state is not None and state["finished"]

    def _load_checkpoint_file(self) -> dict | None:
        if not self.checkpoint_path.is_file():
            return None
        state = torch_load(self.checkpoint_path)
        written_by = state.get("world_size", self.info.world_size)  # absent in checkpoints older than the key
        if written_by != self.info.world_size:
            raise RuntimeError(
                f"{self.checkpoint_path} was written by {written_by} rank(s), this run has {self.info.world_size}: "
                "resume with the same number of ranks (--nnodes x --nproc-per-node), or use a new --out. The global "
                "batch and sample order would carry over, but not the per-rank random streams (dropout, drop-path) "
                "nor BatchNorm statistics over per-rank batches, so the run would not match an uninterrupted one"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"{self.checkpoint_path} belongs to other settings than this recipe's stage {self.name}; "
                "use a new --out directory or delete the checkpoint"
            )
        return state

    def _save_checkpoint(self, finished: bool) -> None:
        if self.info.is_main:
            torch_save(
                self.checkpoint_path,
                {
                    "fingerprint": self.fingerprint,
                    "world_size": self.info.world_size,
                    "finished": finished,
                    "step": self.step,
                    "epoch": self.sampler.epoch,
                    "batches_in_epoch": self.batches_in_epoch,
                    "objective": self.objective.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rng_state(),
                },
            )
        barrier(self.info, f"have {self.name}'s checkpoint of step {self.step} written by rank 0")

    def _resume(self) -> None:
        state = self._load_checkpoint_file()
        if state is None:
            return
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.batches_in_epoch = state["step"], state["batches_in_epoch"]
        self.sampler.epoch = state["epoch"]
        log.info("%s: resumed at step %d from %s", self.name, self.step, self.checkpoint_path)

    # -- loop --------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        while True:
            self.sampler.position = self.batches_in_epoch * self.micro_batch
            for batch in self.loader:
                self.batches_in_epoch += 1
                yield batch
            self.sampler.epoch += 1
            self.batches_in_epoch = 0

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def fit(self, on_step: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train to ``config.steps`` (resuming if a checkpoint exists); returns the last logged metrics.

        The host waits for the device only every ``log_every`` steps and before a checkpoint: loss sums and
        the finite check stay on the device in between (a per-step ``.item()`` would serialise a GPU).
        ``on_step(step)`` runs after every optimizer step, before that step's checkpoint (e.g. validation).
        """
        self._resume()
        metrics: dict[str, float] = {}
        if self.step >= self.config.steps:
            return metrics
        self.objective.train()
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(self.run_dir / "tensorboard" / self.name)) if self.info.is_main else None
        jsonl = (logs / f"{self.name}.jsonl").open("a") if self.info.is_main else None
        progress = tqdm(
            total=self.config.steps,
            initial=self.step,
            desc=self.name,
            disable=not self.info.is_main,
            dynamic_ncols=True,
            leave=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
        )
        batches = self._batches()
        window = MetricsWindow(self.device)
        stop = StopRequest(active=not self.info.enabled)
        stop.install()
        try:
            while self.step < self.config.steps:
                self._train_step(batches, window)
                progress.update(1)
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    self._raise_if_non_finite(window)
                    metrics = self._log(window, writer, jsonl, progress)
                    window = MetricsWindow(self.device)
                if on_step is not None:
                    on_step(self.step)
                checkpoint_due = self.step % self.config.checkpoint_every == 0 or stop.requested
                if checkpoint_due and self.step < self.config.steps:
                    self._raise_if_non_finite(window)
                    self._save_checkpoint(finished=False)
                    if stop.requested:
                        raise TrainingInterrupted(f"{self.name}: interrupted at step {self.step}; re-run to resume")
            self._save_checkpoint(finished=True)
        finally:
            stop.uninstall()
            batches.close()  # shuts persistent loader workers down with the stage
            progress.close()
            if writer:
                writer.close()
            if jsonl:
                jsonl.close()
        return metrics

    def _train_step(self, batches: Iterator[dict], window: MetricsWindow) -> None:
        """One optimizer step over ``config.accumulate`` micro-batches; nothing here waits for the device."""
        for micro in range(self.config.accumulate):
            batch = self._to_device(next(batches))
            last = micro == self.config.accumulate - 1
            sync = nullcontext() if last or not self.info.enabled else self.model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    outputs = self.forward_module(batch)
                loss = outputs["loss"]
                window.note_loss(loss.detach(), self.step + 1)
                self.scaler.scale(loss / self.config.accumulate).backward()
            window.add(outputs, self.config.accumulate, batch["image"].shape[0] * self.info.world_size)
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        window.steps += 1
        self._note_progress()

    def _note_progress(self) -> None:
        """Rank 0 records its phase and step in ``logs/progress.json`` (`gkd.progress`: the live view of compare
        and sweep) at most once a second, and at the last step."""
        now = time.monotonic()
        if self.info.is_main and (now - self.progress_written >= 1.0 or self.step == self.config.steps):
            write_progress(self.run_dir, self.name, self.step, self.config.steps)
            self.progress_written = now

    def _raise_if_non_finite(self, window: MetricsWindow) -> None:
        """Stop every rank together when any rank saw a non-finite loss (all-reduced, so none hangs)."""
        first_bad = window.first_bad_step(self.info)
        if first_bad:
            last_good = self.checkpoint_path if self.checkpoint_path.is_file() else "none"
            raise NonFiniteLossError(
                f"{self.name}: non-finite loss at step {first_bad}; last good checkpoint: {last_good}"
            )

    def _log(self, window: MetricsWindow, writer, jsonl, progress) -> dict[str, float]:
        metrics = window.means(self.info)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["lr_scale"]
        metrics["images_per_s"] = window.images / max(time.perf_counter() - window.start, 1e-9)
        if self.info.is_main:
            jsonl.write(json.dumps({"step": self.step, **metrics}) + "\n")
            jsonl.flush()
            for key, value in metrics.items():
                writer.add_scalar(f"{self.name}/{key}", value, self.step)
            progress.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", ips=f"{metrics['images_per_s']:.1f}"
            )
        return metrics

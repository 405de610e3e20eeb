"""What a recipe's training costs before it runs, per training phase: steps, batch, images seen, the FLOPs of a
step, the estimated time and the estimated peak memory per rank.

- FLOPs: each model's forward counted by torch's ``FlopCounterMode`` on the meta device (no weights, no memory)
  at the recipe's input size; a trained part costs 3 forwards (forward + backward), a frozen one 1.
- Time: those FLOPs at the dense matmul rate measured on the chosen device when the plan is made (fp32 on CPU,
  bf16 on CUDA). A matmul is the fastest thing a device does, so this is a lower bound: data loading,
  attention, normalisation and memory traffic run slower (`benchmarks/RESULTS.md` compares it with measured runs).
- Memory per rank: the trained part's weights, gradients and AdamW moments (16 bytes a parameter), the frozen
  part's weights, and the activations a step keeps for backward (every leaf module's output on the meta device,
  times the per-rank micro-batch). The allocator's fragmentation and the CUDA context (about 0.5 GiB) come on top.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gkd.distill_phases import PHASES
from gkd.models.checkpoint import build_segmentor
from gkd.preflight import TrainingUse
from gkd.recipe import Recipe

GIB = 2**30
ADAMW_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two moments


@dataclass(frozen=True)
class DeviceRate:
    """The dense matmul rate measured on a device."""

    device: str
    dtype: str
    tflops: float

    @property
    def bound(self) -> str:
        """How a time at this rate reads: ``>=`` at a measured matmul rate (a lower bound), ``~`` at a stated one."""
        return "~" if self.device == "stated" else ">= "

    def __str__(self) -> str:
        if self.device == "stated":
            return f"stated rate of {self.tflops:g} TFLOP/s a rank"
        return f"{self.device} {self.dtype} matmul rate measured now, {self.tflops:.2f} TFLOP/s (a lower bound)"


def measure_device_rate(device: torch.device, seconds: float = 0.3) -> DeviceRate:
    """Time square matmuls for about ``seconds`` (after one warm-up): fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return DeviceRate(device.type, str(dtype).removeprefix("torch."), 2 * size**3 * runs / elapsed / 1e12)


@dataclass(frozen=True)
class ModelCost:
    """One model (or part) per image: forward FLOPs, activation bytes a backward keeps, parameters."""

    flops: float
    activation_bytes: float
    params: int

    def __sub__(self, other: ModelCost) -> ModelCost:
        return ModelCost(
            self.flops - other.flops, self.activation_bytes - other.activation_bytes, self.params - other.params
        )


def _measure(model: nn.Module, img_size: tuple[int, int], bytes_per_value: int) -> ModelCost:
    """Forward FLOPs and the summed leaf-module output sizes of one image, on the meta device."""
    saved = [0]

    def count(module: nn.Module, inputs: object, output: object) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                saved[0] += tensor.numel() * bytes_per_value

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [module.register_forward_hook(count) for module in leaves]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, 3, *img_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return ModelCost(float(counter.get_total_flops()), float(saved[0]), sum(p.numel() for p in model.parameters()))


class RecipeModels:
    """The recipe's teacher and student, built on the meta device and measured at each phase's input size."""

    def __init__(self, recipe: Recipe, num_classes: int, bytes_per_value: int = 4) -> None:
        self.recipe, self.num_classes, self.bytes = recipe, num_classes, bytes_per_value
        self._measured: dict[tuple, tuple[ModelCost, ModelCost]] = {}

    def _pair(self, role: str, size: tuple[int, int], patch_size: int | None) -> tuple[ModelCost, ModelCost]:
        """(encoder, whole segmentor) of ``role`` at ``size`` (and ``patch_size``; None: its own)."""
        key = (role, size, patch_size)
        if key not in self._measured:
            models = self.recipe.models
            config = getattr(models, role)
            update = {"weights": None, "kwargs": {**config.kwargs, "img_size": size}}
            config = config.model_copy(update={**update, **({"patch_size": patch_size} if patch_size else {})})
            decoder = (models.teacher_decoder or models.decoder) if role == "teacher" else models.decoder
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                segmentor = build_segmentor(config, decoder, self.num_classes).eval()
            encoder_cost = _measure(segmentor.encoder, size, self.bytes)
            self._measured[key] = encoder_cost, _measure(segmentor, size, self.bytes)
        return self._measured[key]

    def _phase_input(self, phase: str) -> tuple[tuple[int, int], int | None]:
        """A distillation phase's crop size and patch size (its ImageNet transform's), else the recipe's."""
        declared = next((p for p in PHASES if p.name == phase), None)
        transform = declared.transform_config(self.recipe) if declared else None
        size = (transform.input_size,) * 2 if transform is not None else tuple(self.recipe.data.img_size)
        return size, declared.patch_size_of(self.recipe) if declared else None  # type: ignore[return-value]

    def parts(self, use: TrainingUse) -> tuple[list[ModelCost], list[ModelCost]]:
        """(trained, frozen) parts of a training phase, as it declares them, at its input size."""
        size, patch_size = self._phase_input(use.name)
        costs: dict[str, ModelCost] = {}
        for role in ("teacher", "student"):
            encoder, whole = self._pair(role, size, patch_size)
            costs |= {role: whole, f"{role} encoder": encoder, f"{role} head": whole - encoder}
        return [costs[part] for part in use.trained], [costs[part] for part in use.frozen]


@dataclass(frozen=True)
class PhaseCost:
    """One training phase's budget and its estimates."""

    stage: str
    phase: str
    steps: int
    batch_size: int
    tflop_per_step: float
    seconds: float | None
    peak_gib_per_rank: float

    @property
    def images(self) -> int:
        return self.steps * self.batch_size

    def line(self, bound: str = ">= ") -> str:
        time_text = "time not estimated" if self.seconds is None else f"{bound}{duration(self.seconds)}"
        return (
            f"  {self.stage} / {self.phase}: {self.steps} steps x batch {self.batch_size} = {self.images:,} images, "
            f"{self.tflop_per_step:.3g} TFLOP a step, {time_text}, ~{self.peak_gib_per_rank:.2f} GiB a rank"
        )


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:.1f} days"


def phase_costs(
    recipe: Recipe, trainings: list[tuple[str, TrainingUse]], num_classes: int, rate: DeviceRate | None, ranks: int
) -> list[PhaseCost]:
    """The cost of each ``(stage, training phase)`` at ``ranks`` ranks (time at ``rate``; None: not timed)."""
    bf16 = rate is not None and rate.dtype == "bfloat16"
    models = RecipeModels(recipe, num_classes, bytes_per_value=2 if bf16 else 4)
    teacher_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[recipe.training.teacher_dtype]
    costs = []
    for stage, use in trainings:
        config = use.config
        trained, frozen = models.parts(use)
        per_image = sum(3 * part.flops for part in trained) + sum(part.flops for part in frozen)
        flops = per_image * config.batch_size
        micro_batch = max(1, config.batch_size // ranks // config.accumulate)
        weights = sum(ADAMW_BYTES_PER_PARAM * p.params for p in trained) + sum(teacher_bytes * p.params for p in frozen)
        activations = micro_batch * sum(part.activation_bytes for part in trained)
        seconds = None if rate is None else flops / ranks * config.steps / (rate.tflops * 1e12)
        costs.append(
            PhaseCost(
                stage, use.name, config.steps, config.batch_size, flops / 1e12, seconds, (weights + activations) / GIB
            )
        )
    return costs

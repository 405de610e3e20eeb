"""A run's model as a function from RGB images to label maps, in any runtime its export wrote::

    predictor = gkd.Predictor.from_run("runs/smoke", runtime="onnxruntime")
    labels = predictor.predict(images)   # uint8 class ids, each at its image's own size

Inference is the recipe's evaluation path (``whole``: resized to the model's input size, logits resized back;
``slide``: windows of the input size, stitched), so the labels are those the reported mIoU was computed from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gkd.evaluate.inference import frames_logits, resolve_stride
from gkd.export.runtimes import RUNTIME_NAMES, Runtime, TorchRuntime, load_runtime, runtime_loaders
from gkd.models.checkpoint import load_segmentor
from gkd.models.segmentor import Segmentor
from gkd.recipe import Recipe, load_recipe
from gkd.rundir import EXPORT_FILE, MODEL_FILES, RECIPE_FILE, JobKind
from gkd.utils.io import read_json

# the models a run holds, by the name `predict --model` takes
RUN_MODELS = {
    name: MODEL_FILES[kind]
    for name, kind in (("student", JobKind.DISTILLED), ("no_kd", JobKind.NO_KD), ("teacher", JobKind.TEACHER))
}


class PredictError(ValueError):
    """A model, runtime or artifact the run cannot provide."""


def load_run_segmentor(run_dir: str | Path, model: str = "student") -> Segmentor:
    """The PyTorch segmentor a run trained, in eval mode on the CPU.

    Args:
        run_dir: a run directory (or a segmentor ``.safetensors`` file of one).
        model: ``student`` (the distilled, deployed model), ``no_kd`` or ``teacher``.
    """
    path = Path(run_dir)
    if path.is_file():
        return load_segmentor(path)[0].eval()
    return load_segmentor(_model_file(path, model))[0].eval()


def _model_file(run_dir: Path, model: str) -> Path:
    if model not in RUN_MODELS:
        raise PredictError(f"unknown model {model!r}; a run holds {', '.join(RUN_MODELS)}")
    for name in (RECIPE_FILE, RUN_MODELS[model]):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a finished gkd-compress run?")
    return run_dir / RUN_MODELS[model]


def load_run_runtime(
    run_dir: Path, runtime: str, precision: str, device: torch.device, model: str = "student"
) -> tuple[Runtime, Recipe]:
    """A segmentor of the run in ``runtime`` at ``precision``: PyTorch from its safetensors file, any other
    runtime from the artifacts in ``export.json`` (the distilled student's only).

    Args:
        run_dir: the run directory.
        runtime: ``torch`` or the runtime of an exported artifact.
        precision: the artifact's precision.
        device: where to run.
        model: ``student`` (the deployed model), ``no_kd`` or ``teacher`` (the run's references, PyTorch only).
    """
    run_dir = Path(run_dir)
    if model != "student" and runtime != "torch":
        raise PredictError(f"only the student is exported; run the {model} with --runtime torch")
    segmentor = load_segmentor(_model_file(run_dir, model))[0].to(device).eval()
    recipe = load_recipe(run_dir / RECIPE_FILE)
    img_size = recipe.data.img_size
    if runtime == "torch":
        return TorchRuntime(segmentor, img_size, precision, device), recipe
    if runtime not in RUNTIME_NAMES:
        raise PredictError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIME_NAMES)}")
    if not (run_dir / EXPORT_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / EXPORT_FILE} not found: run `gkd-compress export --out {run_dir}` first")
    export_summary = read_json(run_dir / EXPORT_FILE)
    loaders, skipped = runtime_loaders(segmentor, img_size, run_dir, export_summary, device, [runtime])
    key = f"{runtime}/{precision}"
    if key not in loaders:
        why = skipped.get(key, f"the run has {', '.join(sorted(loaders)) or 'no artifact'} for {runtime}")
        raise PredictError(f"{key} is not available in {run_dir}: {why}")
    loaded, why = load_runtime(loaders[key])
    if loaded is None:
        raise PredictError(f"{key} does not load here: {why}")
    return loaded, recipe


class Predictor:
    """Labels at native resolution from a `Runtime`, with the recipe's evaluation mode.

    Args:
        runtime: the loaded model (`gkd.export.runtimes`).
        recipe: the run's recipe (input size, ``evaluate.mode`` and ``stride``).
        batch_size: images (``whole``) or windows (``slide``) per model call.
    """

    def __init__(self, runtime: Runtime, recipe: Recipe, batch_size: int = 8) -> None:
        self.runtime = runtime
        self.recipe = recipe
        self.size = tuple(recipe.data.img_size)
        self.mode = recipe.evaluate.mode
        self.stride = resolve_stride(self.size, recipe.evaluate.stride)
        self.batch_size = batch_size

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        runtime: str = "torch",
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        model: str = "student",
        batch_size: int = 8,
    ) -> Predictor:
        """The run's ``model`` in ``runtime`` at ``precision`` (an artifact its export wrote, or ``torch``)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        loaded, recipe = load_run_runtime(Path(run_dir), runtime, precision, torch.device(device), model)
        return cls(loaded, recipe, batch_size)

    @property
    def class_names(self) -> list[str]:
        from gkd.data.config import dataset_info

        return list(dataset_info(self.recipe.data.source)[1])

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runtime.predict(images.numpy().astype(np.float32)))

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 ``(H, W)`` class ids of each RGB ``(H, W, 3)`` image (uint8, or float in [0, 1]), at its own size."""
        tensors = [_chw(image) for image in images]
        logits = frames_logits(self._logits, tensors, self.size, self.mode, self.stride, self.batch_size)
        return [frame.argmax(0).to(torch.uint8).numpy() for frame in logits]


def _chw(image: np.ndarray) -> torch.Tensor:
    """An RGB ``(H, W, 3)`` image as a float ``(3, H, W)`` tensor in [0, 1] (uint8 is divided by 255)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return tensor / 255.0 if image.dtype == np.uint8 else tensor

"""Stage ``benchmark``: latency of every exported artifact (the model at its input size, and a whole frame
through the evaluation path), and its accuracy on every target domain."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gkd.engine import Stage
from gkd.evaluate.inference import resolve_stride
from gkd.export.benchmark import FramePath, benchmark_artifacts
from gkd.models.checkpoint import load_segmentor
from gkd.rundir import BENCHMARK_FILE, EXPORT_FILE, SEGMENTOR_FILE, SOURCE_DOMAIN
from gkd.stages.context import EVAL_DATA, Run, evaluation_data, files, make_domain_evaluator
from gkd.utils.io import read_json, write_json


def stage_benchmark(run: Run) -> None:
    """Latency of every runtime x precision x batch size, and each artifact's mIoU on every domain."""
    recipe = run.recipe
    segmentor = load_segmentor(run.file(SEGMENTOR_FILE))[0].to(run.device).eval()
    evaluate_domains = make_domain_evaluator(run)

    def evaluate(predict_numpy: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
        def predict(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(predict_numpy(images.numpy().astype(np.float32))))

        return {name: metrics["miou"] for name, metrics in evaluate_domains(predict).items() if name != SOURCE_DOMAIN}

    summary = benchmark_artifacts(
        segmentor,
        recipe.data.img_size,
        run.dir,
        read_json(run.file(EXPORT_FILE)),
        recipe.benchmark,
        run.device,
        evaluate,
        frame_path(run),
    )
    write_json(run.file(BENCHMARK_FILE), summary)


def frame_path(run: Run) -> FramePath:
    """The evaluation path of one frame the size of the source_val dataset's first image."""
    recipe = run.recipe
    frame = run.dataset(recipe.data.source_val, train=False)[0]["image"]
    return FramePath(
        size=(int(frame.shape[-2]), int(frame.shape[-1])),
        mode=recipe.evaluate.mode,
        stride=resolve_stride(recipe.data.img_size, recipe.evaluate.stride),
        batch_size=recipe.evaluate.batch_size,
    )


STAGE = Stage(
    "benchmark",
    stage_benchmark,
    files(BENCHMARK_FILE),
    inputs=files(SEGMENTOR_FILE, EXPORT_FILE),
    data=lambda r: evaluation_data(r) if r.benchmark.accuracy else evaluation_data(r)[:1],  # frame size: source_val
    sections=(*EVAL_DATA, "evaluate", "benchmark"),
)

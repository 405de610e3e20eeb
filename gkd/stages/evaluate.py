"""Stage ``evaluate``: every trained model of the run on the held-out source split and each target domain."""

from __future__ import annotations

from gkd.engine import Stage
from gkd.evaluate.inference import torch_predictor
from gkd.models.checkpoint import load_segmentor
from gkd.rundir import BEST_SEGMENTOR_FILE, EVAL_FILE, NO_KD_FILE, SEGMENTOR_FILE, TEACHER_FILE
from gkd.stages.context import EVAL_DATA, Run, evaluation_data, files, make_domain_evaluator
from gkd.utils.io import write_json


def evaluate_segmentors(run: Run, files: dict[str, str]) -> dict[str, dict]:
    """``{name: {params_m, encoder_params_m, domains: {domain: metrics}}}`` for each segmentor file of the
    run dir that exists (``files`` maps a model name to its file name)."""
    evaluate = make_domain_evaluator(run)
    results = {}
    for name, file in files.items():
        if run.file(file).is_file():
            segmentor = load_segmentor(run.file(file))[0].to(run.device)
            results[name] = {
                "params_m": sum(p.numel() for p in segmentor.parameters()) / 1e6,
                "encoder_params_m": sum(p.numel() for p in segmentor.encoder.parameters()) / 1e6,
                "domains": evaluate(torch_predictor(segmentor, run.device), name),
            }
    return results


def stage_evaluate(run: Run) -> None:
    """mIoU and per-class IoU of every trained model on the source split and each target domain."""
    files = {"teacher": TEACHER_FILE, "no_kd": NO_KD_FILE, "student": SEGMENTOR_FILE}
    results = evaluate_segmentors(run, {**files, "student_best": BEST_SEGMENTOR_FILE})
    write_json(run.file(EVAL_FILE), {"class_names": run.class_names, "models": results})


STAGE = Stage(
    "evaluate",
    stage_evaluate,
    files(EVAL_FILE),
    inputs=files(SEGMENTOR_FILE),
    reads=files(TEACHER_FILE, NO_KD_FILE, SEGMENTOR_FILE, BEST_SEGMENTOR_FILE),
    data=evaluation_data,
    sections=(*EVAL_DATA, "evaluate"),
)

"""``gkd-compress``: run the whole pipeline, or one stage, on a recipe; list the model zoo; inspect data."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from gkd import __version__
from gkd.rundir import LOGS_DIR, setup_logging
from gkd.utils.errors import EXIT_BAD_INPUT, EXIT_FAILED_CHECK, EXIT_INTERRUPTED

log = logging.getLogger("gkd")


def _setup_logging(run_dir: Path | None, is_main: bool = True) -> None:
    """stderr, plus ``run_dir/logs/gkd.log`` on the main rank; other ranks log warnings only."""
    log_dir = run_dir / LOGS_DIR if run_dir is not None and is_main else None
    setup_logging(log_dir, level=logging.INFO if is_main else logging.WARNING)


def _recipe_and_overrides(words: list[str]) -> tuple[str | None, list[str]]:
    """The positional words of a pipeline command: an optional recipe path and dotted ``key=value`` overrides."""
    from gkd.recipe import is_override

    overrides = [word for word in words if is_override(word)]
    paths = [word for word in words if not is_override(word)]
    if len(paths) > 1:
        raise ValueError(f"one recipe at most, got {', '.join(paths)} (overrides are dotted.key=value)")
    return (paths[0] if paths else None), overrides


def _pipeline(args: argparse.Namespace):
    from gkd.pipeline import Pipeline

    recipe, overrides = _recipe_and_overrides(args.recipe)
    return Pipeline(
        recipe, args.out, overrides=overrides, device=args.device, threads=args.threads, check_data=args.check_data
    )


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """``run`` (every needed stage, or ``--dry-run``: the plan) or one stage's command."""
    pipeline = _pipeline(args)
    if getattr(args, "dry_run", False):
        _setup_logging(None)
        plan = pipeline.plan(tflops=args.tflops, ranks=args.ranks)
        print(plan)
        return 0 if plan.ok else EXIT_BAD_INPUT
    result = pipeline.run(force=args.force or ()) if args.command == "run" else pipeline.run_stage(args.command)
    if not result.main_rank:
        return 0
    for failure in result.failed:
        log.error(failure)
    print(pipeline.summary() if args.command in ("run", "report") else f"done: {pipeline.run_dir}")
    return EXIT_FAILED_CHECK if result.failed else 0


def _cmd_export(args: argparse.Namespace) -> int:
    """The export stage, then (``--triton DIR``) a Triton Inference Server model repository of its artifacts."""
    status = _cmd_pipeline(args)
    if status != 0 or not args.triton:
        return status
    models = _pipeline(args).export_triton(args.triton, args.triton_name)
    log.info("triton: %s in %s (tritonserver --model-repository %s)", ", ".join(models), args.triton, args.triton)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from gkd.compare import compare_methods

    summary = compare_methods(
        args.recipe,
        args.out,
        overrides=args.overrides,
        workers=args.workers,
        device=args.device,
        methods=args.methods,
        max_seeds=args.max_seeds,
    )
    minutes = f"{summary['wall_minutes']:.1f} min wall, {summary['job_minutes']:.1f} job-minutes"
    folder = Path(summary["out"])
    log.info("done: %s (%d jobs, %s); table: %s", folder, summary["jobs"], minutes, folder / "comparison.md")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from gkd.predict import predict

    _setup_logging(None)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    summary = predict(
        args.run_dir,
        args.inputs,
        args.out,
        runtime=args.runtime,
        precision=args.precision,
        batch_size=args.batch_size,
        device=device,
        strict=args.strict,
        frame_step=args.frame_step,
        model=args.model,
    )
    log.info("predict: %d frames written to %s", len(summary["frames"]), args.out)
    for item in summary["skipped"]:
        log.warning("predict: skipped %s", item["error"])
    return 0 if summary["frames"] else EXIT_BAD_INPUT


def _cmd_engine(args: argparse.Namespace) -> int:
    from gkd.export.engine_build import build_run_engine, parse_batch_range

    _setup_logging(None)
    batch_range = parse_batch_range(args.batch_range) if args.batch_range else None
    entry = build_run_engine(args.run_dir, args.precision, batch_range, args.out)
    print(f"{entry['file']}: parity {'ok' if entry['parity']['passed'] else 'FAILED: ' + entry['parity']['reason']}")
    return 0 if entry["parity"]["passed"] else EXIT_FAILED_CHECK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from gkd.sweep import plan_sweep, sweep_students

    if args.dry_run:
        _setup_logging(None)
        plans = plan_sweep(
            args.recipe,
            args.students,
            args.out,
            overrides=args.overrides,
            img_sizes=args.img_sizes,
            device=args.device,
            tflops=args.tflops,
            ranks=args.ranks,
        )
        print("\n\n".join(str(plan) for plan in plans))
        return 0 if all(plan.ok for plan in plans) else EXIT_BAD_INPUT

    summary = sweep_students(
        args.recipe,
        args.students,
        args.out,
        overrides=args.overrides,
        img_sizes=args.img_sizes,
        workers=args.workers,
        device=args.device,
        max_latency_ms=args.max_latency_ms,
    )
    log.info("done: %s; table: %s", summary["out"], Path(summary["out"]) / "sweep.md")
    if args.max_latency_ms is not None:
        best = summary["best_under_max_latency"]
        print(
            f"best at <= {args.max_latency_ms:g} ms: "
            + (
                f"{best['student']} in {best['runtime']} ({best['latency_ms']:.2f} ms, {best['miou']:.1f} mIoU)"
                if best
                else "no student is that fast here"
            )
        )
    return 1 if summary["failures"] else 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from gkd.models.zoo import format_zoo_table, zoo_rows

    rows = zoo_rows()
    print(json.dumps(rows, indent=2) if args.json else format_zoo_table(rows))
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from gkd.data.config import DatasetConfig, inspect_dataset

    _setup_logging(None)
    config = DatasetConfig(
        name=args.name,
        root=args.root,
        split=args.split,
        skip_bad=args.skip_bad,
        options=json.loads(args.options) if args.options else {},
    )
    result = inspect_dataset(config)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto (default): CUDA when a GPU is visible, else CPU; cuda without a GPU is an error"


def build_parser() -> argparse.ArgumentParser:
    """The ``gkd-compress`` parser: ``run`` and one sub-command per stage, then the tools (compare, predict,
    sweep, zoo, data inspect); every sub-command takes ``--debug``."""
    parser = argparse.ArgumentParser(
        prog="gkd-compress",
        description="Distil a vision foundation model into a small segmentation model, export and benchmark it.",
        epilog="exit codes: 0 ok, 1 a check failed, 2 bad input, 3 run directory busy, 4 disk full, "
        "5 not writable, 6 corrupt file, 7 device not available, 8 missing dependency (TensorRT, CUDA), "
        "130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"gkd-compress {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of an error"
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_pipeline_commands(commands, debug)
    _add_compare_command(commands, debug)
    _add_predict_command(commands, debug)
    _add_sweep_command(commands, debug)
    _add_engine_command(commands, debug)
    _add_tool_commands(commands, debug)
    return parser


def _command(commands, name: str, help_text: str, debug: argparse.ArgumentParser, **options) -> argparse.ArgumentParser:
    """A sub-command that takes ``--debug`` (``options``: more ``add_parser`` keywords, e.g. ``description``)."""
    return commands.add_parser(name, help=help_text, parents=[debug], **options)


OVERRIDES_HELP = "dotted recipe overrides, validated like the recipe (head.lr=1e-3 distill.joint.steps=200)"


def _add_device(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)


def _add_pipeline_commands(commands, debug: argparse.ArgumentParser) -> None:
    """``run`` and one sub-command per stage, all on a recipe and a run directory."""
    from gkd.stages import STAGES

    def pipeline_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = _command(commands, name, help_text, debug, description=help_text)
        command.add_argument(
            "recipe",
            nargs="*",
            metavar="RECIPE [KEY=VALUE ...]",
            help="recipe YAML (default: the run dir's recipe, else the embedded default), then dotted overrides "
            "validated like the recipe (distill.task_agnostic.steps=2000 head.lr=1e-3)",
        )
        command.add_argument("--out", help="run directory (default: runs/<recipe name>)")
        _add_device(command)
        command.add_argument(
            "--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: the CPUs free right now)"
        )
        command.add_argument(
            "--check-data",
            choices=("fast", "full"),
            default="fast",
            help="before training, check every data file: fast (default) reads headers, full decodes everything",
        )
        command.set_defaults(handler=_cmd_pipeline)
        return command

    run = pipeline_command(
        "run", "all stages; up-to-date stages are skipped, stale ones rerun, training resumes from checkpoints"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe, check the data and weights, print the plan with each training phase's steps, "
        "images, estimated time and memory; train nothing",
    )
    _add_plan_options(run)
    run.add_argument(
        "--force",
        nargs="+",
        choices=[s.name for s in STAGES],
        help="redo these stages from scratch, and every stage downstream of them",
    )
    stage_commands = {
        stage.name: pipeline_command(stage.name, (stage.run.__doc__ or stage.name).strip().splitlines()[0])
        for stage in STAGES
    }
    export = stage_commands["export"]
    export.add_argument("--triton", metavar="DIR", help="also write a Triton Inference Server model repository")
    export.add_argument("--triton-name", help="Triton model name (default: the recipe's name)")
    export.set_defaults(handler=_cmd_export)


def _add_plan_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tflops",
        type=float,
        help="--dry-run: time the training at this sustained TFLOP/s per rank (default: this device's matmul rate, "
        "measured now; a lower bound). benchmarks/RESULTS.md has measured rates, e.g. one H100",
    )
    command.add_argument("--ranks", type=int, help="--dry-run: ranks the run will use (default: WORLD_SIZE or 1)")


def _add_compare_command(commands, debug: argparse.ArgumentParser) -> None:
    help_text = "train the recipe's compare.methods over their seeds from one shared teacher; tabulate"
    compare = _command(commands, "compare", help_text, debug)
    compare.add_argument("recipe", help="recipe YAML with compare.methods")
    compare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    compare.add_argument("--out", help="output directory (default: runs/<recipe name>_compare)")
    compare.add_argument("--workers", type=int, default=2, help="jobs trained at once (CPU threads split evenly)")
    _add_device(compare)
    compare.add_argument("--methods", nargs="+", help="only these methods (default: all the recipe lists)")
    compare.add_argument("--max-seeds", type=int, help="only the first N seeds of each method")
    compare.set_defaults(handler=_cmd_compare)


def _add_predict_command(commands, debug: argparse.ArgumentParser) -> None:
    from gkd.export.runtimes import RUNTIME_NAMES

    help_text = "segment pictures, folders, globs and videos with a run's model; labels, overlays, summary"
    predict = _command(commands, "predict", help_text, debug)
    predict.add_argument("run_dir", help="a finished run directory")
    predict.add_argument("inputs", nargs="+", help="pictures, folders, glob patterns ('**' recurses), videos")
    predict.add_argument("--out", required=True, help="output folder: labels/, overlays/, contact sheet, summary")
    predict.add_argument(
        "--runtime", default="torch", choices=RUNTIME_NAMES, help="torch, or a runtime of an exported artifact"
    )
    predict.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"))
    predict.add_argument(
        "--model", default="student", choices=("student", "no_kd", "teacher"), help="which of the run's models"
    )
    predict.add_argument("--batch-size", type=int, default=8, help="frames (or slide windows) per model call")
    predict.add_argument("--frame-step", type=int, default=1, help="videos: segment every n-th frame")
    predict.add_argument("--strict", action="store_true", help="stop at an unreadable input instead of skipping it")
    _add_device(predict)
    predict.set_defaults(handler=_cmd_predict)


def _add_sweep_command(commands, debug: argparse.ArgumentParser) -> None:
    help_text = "distil, export and benchmark several students; latency vs target-mIoU Pareto front"
    sweep = _command(commands, "sweep", help_text, debug)
    sweep.add_argument("recipe", help="recipe YAML (its student is replaced by each of --students)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    sweep.add_argument(
        "--students", nargs="+", required=True, help="NAME[,key=value...]: zoo/timm name, timm kwargs, weights=PATH"
    )
    sweep.add_argument("--img-sizes", nargs="+", help="input sizes, N or HxW (default: the recipe's)")
    sweep.add_argument("--out", help="output directory (default: runs/<recipe name>_sweep)")
    sweep.add_argument("--workers", type=int, default=2, help="students trained at once")
    _add_device(sweep)
    sweep.add_argument("--max-latency-ms", type=float, help="print the best student x runtime within this latency")
    sweep.add_argument("--dry-run", action="store_true", help="print each student's plan (checks, cost); train nothing")
    _add_plan_options(sweep)
    sweep.set_defaults(handler=_cmd_sweep)


def _add_engine_command(commands, debug: argparse.ArgumentParser) -> None:
    from gkd.export.engine_build import ENGINE_PRECISIONS

    help_text = "build a TensorRT engine from a run's ONNX model on this machine; check it against ONNX Runtime"
    engine = _command(commands, "engine", help_text, debug, description=help_text)
    engine.add_argument("run_dir", help="a run directory whose export stage is complete")
    engine.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS, help="the ONNX graph built from")
    engine.add_argument("--batch-range", help="MIN,OPT,MAX batch of the profile (default: the export's)")
    engine.add_argument("--out", help="engine file (default: RUN_DIR/engines/model.<precision>.plan)")
    engine.set_defaults(handler=_cmd_engine)


def _add_tool_commands(commands, debug: argparse.ArgumentParser) -> None:
    """``zoo`` and ``data inspect``."""
    zoo = _command(commands, "zoo", "list the teacher/student model zoo", debug)
    zoo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    zoo.set_defaults(handler=_cmd_zoo)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    inspect = _command(
        data,
        "inspect",
        "sample count and class pixel counts of a split (native resolution)",
        debug,
        description="Count the samples of one split and the pixels of each class (after the label mapping, at "
        "native resolution); every file is decoded, so bad files are found too.",
    )
    inspect.add_argument(
        "name",
        help="dataset: folder (your own: images + masks, classes in ROOT/dataset.yaml), gtav, camvid, ...",
    )
    inspect.add_argument("root", help="the dataset's folder")
    inspect.add_argument("--split", default="train", help="split to read (default: train)")
    inspect.add_argument("--options", help='dataset options as JSON, e.g. \'{"domain": "dusk"}\'')
    inspect.add_argument("--skip-bad", action="store_true", help="skip (and log) bad samples instead of stopping")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=_cmd_data_inspect)


def _error_exit(error: BaseException) -> tuple[int, str] | None:
    """The exit code and one-line message for an error a user can act on; None for anything else (a bug)."""
    from gkd.compare import ComparisonError
    from gkd.data.base import DataError
    from gkd.models.weights import WeightsMismatchError
    from gkd.recipe import RecipeError
    from gkd.utils.errors import UserError, user_error_for_write

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted; re-run the same command to continue (finished stages are kept)"
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        error = user_error_for_write(error, error.filename or "a file") or error
    elif isinstance(error, RuntimeError) and not isinstance(error, UserError):
        error = user_error_for_write(error, "a file") or error  # a library's wrapped ENOSPC
    if isinstance(error, UserError):
        return error.exit_code, str(error)
    if isinstance(error, (RecipeError, DataError, WeightsMismatchError, FileNotFoundError, ValueError)):
        return EXIT_BAD_INPUT, str(error)
    if isinstance(error, ComparisonError):
        return EXIT_FAILED_CHECK, str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BaseException as error:
        handled = _error_exit(error) if isinstance(error, Exception | KeyboardInterrupt) else None
        if handled is None:
            raise
        code, message = handled
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"gkd-compress: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

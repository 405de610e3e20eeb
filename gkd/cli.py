"""``gkd-compress``: run the whole pipeline, or one stage, on a recipe; list the model zoo; inspect data."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from gkd import cli_parser
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


def _options(args: argparse.Namespace, *names: str) -> dict[str, object]:
    """The parsed options ``names`` as keyword arguments of the function a command calls."""
    return {name: getattr(args, name) for name in names}


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
        args.recipe, args.out, **_options(args, "overrides", "workers", "device", "methods", "max_seeds")
    )
    minutes = f"{summary['wall_minutes']:.1f} min wall, {summary['job_minutes']:.1f} job-minutes"
    folder = Path(summary["out"])
    log.info("done: %s (%d jobs, %s); table: %s", folder, summary["jobs"], minutes, folder / "comparison.md")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from gkd.predict import predict
    from gkd.utils.runtime import device_kind

    _setup_logging(None)
    device = device_kind(args.device)
    options = _options(args, "runtime", "precision", "batch_size", "strict", "frame_step", "model")
    summary = predict(args.run_dir, args.inputs, args.out, device=device, **options)
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
    from gkd.sweep import sweep_students

    options = _options(args, "overrides", "img_sizes", "device", "workers", "max_latency_ms", "dry_run")
    if args.dry_run:
        _setup_logging(None)
    summary = sweep_students(args.recipe, args.students, args.out, **options, **_options(args, "tflops", "ranks"))
    if args.dry_run:
        print("\n\n".join(str(plan) for plan in summary["plans"]))
        return 0 if all(plan.ok for plan in summary["plans"]) else EXIT_BAD_INPUT
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


def build_parser() -> argparse.ArgumentParser:
    """The ``gkd-compress`` parser (`gkd.cli_parser`), each command run by its handler here."""
    return cli_parser.build_parser(
        {
            "pipeline": _cmd_pipeline,
            "export": _cmd_export,
            "compare": _cmd_compare,
            "predict": _cmd_predict,
            "sweep": _cmd_sweep,
            "engine": _cmd_engine,
            "zoo": _cmd_zoo,
            "data inspect": _cmd_data_inspect,
        }
    )


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

"""``gkd-compress``: run the whole pipeline, or one stage, on a recipe; list the model zoo; inspect data."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from gkd import __version__
from gkd.rundir import (
    BENCHMARK_FILE,
    EXPORT_FILE,
    LOGS_DIR,
    RECIPE_FILE,
    REPORT_JSON_FILE,
    setup_logging,
)
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


def _resolve_recipe(words: list[str], out: str | None):
    """The recipe and run dir: an explicit recipe, else the one a run dir already holds, else the
    embedded default, with the command line's ``key=value`` overrides applied. A run dir holding another
    recipe is an error, never silently mixed."""
    from gkd.recipe import check_same_recipe, dump_recipe, load_recipe

    recipe_path, overrides = _recipe_and_overrides(words)
    existing = Path(out) / RECIPE_FILE if out else None
    if recipe_path is None and existing is not None and existing.is_file():
        recipe = load_recipe(existing, overrides)
    else:
        recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    check_same_recipe(run_dir, recipe)
    return recipe, run_dir, dump_recipe(recipe)


def _stages_of(recipe, command: str) -> list:
    """The stages a pipeline command runs: all needed ones for ``run``, else the one named."""
    from gkd.stages import STAGES

    if command == "run":
        return [stage for stage in STAGES if stage.needed(recipe)]
    stage = next(s for s in STAGES if s.name == command)
    if not stage.needed(recipe):
        raise ValueError(f"stage {stage.name} is not part of this recipe")
    return [stage]


def _dry_run(recipe, run_dir: Path, full_check: bool) -> int:
    from gkd.data.config import describe_dataset
    from gkd.engine import HASHES_FILE, RECORDS_DIR, FileHashes, decide
    from gkd.stages import STAGES
    from gkd.stages.checks import check_run_inputs
    from gkd.stages.context import Run
    from gkd.utils.runtime import DistInfo

    print(f"recipe: {recipe.name}\nrun directory: {run_dir}")
    plan = Run(recipe, run_dir, device=None, info=DistInfo())  # type: ignore[arg-type]
    checked = check_run_inputs(plan, [s for s in STAGES if s.needed(recipe)], full=full_check, use_cache=False)
    hashes = FileHashes(run_dir / RECORDS_DIR / HASHES_FILE)
    print("stages:")
    for stage in STAGES:
        decision = decide(plan, stage, hashes) if stage.needed(recipe) else None
        status = "not in this recipe" if decision is None else decision.reason
        status = f"to run: {status}" if decision is not None and decision.run else status
        print(f"  {stage.name:<14} {status:<48} -> {', '.join(stage.outputs(recipe))}")
    missing: list[str] = []
    print("models:")
    for role, model in (("teacher", recipe.models.teacher), ("student", recipe.models.student)):
        weights = model.weights
        state = "random init" if weights is None else (str(weights) if Path(weights).exists() else f"{weights} MISSING")
        if weights is not None and not Path(weights).exists():
            missing.append(str(weights))
        print(f"  {role}: {model.name} {model.kwargs or ''} weights: {state}")
    print(
        f"  decoder: {recipe.models.decoder.name}; distillation: {recipe.distill.schedule} / {recipe.distill.loss.name}"
    )
    data = recipe.data
    sets = {
        "source": data.source,
        **{f"extra source {i}": extra for i, extra in enumerate(data.extra_sources)},
        "source_val": data.source_val,
        **({"proxy": data.proxy} if data.proxy else {}),
        **{f"target {k}": v for k, v in data.targets.items()},
    }
    print("data:")
    for role, config in sets.items():
        described = describe_dataset(config)
        missing += [path for path in described.get("missing", []) if path not in missing]
        where = "generated" if config.name == "synthetic" else f"root {config.root}"
        samples = checked.num_samples.get(role)
        print(f"  {role}: {config.name}, split {config.split}, {where}" + (f", {samples} samples" if samples else ""))
    problems = [problem for problem in checked.problems if not any(path in problem for path in missing)]
    if problems:
        print("problems:\n" + "\n".join(f"  {problem}" for problem in problems))
    if missing:  # last, one path a line
        print(f"missing: (relative paths are relative to the current directory, {Path.cwd()})")
        print("\n".join(f"  {path}" for path in missing))
    if missing or problems:
        return EXIT_BAD_INPUT
    print("everything the recipe names is present and readable")
    return 0


def _summary(run_dir: Path) -> str:
    """The last lines of a run: the distilled student's mIoU, the fastest runtime, where the report is."""
    from gkd.utils.io import read_json

    lines = [f"done: {run_dir}"]
    report_file = run_dir / REPORT_JSON_FILE
    if not report_file.is_file():
        return lines[0]
    report = read_json(report_file)
    student = report["models"].get("student")
    if student:
        domains = ", ".join(f"{domain} {miou:.1f}" for domain, miou in student["miou"].items())
        lines.append(f"  distilled student mIoU (%): {domains}")
    timings = [
        (latency["p50_ms"], key, batch)
        for key, entry in ((report.get("benchmark") or {}).get("runtimes") or {}).items()
        if not entry.get("failed")
        for batch, latency in entry["latency"].items()
        if "p50_ms" in latency and batch == min(entry["latency"], key=int)
    ]
    if timings:
        p50, key, batch = min(timings)
        lines.append(f"  fastest runtime: {key}, {p50:.2f} ms p50 at batch {batch}")
    not_checked: dict[str, list[str]] = {}  # reason -> what (e.g. ONNX parity and latency without ONNX Runtime)
    for section in ("export", "benchmark"):
        for key, reason in ((report.get(section) or {}).get("not_checked") or {}).items():
            not_checked.setdefault(reason, []).append(f"{key} {'parity' if section == 'export' else 'latency'}")
    for reason, what in not_checked.items():
        lines.append(f"  not checked: {', '.join(what)} ({reason})")
    lines.append(f"  report: {run_dir / 'report.md'}")
    return "\n".join(lines)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    import torch

    from gkd.engine import RECORDS_DIR, run_all, run_one
    from gkd.stages import STAGES
    from gkd.stages.checks import check_run_inputs
    from gkd.stages.context import Run
    from gkd.tracking import tracked_run
    from gkd.utils.cpu import choose_threads
    from gkd.utils.install import onnxruntime_install_problem
    from gkd.utils.io import remove_temporary_files, write_text
    from gkd.utils.lock import RunDirLock
    from gkd.utils.runtime import init_distributed, resolve_device, resolve_num_workers, seed_everything

    recipe, run_dir, resolved = _resolve_recipe(args.recipe, args.out)
    stages = _stages_of(recipe, args.command)
    if getattr(args, "dry_run", False):
        _setup_logging(None)
        return _dry_run(recipe, run_dir, args.check_data == "full")
    for stage in stages if args.command != "run" else []:  # before anything is created in the run dir
        stage.check_inputs(Run(recipe, run_dir, device=None, info=None), STAGES)  # type: ignore[arg-type]
    device_kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    info = init_distributed(device_kind)
    device = resolve_device(args.device, info)
    created = info.is_main and not run_dir.exists()
    try:
        with RunDirLock(run_dir) if info.is_main else nullcontext():
            _setup_logging(run_dir, info.is_main)
            install_problem = onnxruntime_install_problem(gpu=device.type == "cuda")
            if install_problem and info.is_main:
                log.warning(install_problem)
            if info.is_main:
                for temp in remove_temporary_files(run_dir):
                    log.info("removed %s (left by a killed run)", temp)
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = resolve_num_workers(recipe.training.num_workers, device, local_ranks)
            threads, why = choose_threads(args.threads, workers, local_ranks)
            torch.set_num_threads(threads)
            log.info("run directory %s (device %s, world size %d)", run_dir, device, info.world_size)
            log.info("%d CPU threads (%s)", threads, why)
            run = Run(recipe, run_dir, device, info)
            if info.is_main:
                check_run_inputs(run, stages, full=args.check_data == "full").raise_if_problems()
                write_text(run_dir / RECIPE_FILE, resolved)
            seed_everything(recipe.seed + info.rank)
            with tracked_run(recipe, run_dir) if info.is_main else nullcontext() as tracking:
                synced = None if tracking is None else lambda stage: tracking.sync_metrics(run_dir)
                if args.command == "run":
                    run_all(STAGES, run, force=tuple(args.force or ()), on_stage_end=synced)
                else:
                    run_one(STAGES, run, stages[0])
    except BaseException:
        if created and not (run_dir / RECORDS_DIR).exists():  # nothing ran: leave no half-made run dir behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if not info.is_main:
        return 0
    print(_summary(run_dir) if args.command in ("run", "report") else f"done: {run_dir}")
    return EXIT_FAILED_CHECK if _failed_checks(run_dir, args.command) else 0


def _failed_checks(run_dir: Path, command: str) -> bool:
    """Log and report whether an artifact missed parity, did not build, or failed the benchmark's checks."""
    export, benchmark = run_dir / EXPORT_FILE, run_dir / BENCHMARK_FILE
    failed = False
    if command in ("run", "export", "benchmark", "report") and export.is_file():
        for key, reason in json.loads(export.read_text()).get("failed", {}).items():
            log.error("export: %s failed: %s (see %s)", key, reason, export)
            failed = True
    if command in ("run", "benchmark", "report") and benchmark.is_file():
        for key in json.loads(benchmark.read_text()).get("failed", []):
            log.error("benchmark: %s failed its checks (see %s)", key, benchmark)
            failed = True
    return failed


def _cmd_export(args: argparse.Namespace) -> int:
    """The export stage, then (``--triton DIR``) a Triton model repository of its artifacts."""
    status = _cmd_pipeline(args)
    if status != 0 or not args.triton:
        return status
    from gkd.export.triton import write_triton_repository

    recipe, run_dir, _ = _resolve_recipe(args.recipe, args.out)
    models = write_triton_repository(run_dir, args.triton, args.triton_name or recipe.name)
    log.info("triton: %s in %s (tritonserver --model-repository %s)", ", ".join(models), args.triton, args.triton)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from gkd.compare import run_comparison
    from gkd.recipe import load_recipe
    from gkd.utils.lock import RunDirLock

    if args.workers < 1 or (args.max_seeds is not None and args.max_seeds < 1):
        raise ValueError("--workers and --max-seeds must be at least 1")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else Path("runs") / f"{recipe.name}_compare"
    with RunDirLock(out):
        _setup_logging(out)
        summary = run_comparison(recipe, out, args.workers, args.device, args.methods, args.max_seeds)
    minutes = f"{summary['wall_minutes']:.1f} min wall, {summary['job_minutes']:.1f} job-minutes"
    log.info("done: %s (%d jobs, %s); table: %s", out, summary["jobs"], minutes, out / "comparison.md")
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


def _cmd_sweep(args: argparse.Namespace) -> int:
    from gkd.recipe import load_recipe
    from gkd.sweep import run_sweep

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{recipe.name}_sweep"
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    summary = run_sweep(recipe, args.students, out, args.img_sizes, args.workers, args.device, args.max_latency_ms)
    log.info("done: %s; table: %s", out, out / "sweep.md")
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
        "5 not writable, 6 corrupt file, 7 device not available, 130 interrupted",
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
        "--dry-run", action="store_true", help="validate the recipe, check the data, print the plan; train nothing"
    )
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
    sweep.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sweep.add_argument("--max-latency-ms", type=float, help="print the best student x runtime within this latency")
    sweep.set_defaults(handler=_cmd_sweep)


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
    inspect.add_argument("name", help="dataset: gtav, cityscapes, bdd100k, mapillary, acdc, camvid, ...")
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

"""``gkd-compress``: run the whole pipeline, or one stage, on a recipe; list the model zoo; inspect data."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gkd import __version__

log = logging.getLogger("gkd")

EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2


def _setup_logging(run_dir: Path | None, is_main: bool = True) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and is_main:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / "gkd.log"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _resolve_recipe(recipe_path: str | None, out: str | None):
    """The recipe and run dir: an explicit recipe, else the one a run dir already holds, else the
    embedded default. A run dir holding another recipe is an error, never silently mixed."""
    from gkd.recipe import RecipeError, dump_recipe, load_recipe

    existing = Path(out) / "recipe.resolved.yaml" if out else None
    if recipe_path is None and existing is not None and existing.is_file():
        recipe = load_recipe(existing)
    else:
        recipe = load_recipe(recipe_path)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    saved = run_dir / "recipe.resolved.yaml"
    if saved.is_file() and load_recipe(saved) != recipe:
        raise RecipeError(f"{run_dir} holds the results of another recipe ({saved}); use a new --out directory")
    return recipe, run_dir, dump_recipe(recipe)


def _dry_run(recipe, run_dir: Path) -> int:
    from gkd.data.config import describe_dataset
    from gkd.pipeline import STAGES, Run
    from gkd.utils.runtime import DistInfo

    print(f"recipe: {recipe.name}\nrun directory: {run_dir}")
    fake = Run(recipe, run_dir, device=None, info=DistInfo())  # type: ignore[arg-type]
    print("stages:")
    for stage in STAGES:
        status = (
            "not in this recipe" if not stage.needed(recipe) else ("complete" if stage.complete(fake) else "to run")
        )
        print(f"  {stage.name:<14} {status:<18} -> {', '.join(stage.outputs(recipe))}")
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
        missing += described.get("missing", [])
        print(f"  {role}: {config.name} {config.root or ''} split={config.split} {json.dumps(described)}")
    if missing:
        print("missing:\n" + "\n".join(f"  {path}" for path in missing))
        return EXIT_BAD_INPUT
    print("everything the recipe names is present")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    import torch

    from gkd.pipeline import STAGES, Run, run_all, run_stage
    from gkd.utils.install import onnxruntime_install_problem
    from gkd.utils.io import write_text
    from gkd.utils.runtime import init_distributed, resolve_device, seed_everything

    recipe, run_dir, resolved = _resolve_recipe(args.recipe, args.out)
    if getattr(args, "dry_run", False):
        _setup_logging(None)
        return _dry_run(recipe, run_dir)
    device_kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    info = init_distributed(device_kind)
    device = resolve_device(args.device, info)
    _setup_logging(run_dir, info.is_main)
    install_problem = onnxruntime_install_problem(gpu=device.type == "cuda")
    if install_problem and info.is_main:
        log.warning(install_problem)
    if info.is_main:
        write_text(run_dir / "recipe.resolved.yaml", resolved)
        log.info("run directory %s (device %s, world size %d)", run_dir, device, info.world_size)
    seed_everything(recipe.seed + info.rank)
    run = Run(recipe, run_dir, device, info)
    if args.command == "run":
        run_all(run, force=tuple(args.force or ()))
    else:
        stage = next(s for s in STAGES if s.name == args.command)
        if not stage.needed(recipe):
            raise ValueError(f"stage {stage.name} is not part of this recipe")
        run_stage(run, stage)
    if info.is_main and _failed_checks(run_dir, args.command):
        return EXIT_FAILED_CHECK
    if info.is_main:
        log.info("done: %s", run_dir)
    return 0


def _failed_checks(run_dir: Path, command: str) -> bool:
    """Log and report whether an artifact missed parity, did not build, or failed the benchmark's checks."""
    export, benchmark = run_dir / "export.json", run_dir / "benchmark.json"
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


def _cmd_compare(args: argparse.Namespace) -> int:
    from gkd.compare import run_comparison
    from gkd.recipe import load_recipe

    if args.workers < 1 or (args.max_seeds is not None and args.max_seeds < 1):
        raise ValueError("--workers and --max-seeds must be at least 1")
    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / f"{recipe.name}_compare"
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    summary = run_comparison(recipe, out, args.workers, args.device, args.methods, args.max_seeds)
    log.info("done: %s (%.1f min); table: %s", out, summary["wall_minutes"], out / "comparison.md")
    return 0


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
    from gkd.pipeline import STAGES

    parser = argparse.ArgumentParser(
        prog="gkd-compress",
        description="Distil a vision foundation model into a small segmentation model, export and benchmark it.",
    )
    parser.add_argument("--version", action="version", version=f"gkd-compress {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def pipeline_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "recipe", nargs="?", help="recipe YAML (default: the run dir's recipe, else the embedded default)"
        )
        command.add_argument("--out", help="run directory (default: runs/<recipe name>)")
        command.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        command.set_defaults(handler=_cmd_pipeline)
        return command

    run = pipeline_command("run", "all stages; complete stages are skipped, training resumes from checkpoints")
    run.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan; load nothing")
    run.add_argument(
        "--force", nargs="+", choices=[s.name for s in STAGES], help="re-run these stages even if complete"
    )
    for stage in STAGES:
        pipeline_command(stage.name, (stage.run.__doc__ or stage.name).strip().splitlines()[0])

    compare = commands.add_parser(
        "compare", help="train the recipe's compare.methods over their seeds from one shared teacher; tabulate"
    )
    compare.add_argument("recipe", help="recipe YAML with compare.methods")
    compare.add_argument("--out", help="output directory (default: runs/<recipe name>_compare)")
    compare.add_argument("--workers", type=int, default=2, help="jobs trained at once (CPU threads split evenly)")
    compare.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    compare.add_argument("--methods", nargs="+", help="only these methods (default: all the recipe lists)")
    compare.add_argument("--max-seeds", type=int, help="only the first N seeds of each method")
    compare.set_defaults(handler=_cmd_compare)

    zoo = commands.add_parser("zoo", help="list the teacher/student model zoo")
    zoo.add_argument("--json", action="store_true")
    zoo.set_defaults(handler=_cmd_zoo)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    inspect = data.add_parser("inspect", help="sample count and class pixel counts of a split (native resolution)")
    inspect.add_argument("name")
    inspect.add_argument("root")
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--options", help='dataset options as JSON, e.g. \'{"domain": "dusk"}\'')
    inspect.add_argument("--skip-bad", action="store_true", help="skip (and log) bad samples instead of stopping")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=_cmd_data_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gkd.compare import ComparisonError
    from gkd.data.base import DataError
    from gkd.models.weights import WeightsMismatchError
    from gkd.recipe import RecipeError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (RecipeError, DataError, WeightsMismatchError, FileNotFoundError, ValueError) as error:
        print(f"gkd-compress: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ComparisonError as error:
        print(f"gkd-compress: error: {error}", file=sys.stderr)
        return EXIT_FAILED_CHECK


if __name__ == "__main__":
    sys.exit(main())

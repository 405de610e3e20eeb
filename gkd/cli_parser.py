"""The ``gkd-compress`` argument parser: its commands, options and help; `gkd.cli` runs what it parses."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

from gkd import __version__

Handler = Callable[[argparse.Namespace], int]  # runs a parsed command; returns the exit status

DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto (default): CUDA when a GPU is visible, else CPU; cuda without a GPU is an error"


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The ``gkd-compress`` parser: ``run`` and one sub-command per stage, then the tools (compare, predict,
    sweep, zoo, data inspect); every sub-command takes ``--debug`` and sets ``handler``, from ``handlers``
    (keys: ``pipeline``, ``export`` and the tools' names, ``data inspect`` for that one)."""
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
    _add_pipeline_commands(commands, debug, handlers)
    _add_compare_command(commands, debug, handlers)
    _add_predict_command(commands, debug, handlers)
    _add_sweep_command(commands, debug, handlers)
    _add_engine_command(commands, debug, handlers)
    _add_tool_commands(commands, debug, handlers)
    return parser


def _command(commands, name: str, help_text: str, debug: argparse.ArgumentParser, **options) -> argparse.ArgumentParser:
    """A sub-command that takes ``--debug`` (``options``: more ``add_parser`` keywords, e.g. ``description``)."""
    return commands.add_parser(name, help=help_text, parents=[debug], **options)


OVERRIDES_HELP = "dotted recipe overrides, validated like the recipe (head.lr=1e-3 distill.joint.steps=200)"


def _add_device(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)


def _add_pipeline_commands(commands, debug: argparse.ArgumentParser, handlers: Mapping[str, Handler]) -> None:
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
        command.set_defaults(handler=handlers["pipeline"])
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
    export.set_defaults(handler=handlers["export"])


def _add_plan_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tflops",
        type=float,
        help="--dry-run: time the training at this sustained TFLOP/s per rank (default: this device's matmul rate, "
        "measured now; a lower bound). benchmarks/RESULTS.md has measured rates, e.g. one H100",
    )
    command.add_argument("--ranks", type=int, help="--dry-run: ranks the run will use (default: WORLD_SIZE or 1)")


def _add_compare_command(commands, debug: argparse.ArgumentParser, handlers: Mapping[str, Handler]) -> None:
    help_text = "train the recipe's compare.methods over their seeds from one shared teacher; tabulate"
    compare = _command(commands, "compare", help_text, debug)
    compare.add_argument("recipe", help="recipe YAML with compare.methods")
    compare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    compare.add_argument("--out", help="output directory (default: runs/<recipe name>_compare)")
    compare.add_argument("--workers", type=int, default=2, help="jobs trained at once (CPU threads split evenly)")
    _add_device(compare)
    compare.add_argument("--methods", nargs="+", help="only these methods (default: all the recipe lists)")
    compare.add_argument("--max-seeds", type=int, help="only the first N seeds of each method")
    compare.set_defaults(handler=handlers["compare"])


def _add_predict_command(commands, debug: argparse.ArgumentParser, handlers: Mapping[str, Handler]) -> None:
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
    predict.set_defaults(handler=handlers["predict"])


def _add_sweep_command(commands, debug: argparse.ArgumentParser, handlers: Mapping[str, Handler]) -> None:
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
    sweep.add_argument(
        "--dry-run", action="store_true", help="print the shared teacher's plan and each student's; train nothing"
    )
    _add_plan_options(sweep)
    sweep.set_defaults(handler=handlers["sweep"])


def _add_tool_commands(commands, debug: argparse.ArgumentParser, handlers: Mapping[str, Handler]) -> None:
    """``zoo`` and ``data inspect``."""
    zoo = _command(commands, "zoo", "list the teacher/student model zoo", debug)
    zoo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    zoo.set_defaults(handler=handlers["zoo"])

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
    inspect.set_defaults(handler=handlers["data inspect"])


def _add_engine_command(commands, debug: argparse.ArgumentParser, handlers: Mapping[str, Handler]) -> None:
    from gkd.export.engine_build import ENGINE_PRECISIONS

    help_text = "build a TensorRT engine from a run's ONNX model on this machine; check it against ONNX Runtime"
    engine = _command(commands, "engine", help_text, debug, description=help_text)
    engine.add_argument("run_dir", help="a run directory whose export stage is complete")
    engine.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS, help="the ONNX graph built from")
    engine.add_argument("--batch-range", help="MIN,OPT,MAX batch of the profile (default: the export's)")
    engine.add_argument("--out", help="engine file (default: RUN_DIR/engines/model.<precision>.plan)")
    engine.set_defaults(handler=handlers["engine"])

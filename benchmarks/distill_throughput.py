"""Throughput and peak memory of one distillation training step, fp32 eager vs. tuned.

One step is what GKD stage 1 (``distill.task_agnostic`` / ``distill.domain_agnostic``) repeats:
the frozen teacher's forward pass without gradients, the student's forward and backward passes through
the distillation loss (with the loss's own heads), gradient clipping at norm 1 (as the trainer does)
and an AdamW step. It is built from the project's own parts, ``gkd.models.zoo.create_backbone``,
``gkd.compress.losses.build_loss`` and ``gkd.compress.objectives.DistillObjective``, with random
weights (speed does not depend on them) on a fixed random batch already on the device: data loading
is not measured.

Modes:

* ``eager``: everything in float32, no compilation, AdamW with its default (for-each) kernels.
* ``eager-amp``: the fair baseline, how the authors' code trains: the same eager step under
  ``torch.autocast`` (bfloat16 on GPU), float32 weights, no compilation, for-each AdamW.
* ``tuned``: on GPU the step under ``torch.autocast(bfloat16)`` with the teacher's weights in bfloat16;
  the objective (student forward + loss; the teacher call inside it) compiled with ``torch.compile``;
  fused AdamW. Attention is timm's default (``F.scaled_dot_product_attention``) in every mode;
  channels-last does not apply to ViTs. On CPU the tuned precision defaults to float32 (compile + fused
  AdamW only): bfloat16 pays off only on CPUs with native bf16 arithmetic (AVX512-BF16, AMX);
  ``--tuned-precision bf16`` measures it.
* ``fed``: the tuned step, each batch drawn from the trainer's real data loader
  (`gkd.compress.sampling.build_loader`, ``--workers`` per rank, pinned memory, non-blocking copies) over
  ``--data`` (``synthetic`` scenes or CamVid frames from ``--data-root``, the recipe-style training transform
  at ``--img-size``) instead of one fixed batch on the device: ``fed / tuned`` says whether the loader keeps up.
* ``cached``: the fed step reading the teacher's outputs from a teacher-output cache (``distill.teacher_cache``:
  `gkd.compress.teacher_cache`, ``--views`` views per image stored in ``--cache-dtype``) instead of running the
  teacher: ``cached / fed`` is what the cache buys a stage-1 step. The cache is built once before the timed steps
  (``cache_build_s``, paid once for every job that reads it) in a temporary folder.

FLOPs per step (forward + backward of the student and the loss heads, the teacher's forward) are counted once
with ``torch.utils.flop_counter`` on the eager step; MFU = achieved FLOP/s over the device's measured
bfloat16 matmul rate (``--peak-tflops`` overrides the measurement).

Each mode runs in its own child process, so peak memory is the mode's own:
``torch.cuda.max_memory_allocated`` on GPU, the process's maximum resident set size
(``resource.getrusage``) on CPU, each reported with its value before the first step (the models, and
on CPU the imports too) so the step's share can be read off. Timing synchronises CUDA before starting
and before stopping the clock; ``--warmup`` steps (compilation included) run first and are not timed;
then ``--repeats`` windows of ``--steps`` steps are timed and the median window is reported (every
window's rate is kept in the JSON).

Examples::

    # GPU, the paper's F2L pair at the paper's crop:
    python benchmarks/distill_throughput.py --teacher dinov2_vitl14 --student deit_base --loss qsd \\
        --img-size 512 --batch-size 8 --steps 20 --warmup 5 --device cuda --out results.json
    # CPU smoke version with small widths:
    python benchmarks/distill_throughput.py --tiny --device cpu --img-size 112 --batch-size 4 --steps 10 --warmup 3
    # The CamVid benchmark's pair on CPU, online teacher against the teacher-output cache:
    python benchmarks/distill_throughput.py --recipe recipes/camvid_day2dusk.yaml --device cpu --batch-size 8 \
        --modes fed cached --data camvid --data-root ../shared/data/CamVid --workers 0 --steps 10 --repeats 3
    # A recipe's teacher / student / loss / image size:
    python benchmarks/distill_throughput.py --recipe recipes/gtav2real/f2l_dinov2l_deitb_gkd.yaml --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Small widths for --tiny (CPU smoke runs): architecture families and patch sizes are kept.
TINY_TEACHER = {"embed_dim": 128, "depth": 4, "num_heads": 4}
TINY_STUDENT = {"embed_dim": 64, "depth": 4, "num_heads": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="take teacher, student, loss and image size from this recipe")
    parser.add_argument("--teacher", default="dinov2_vitl14", help="zoo spec or timm ViT name")
    parser.add_argument("--student", default="deit_base", help="zoo spec or timm ViT name")
    parser.add_argument("--loss", default="qsd", help="distillation loss (feature kind): qsd, mse, cwd, vitkd, ...")
    parser.add_argument("--loss-options", default="{}", help="loss options as JSON")
    parser.add_argument("--teacher-kwargs", default="{}", help="timm kwargs of the teacher, JSON")
    parser.add_argument("--student-kwargs", default="{}", help="timm kwargs of the student, JSON")
    parser.add_argument("--img-size", type=int, nargs="+", default=[512], help="N, or H W")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=1, help="timed windows; the median window is reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small widths (CPU smoke runs)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("eager", "eager-amp", "tuned", "fed", "cached"),
        default=["eager", "eager-amp", "tuned"],
    )
    parser.add_argument("--views", type=int, default=4, help="cached mode: augmented views per image in the cache")
    parser.add_argument("--cache-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="cached mode")
    parser.add_argument("--data", choices=("synthetic", "camvid"), default="synthetic", help="images of the fed mode")
    parser.add_argument("--data-root", help="dataset folder for --data camvid")
    parser.add_argument("--workers", default="auto", help="loader workers of the fed mode: auto or a number")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's bf16 matmul peak for MFU (default: measured, 8192^3 on GPU)"
    )
    parser.add_argument(
        "--tuned-precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast dtype of the tuned mode (auto: bf16 on GPU, fp32 on CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher / student / loss / image size, from the command line or a recipe."""
    setup = {
        "teacher": args.teacher,
        "teacher_kwargs": json.loads(args.teacher_kwargs),
        "student": args.student,
        "student_kwargs": json.loads(args.student_kwargs),
        "loss": args.loss,
        "loss_options": json.loads(args.loss_options),
        "img_size": list(args.img_size) * (3 - len(args.img_size)),
    }
    if len(setup["img_size"]) != 2:
        raise SystemExit(f"--img-size: N or H W, got {args.img_size}")
    if args.recipe:
        from gkd.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        setup.update(
            teacher=recipe.models.teacher.name,
            teacher_kwargs=dict(recipe.models.teacher.kwargs),
            student=recipe.models.student.name,
            student_kwargs=dict(recipe.models.student.kwargs),
            loss=recipe.distill.loss.name,
            loss_options=dict(recipe.distill.loss.options),
            img_size=list(recipe.data.img_size),
        )
    from gkd.compress.losses import loss_needs

    if not loss_needs(setup["loss"]).two_stage:
        raise SystemExit(f"loss {setup['loss']}: stage-1 distillation takes a feature loss (qsd, mse, cwd, ...)")
    if args.tiny:
        setup["teacher_kwargs"] = {**setup["teacher_kwargs"], **TINY_TEACHER}
        setup["student_kwargs"] = {**setup["student_kwargs"], **TINY_STUDENT}
    return setup


def _max_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run_mode(mode: str, args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """Build the step for ``mode``, warm it up, time ``args.steps`` steps; in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    tuned = mode in ("tuned", "fed", "cached")
    precision = args.tuned_precision if tuned else ("bf16" if mode == "eager-amp" else "fp32")
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    teacher_dtype = torch.bfloat16 if precision == "bf16" and tuned else torch.float32

    size = setup["img_size"]
    objective = build_objective(args, setup, device, teacher_dtype)
    teacher = objective.teacher
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **({"fused": True} if tuned else {}))
    step_fn = torch.compile(objective) if tuned else objective
    fixed_batch = {"image": torch.rand(args.batch_size, 3, *size, device=device)}
    extra: dict[str, Any] = {}
    if mode == "cached":
        next_batch = cached_batches(args, size, objective, device, extra)
    else:
        next_batch = fed_batches(args, size, device) if mode == "fed" else lambda: fixed_batch

    def step() -> torch.Tensor:
        batch = next_batch()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = step_fn(batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    rss_before = _max_rss_mb()
    if cuda:
        sync()
        gpu_before = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    windows, last = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            last = step()
        sync()
        windows.append(time.perf_counter() - start)
    elapsed = statistics.median(windows)
    result = {
        "mode": mode,
        "autocast": precision,
        "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
        "compiled": tuned,
        "fused_adamw": tuned,
        "data": f"loader over {args.data}, workers {args.workers}" if mode in ("fed", "cached") else "a fixed batch",
        **extra,
        "steps": args.steps,
        "repeats": args.repeats,
        "seconds": elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "images_per_s": args.batch_size * args.steps / elapsed,
        "images_per_s_windows": [args.batch_size * args.steps / seconds for seconds in windows],
        "warmup_s": warmup_s,
        "final_loss": float(last.detach().float()) if last is not None else None,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "teacher_params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
    }
    if cuda:
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu_mem_before_steps_mb"] = gpu_before
    else:
        result["peak_rss_mb"] = _max_rss_mb()
        result["rss_before_steps_mb"] = rss_before
    return result


def build_objective(args: argparse.Namespace, setup: dict[str, Any], device, teacher_dtype):
    """The stage-1 objective (frozen teacher, student, loss heads) with seeded random weights, in train mode."""
    import torch

    from gkd.compress.losses import build_loss
    from gkd.compress.objectives import DistillObjective
    from gkd.models.zoo import create_backbone

    torch.manual_seed(args.seed)
    size = setup["img_size"]
    teacher = create_backbone(setup["teacher"], **{**setup["teacher_kwargs"], "img_size": tuple(size)})
    student = create_backbone(setup["student"], **{**setup["student_kwargs"], "img_size": tuple(size)})
    loss = build_loss(setup["loss"], setup["loss_options"], student.embed_dim, teacher.embed_dim)
    return DistillObjective(student, loss, teacher.to(device), teacher_dtype).to(device).train()


def count_step_flops(args: argparse.Namespace, setup: dict[str, Any]) -> int:
    """FLOPs of one training step's forward and backward (eager, float32), by ``torch.utils.flop_counter``;
    in its own process, so no mode's timing or peak memory includes it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    objective = build_objective(args, setup, device, torch.float32)
    size = setup["img_size"]
    batch = {"image": torch.rand(args.batch_size, 3, *size, device=device)}
    counter = FlopCounterMode(display=False)
    with counter:
        objective(batch)["loss"].backward()
    return int(counter.get_total_flops())


def cached_batches(args: argparse.Namespace, size: list[int], objective, device, extra: dict[str, Any]):
    """`fed_batches` over the views of a teacher-output cache built here first (its build time, views and bytes
    per view go into ``extra``); each batch carries the teacher's outputs, so the objective skips the teacher."""
    import tempfile

    from loader_throughput import benchmark_dataset  # beside this script

    from gkd.compress.teacher_cache import TeacherViews, open_or_build

    dataset = benchmark_dataset(args.data, tuple(size), args.data_root, cache=True)
    folder = Path(tempfile.mkdtemp(prefix="teacher_cache_"))
    start = time.perf_counter()
    spec = {"benchmark": "distill_throughput", "seed": args.seed}
    cache = open_or_build(
        folder, spec, dataset, objective.teacher_outputs, args.views, args.cache_dtype, device, args.batch_size
    )
    extra.update(
        cache_build_s=time.perf_counter() - start,
        cache_views=len(dataset) * args.views,
        cache_bytes_per_view=cache.bytes_per_view,
        cache_dtype=args.cache_dtype,
    )
    return fed_batches(args, size, device, TeacherViews(dataset, args.views, cache))


def fed_batches(args: argparse.Namespace, size: list[int], device, dataset=None):
    """A function returning the next batch of the trainer's loader over ``--data`` (or ``dataset``), copied to
    ``device``; every tensor of the batch but the label travels (cached teacher outputs included)."""
    import torch
    from loader_throughput import benchmark_dataset  # beside this script

    from gkd.compress.sampling import ResumableSampler, build_loader
    from gkd.utils.runtime import DistInfo, resolve_num_workers

    dataset = dataset if dataset is not None else benchmark_dataset(args.data, tuple(size), args.data_root, cache=True)
    workers = resolve_num_workers(args.workers if args.workers == "auto" else int(args.workers), device)
    sampler = ResumableSampler(len(dataset), seed=args.seed, info=DistInfo())
    loader = build_loader(dataset, args.batch_size, sampler, workers, device, args.seed)
    state = {"iterator": iter(loader)}

    def next_batch() -> dict:
        try:
            batch = next(state["iterator"])
        except StopIteration:
            sampler.epoch += 1
            state["iterator"] = iter(loader)
            batch = next(state["iterator"])
        tensors = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor) and key != "label"}
        return {key: value.to(device, non_blocking=True) for key, value in tensors.items()}

    print(f"fed: {len(dataset)} {args.data} samples, {workers} loader workers", file=sys.stderr)
    return next_batch


def peak_matmul_tflops(device_name: str) -> float:
    """Measured bf16 matmul rate of the device (8192^3 on GPU, 2048^3 on CPU), TFLOP/s."""
    import torch

    device = torch.device(device_name)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    repeats = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _child(argv: list[str], mode: str) -> dict[str, Any]:
    """Run ``mode`` (or the ``peak`` matmul measurement) in a child process; its last stdout line is JSON."""
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--child-mode", mode],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        raise SystemExit(f"mode {mode} failed (exit {child.returncode})")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = resolve_setup(args)
    if args.child_mode == "peak":
        print(json.dumps({"peak_tflops": peak_matmul_tflops(args.device)}))
        return 0
    if args.child_mode == "flops":
        print(json.dumps({"flops_per_step": count_step_flops(args, setup)}))
        return 0
    if args.child_mode:
        print(json.dumps(run_mode(args.child_mode, args, setup)))
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    results = {}
    for mode in args.modes:
        results[mode] = _child(argv, mode)
        print(
            f"{mode:>9}: {results[mode]['images_per_s']:8.2f} img/s  {results[mode]['step_ms']:9.1f} ms/step  "
            + (
                f"peak GPU {results[mode]['peak_gpu_mem_mb']:.0f} MiB"
                if "peak_gpu_mem_mb" in results[mode]
                else f"peak RSS {results[mode]['peak_rss_mb']:.0f} MiB "
                f"(before steps {results[mode]['rss_before_steps_mb']:.0f} MiB)"
            ),
            flush=True,
        )
    report = {
        "benchmark": "distill_throughput",
        "command": "python benchmarks/distill_throughput.py " + " ".join(argv),
        "setup": {**setup, "batch_size": args.batch_size, "device": args.device, "warmup": args.warmup},
        "environment": environment(args),
        "modes": results,
    }
    flops = _child(argv, "flops")["flops_per_step"]
    peak = args.peak_tflops or _child(argv, "peak")["peak_tflops"]
    report.update(flops_per_step=flops, peak_bf16_matmul_tflops=peak)
    for mode, result in results.items():
        if mode == "cached":  # it skips the teacher's share of the step's FLOPs: no MFU
            continue
        result["tflops_per_s"] = flops * result["steps"] / result["seconds"] / 1e12
        result["mfu"] = result["tflops_per_s"] / peak
        print(f"{mode:>9}: {result['tflops_per_s']:.3g} TFLOP/s = {100 * result['mfu']:.1f}% of {peak:.3g} (bf16 mm)")
    ratios = {
        "tuned/eager": ("tuned", "eager"),
        "tuned/eager-amp": ("tuned", "eager-amp"),
        "fed/tuned": ("fed", "tuned"),
        "cached/fed": ("cached", "fed"),
    }
    report["ratios"] = {
        name: results[a]["images_per_s"] / results[b]["images_per_s"]
        for name, (a, b) in ratios.items()
        if a in results and b in results
    }
    for name, ratio in report["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The parts of one stage-1 step on the CamVid pair, timed apart (eager, one thread): the loader's batch with and
without teacher-cache reads, the step from cached teacher outputs, the step with the live teacher, and the teacher's
forward alone. What `distill_throughput.py --modes fed cached` cannot say: where the step's time goes.

    python benchmarks/distill_step_parts.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import distill_throughput as dt
import torch

ARGS = ["--recipe", "recipes/camvid_day2dusk.yaml", "--device", "cpu", "--batch-size", "8", "--data", "camvid"]
ARGS += ["--data-root", "../shared/data/CamVid", "--workers", "0", "--views", "4"]


def main() -> None:
    torch.set_num_threads(1)
    args = dt.parse_args(ARGS)
    setup = dt.resolve_setup(args)
    device = torch.device("cpu")
    objective = dt.build_objective(args, setup, device, torch.float32)
    extra: dict = {}
    cached = dt.cached_batches(args, setup["img_size"], objective, device, extra)
    print("cache", extra)
    start = time.perf_counter()
    cached_batches = [cached() for _ in range(8)]
    print(f"loader, cached views: {(time.perf_counter() - start) / 8:.3f} s/batch")
    online = dt.fed_batches(args, setup["img_size"], device)
    start = time.perf_counter()
    online_batches = [online() for _ in range(8)]
    print(f"loader, online: {(time.perf_counter() - start) / 8:.3f} s/batch")
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(batch: dict) -> None:
        objective(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    for name, batches in (("cached", cached_batches), ("online", online_batches)):
        step(batches[0])
        start = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        print(f"step, {name}: {(time.perf_counter() - start) / 7:.3f} s")
    with torch.no_grad():
        start = time.perf_counter()
        for batch in online_batches[:4]:
            objective.teacher_outputs(batch["image"])
    print(f"teacher forward: {(time.perf_counter() - start) / 4:.3f} s/batch")


if __name__ == "__main__":
    main()

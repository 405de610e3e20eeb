#!/usr/bin/env bash
# The GPU checks of this project in one script, <= 6 minutes on one H100/H200 (each step has its own time limit,
# and writes its JSON under OUT as it finishes, so a step that runs out of time still leaves the others' figures):
#   1. the embedded default pipeline on cuda to its report (wall time in OUT/default_run_time.json),
#   2. distillation throughput of the F2L pair (DINOv2-L -> DeiT-B, QSD, 512, batch 8): eager fp32, eager-amp
#      (bf16 autocast, no compile), tuned (compile + bf16 + fused AdamW) and fed (tuned, batches from the real loader),
#      with FLOPs per step and MFU against the measured bf16 matmul rate,
#   3. deployed-student latency, ViT-S/16 and ViT-B/16 + UPerNet-256 at 512, batch 1 and 8, every runtime that loads
#      (PyTorch eager fp32/bf16/fp16, CUDA-graph replay, AOTInductor fp32/bf16).
# Usage:  bash benchmarks/gpu_check.sh OUT            (on the GPU machine, from the repository root)
#         bash benchmarks/gpu_check.sh OUT --tiny     (CPU smoke test of the same steps with tiny models)
# Wheels the GPU machine lacks (pydantic, segmentation-models-pytorch; ../shared/docs/GPU.md) are installed from
# .whl/ when that folder exists.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT [--tiny]}
MODE=${2:-gpu}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gkd-site .whl/*.whl
  export PYTHONPATH="/tmp/gkd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=${PYTHON:-python3}

if [ "$MODE" = "--tiny" ]; then
  DEVICE=cpu
  RUN_ARGS=(run tests/data/tiny_recipe.yaml)
  DISTILL_ARGS=(--tiny --img-size 112 --batch-size 4 --steps 3 --warmup 1 --workers 1)
  LATENCY_S=(--arch deit_small --timm-kwargs '{"embed_dim": 64, "depth": 4, "num_heads": 2}' --channels 32)
  LATENCY_B=(--arch deit_base --timm-kwargs '{"embed_dim": 96, "depth": 4, "num_heads": 2}' --channels 32)
  LATENCY_COMMON=(--img-size 64 --batch-sizes 1 2 --iterations 5 --warmup 1 --warmup-seconds 0)
  LIMITS=(600 900 300 300)
else
  DEVICE=cuda
  RUN_ARGS=(run)
  DISTILL_ARGS=(--teacher dinov2_vitl14 --student deit_base --loss qsd --img-size 512 --batch-size 8 --steps 10
                --warmup 3 --workers auto)
  LATENCY_S=(--arch deit_small --channels 256 --aoti-precisions fp32 bf16)
  LATENCY_B=(--arch deit_base --channels 256 --aoti-precisions bf16)
  LATENCY_COMMON=(--img-size 512 --batch-sizes 1 8 --iterations 50 --warmup 10)
  LIMITS=(110 120 70 60)
fi

declare -A STATUS
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep its log and exit code
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  STATUS[$name]="{\"exit\": $?, \"seconds\": $((SECONDS - start))}"
  tail -n 15 "$OUT/$name.log"
}

start=$SECONDS
step default_run "${LIMITS[0]}" $PY -m gkd.cli "${RUN_ARGS[@]}" --device "$DEVICE" --out "$OUT/default_run"
echo "{\"device\": \"$DEVICE\", \"wall_s\": $((SECONDS - start))}" > "$OUT/default_run_time.json"
step distill_f2l "${LIMITS[1]}" $PY benchmarks/distill_throughput.py "${DISTILL_ARGS[@]}" --device "$DEVICE" \
  --modes eager eager-amp tuned fed --out "$OUT/distill_f2l.json"
step latency_vits "${LIMITS[2]}" $PY benchmarks/latency.py "${LATENCY_S[@]}" "${LATENCY_COMMON[@]}" \
  --precisions fp32 --device "$DEVICE" --out "$OUT/latency_vits.json"
step latency_vitb "${LIMITS[3]}" $PY benchmarks/latency.py "${LATENCY_B[@]}" "${LATENCY_COMMON[@]}" \
  --precisions fp32 --device "$DEVICE" --out "$OUT/latency_vitb.json"
{
  echo "{"
  first=1
  for name in default_run distill_f2l latency_vits latency_vitb; do
    [ $first = 1 ] || echo ","
    first=0
    printf '  "%s": %s' "$name" "${STATUS[$name]:-null}"
  done
  printf ',\n  "total_seconds": %d\n}\n' $((SECONDS - start))
} > "$OUT/status.json"
cat "$OUT/status.json"

#!/usr/bin/env bash
# The GPU checks of this project in one script, <= 9 minutes on one H100/H200 (each step has its own time limit,
# and writes its JSON under OUT as it finishes, so a step that runs out of time still leaves the others' figures):
#   1. the embedded default pipeline on cuda to its report (wall time in OUT/default_run_time.json),
#   2. deployed-student latency at 512, batch 1 and 8, of ViT-S/16 and ViT-B/16 with UPerNet-256 and with the
#      paper's Mask2Former (256): PyTorch eager fp32/bf16/fp16 and their CUDA-graph replay (no export: seconds),
#   3. distillation throughput of the F2L pair (DINOv2-L -> DeiT-B, QSD, 512, batch 8): eager fp32, eager-amp
#      (bf16 autocast, no compile), tuned (compile + bf16 + fused AdamW) and fed (tuned, batches from the real loader),
#      with FLOPs per step and MFU against the measured bf16 matmul rate,
#   4. AOTInductor packages of the ViT-S students (UPerNet fp32/bf16, Mask2Former bf16), timed as such and as
#      CUDA graphs; last, because compiling them takes the longest.
# Usage:  bash benchmarks/gpu_check.sh OUT            (on the GPU machine, from the repository root)
#         bash benchmarks/gpu_check.sh OUT --tiny     (CPU smoke test of the same steps with tiny models)
# Wheels the GPU machine lacks (pydantic, segmentation-models-pytorch, transformers for Mask2Former;
# ../shared/docs/GPU.md, Python 3.12 there) are installed from .whl/ when that folder exists (not with --tiny: the
# CPU machine has them installed).
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT [--tiny]}
MODE=${2:-gpu}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ "$MODE" != "--tiny" ] && [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
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
  VIT_S=(--arch deit_small --timm-kwargs '{"embed_dim": 64, "depth": 4, "num_heads": 2}' --channels 32)
  VIT_B=(--arch deit_base --timm-kwargs '{"embed_dim": 96, "depth": 4, "num_heads": 2}' --channels 32)
  LATENCY_COMMON=(--img-size 64 --batch-sizes 1 2 --iterations 5 --warmup 1 --warmup-seconds 0 --device cpu)
  AOTI_UPER=(fp32)
  AOTI_M2F=(fp32)
  LIMITS=(600 300 900 600)  # default run, each latency step, distillation, each AOTInductor step
else
  DEVICE=cuda
  RUN_ARGS=(run)
  DISTILL_ARGS=(--teacher dinov2_vitl14 --student deit_base --loss qsd --img-size 512 --batch-size 8 --steps 10
                --warmup 3 --workers auto)
  VIT_S=(--arch deit_small --channels 256)
  VIT_B=(--arch deit_base --channels 256)
  LATENCY_COMMON=(--img-size 512 --batch-sizes 1 8 --iterations 50 --warmup 10 --device cuda)
  AOTI_UPER=(fp32 bf16)
  AOTI_M2F=(bf16)
  LIMITS=(110 45 110 80)
fi
EAGER=(--runtimes torch torch-cudagraph --precisions fp32)
AOTI=(--runtimes aoti aoti-cudagraph --precisions fp32)
STEPS=(default_run latency_vits latency_vitb latency_vits_m2f latency_vitb_m2f distill_f2l aoti_vits aoti_vits_m2f)

declare -A STATUS
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep its log and exit code
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  STATUS[$name]="{\"exit\": $?, \"seconds\": $((SECONDS - start))}"
  tail -n 15 "$OUT/$name.log"
}
latency() {  # latency NAME LIMIT_S ARGS...: benchmarks/latency.py ARGS at the common sizes, JSON in OUT/NAME.json
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" $PY benchmarks/latency.py "$@" "${LATENCY_COMMON[@]}" --out "$OUT/$name.json"
}

start=$SECONDS
step default_run "${LIMITS[0]}" $PY -m gkd.cli "${RUN_ARGS[@]}" --device "$DEVICE" --out "$OUT/default_run"
echo "{\"device\": \"$DEVICE\", \"wall_s\": $((SECONDS - start))}" > "$OUT/default_run_time.json"
latency latency_vits "${LIMITS[1]}" "${VIT_S[@]}" --decoder uper "${EAGER[@]}"
latency latency_vitb "${LIMITS[1]}" "${VIT_B[@]}" --decoder uper "${EAGER[@]}"
latency latency_vits_m2f "${LIMITS[1]}" "${VIT_S[@]}" --decoder mask2former "${EAGER[@]}"
latency latency_vitb_m2f "${LIMITS[1]}" "${VIT_B[@]}" --decoder mask2former "${EAGER[@]}"
step distill_f2l "${LIMITS[2]}" $PY benchmarks/distill_throughput.py "${DISTILL_ARGS[@]}" --device "$DEVICE" \
  --modes eager eager-amp tuned fed --out "$OUT/distill_f2l.json"
latency aoti_vits "${LIMITS[3]}" "${VIT_S[@]}" --decoder uper "${AOTI[@]}" --aoti-precisions "${AOTI_UPER[@]}"
latency aoti_vits_m2f "${LIMITS[3]}" "${VIT_S[@]}" --decoder mask2former "${AOTI[@]}" --aoti-precisions "${AOTI_M2F[@]}"
{
  echo "{"
  for name in "${STEPS[@]}"; do
    printf '  "%s": %s,\n' "$name" "${STATUS[$name]:-null}"
  done
  printf '  "total_seconds": %d\n}\n' $((SECONDS - start))
} > "$OUT/status.json"
cat "$OUT/status.json"

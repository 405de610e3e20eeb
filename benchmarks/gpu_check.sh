#!/usr/bin/env bash
# The GPU checks of this project in one script. Each step has its own time limit and writes its log (and JSON)
# under OUT as it finishes, so a step that runs out of time still leaves the others' figures:
#   default_run        the embedded default pipeline on cuda to its report (wall time in OUT/default_run_time.json),
#   latency_vits, latency_vitb, latency_vits_m2f, latency_vitb_m2f
#                      deployed-student latency at 512, batch 1 and 8, of ViT-S/16 and ViT-B/16 with UPerNet-256
#                      and with the paper's Mask2Former (256): PyTorch eager fp32/bf16/fp16 and their CUDA-graph
#                      replay (no export: ~30 s each on an H100),
#   distill_f2l        distillation throughput of the F2L pair (DINOv2-L -> DeiT-B, QSD, 512, batch 8): eager fp32,
#                      eager-amp (bf16 autocast, no compile), tuned (compile + bf16 + fused AdamW) and fed (tuned,
#                      batches from the real loader), with FLOPs per step and MFU against the measured bf16 matmul rate,
#   aoti_vits, aoti_vits_m2f
#                      AOTInductor packages of the ViT-S students (UPerNet fp32/bf16, Mask2Former bf16), timed as
#                      such and as CUDA graphs; last, because compiling them takes the longest.
# Every step at its limit adds up to ~19 minutes, more than one 15-minute device lease (machine start included):
# pick the steps a lease has room for with --only (benchmarks/RESULTS.md, "GPU checks", says what is measured).
# Usage:  bash benchmarks/gpu_check.sh OUT [--only STEP...]          (GPU machine, from the repository root)
#         bash benchmarks/gpu_check.sh OUT --tiny [--only STEP...]   (CPU smoke test of the same steps, tiny models)
# Wheels the GPU machine lacks (pydantic, segmentation-models-pytorch, adjustText, and transformers with its
# dependencies for Mask2Former; ../shared/docs/GPU.md, Python 3.12 there) are installed from .whl/ when that folder
# exists (not with --tiny: the CPU machine has them); a missing import stops the script before any step runs.
# The wheels of the 2026-11-26 run (28 MB, carried with `carry: [".whl"]`), downloaded on the CPU machine:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection typing_extensions segmentation-models-pytorch==0.6.0 \
#     adjustText transformers==5.24.0 huggingface_hub tokenizers hf_xet regex typer click shellingham rich pygments \
#     markdown-it-py mdurl annotated-doc httpx2 httpcore2 h11 anyio idna truststore
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT [--tiny] [--only STEP...]}
shift
MODE=gpu
ONLY=()
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) MODE=--tiny ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do ONLY+=("$1"); shift; done; continue ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ "$MODE" != "--tiny" ] && [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gkd-site .whl/*.whl 2>&1 | grep -v "already exists"
  export PYTHONPATH="/tmp/gkd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=${PYTHON:-python3}
$PY -c "import adjustText, pydantic, segmentation_models_pytorch, transformers, gkd.models.mask2former" \
  || { echo "gpu_check.sh: a module above is missing: bring its wheel in .whl/ (../shared/docs/GPU.md)" >&2; exit 3; }

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
  LIMITS=(200 45 300 240)  # H100, 2026-11-26: 141 s, 20-32 s, > 111 s (tuned not reached), > 83 s
fi
EAGER=(--runtimes torch torch-cudagraph --precisions fp32)
AOTI=(--runtimes aoti aoti-cudagraph --precisions fp32)
STEPS=(default_run latency_vits latency_vitb latency_vits_m2f latency_vitb_m2f distill_f2l aoti_vits aoti_vits_m2f)
for name in "${ONLY[@]}"; do
  [[ " ${STEPS[*]} " == *" $name "* ]] || { echo "gpu_check.sh: no step $name (steps: ${STEPS[*]})" >&2; exit 2; }
done

declare -A STATUS
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep its log and exit code (unless --only skips it)
  local name=$1 limit=$2; shift 2
  [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $name "* ]] || return 0
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
[ -z "${STATUS[default_run]:-}" ] || echo "{\"device\": \"$DEVICE\", \"wall_s\": $((SECONDS - start))}" \
  > "$OUT/default_run_time.json"
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

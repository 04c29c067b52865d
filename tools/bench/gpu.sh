#!/usr/bin/env bash
# SDXL on the GPU machine, ours beside diffusers in one run: seconds per 1024² image (30 steps,
# batch 1, CFG 5, Euler), then the same with two LoRAs under merge and under klora; the UNet's FLOPs
# per step and the floor they set at the measured fp16 matmul rate; and our CUDA kernel tests and
# kernel timings. Rows marked "candle paths" run with LORAMIX_FUSED_KERNELS=0: the same build with
# our kernels switched off, so the table shows what they are worth end to end.
#
#   here:             bash tools/cuda/build.sh          (makes .gpu/loramix.gz, .gpu/kernel-tests.gz)
#                     python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers
#   on the GPU box:   bash tools/bench/gpu.sh           (prints the table for BENCHMARKS.md)
#   on a CPU, to check the script itself:  bash tools/bench/gpu.sh --small
#
# The weights are random (tools/bench/gpu_side.py make; speed does not depend on their values), made
# on the machine, so nothing large travels. diffusers (pure Python) is installed from .whl/ when the
# machine's Python lacks it; the CUDA libraries are the ones the machine's PyTorch ships.
set -euo pipefail
cd "$(dirname "$0")/../.."
small=0
[ "${1:-}" = "--small" ] && small=1
PY=${PYTHON:-python3}
work=${GPU_BENCH_DIR:-/tmp/loramix-gpu-bench}
mkdir -p "$work"

if [ "$small" = 1 ]; then
  size=small; px=256; steps=3; count=3; device=cpu; dtype=f32
  bin=${LORAMIX_BIN:-target/release/loramix}
else
  size=full; px=1024; steps=30; count=${GPU_BENCH_COUNT:-3}; device=cuda; dtype=f16
  # The CUDA 13 libraries the binary needs, from the machine's PyTorch wheels.
  lib=$("$PY" -c "import nvidia, os; print(nvidia.__path__[0])" 2>/dev/null || true)
  for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
    found=$([ -n "$lib" ] && find "$lib" -name "$so" -print -quit 2>/dev/null || true)
    [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
  done
  bin=$work/loramix
  gzip -dc .gpu/loramix.gz > "$bin" && chmod +x "$bin"
  ldd "$bin" | grep "not found" && { echo "missing libraries for $bin (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target "$work/site" .whl/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# Kernel tests first: a wrong kernel makes every timing below meaningless.
if [ "$small" = 0 ] && [ -f .gpu/kernel-tests.gz ]; then
  gzip -dc .gpu/kernel-tests.gz > "$work/kernel-tests" && chmod +x "$work/kernel-tests"
  "$work/kernel-tests" --include-ignored --nocapture 2>&1 | grep -E "rel L2|^test |test result|panicked" \
    || echo "KERNEL TESTS FAILED: the rows below that use our kernels are not valid"
fi
if [ "$small" = 0 ] && [ -f .gpu/kernel-bench.gz ]; then
  gzip -dc .gpu/kernel-bench.gz > "$work/kernel-bench" && chmod +x "$work/kernel-bench"
  echo
  "$work/kernel-bench"
fi

model=$work/sdxl-$size
"$PY" tools/bench/gpu_side.py make "$model" --size "$size" | tail -1
loras=(--lora "$model/loras/subject.safetensors" --lora "$model/loras/style.safetensors")

# Ours: --batch-count runs `count` images in one process; the first is the warm-up (module loads,
# cuBLAS handles), the rest are timed per image (text encoding, denoising, VAE decode: what a
# diffusers pipeline call covers).
ours() {
  local tag=$1
  shift
  "$bin" generate --model "$model" --prompt "a photo" --steps "$steps" --cfg 5 --sampler euler --seed 0 \
    --width "$px" --height "$px" --device "$device" --dtype "$dtype" --batch-count "$count" --out "$work/out" "$@" \
    >/dev/null 2>"$work/ours-$tag.log" || { echo "ours ($tag) failed:" >&2; tail -5 "$work/ours-$tag.log" >&2; }
  awk '/^batch [0-9]+\/[0-9]+: / { n++; if (n > 1) { sub("s$", "", $3); print $3 } }' "$work/ours-$tag.log" | sort -g \
    | awk '{ t[++m] = $1 } END { if (m == 0) print "nan"; else print t[int((m + 1) / 2)] }'
}
theirs() {
  "$PY" tools/bench/gpu_side.py diffusers "$model" --steps "$steps" --cfg 5 --height "$px" --width "$px" --iters $((count - 1)) "$@" 2>>"$work/diffusers.log" \
    | tail -1 | tee -a "$work/diffusers.jsonl" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['seconds_per_image'])" || echo nan
}

flops=$("$PY" tools/bench/gpu_side.py flops "$model" --height "$px" --width "$px" 2>/dev/null | tail -1)
read -r step_flops rate floor < <(echo "$flops" | "$PY" -c "import json, sys; d = json.load(sys.stdin); print(d['unet_flops_per_step'], d['matmul_flops_per_second'], d['floor_seconds_per_step'])")

echo
echo "| ${px}², $steps steps, batch 1, CFG 5 ($dtype) | ours (s/image) | diffusers (s/image) | diffusers / ours |"
echo "|---|---|---|---|"
plain_theirs=""
for row in ${GPU_BENCH_ROWS:-plain plain-candle merge klora klora-candle}; do
  case $row in
    plain) o=$(ours plain); t=$(theirs); plain_theirs=$t; label="plain" ;;
    plain-candle) o=$(LORAMIX_FUSED_KERNELS=0 ours plain-candle); t=$plain_theirs; label="plain, candle paths" ;;
    merge) o=$(ours merge "${loras[@]}" --mix merge); t=$(theirs --lora "$model/loras/subject.safetensors" --lora "$model/loras/style.safetensors"); label="2 LoRAs, merge (diffusers: fuse_lora)" ;;
    klora) o=$(ours klora "${loras[@]}" --mix klora); t=""; label="2 LoRAs, klora (diffusers has no K-LoRA)" ;;
    klora-candle) o=$(LORAMIX_FUSED_KERNELS=0 ours klora-candle "${loras[@]}" --mix klora); t=""; label="2 LoRAs, klora, candle paths" ;;
  esac
  if [ -n "$t" ]; then
    echo "| $label | $(printf "%.3f" "$o") | $(printf "%.3f" "$t") | $(awk -v a="$t" -v b="$o" 'BEGIN { printf "%.2f", a / b }') |"
  else
    echo "| $label | $(printf "%.3f" "$o") | — | — |"
  fi
done
echo
awk -v f="$step_flops" -v r="$rate" -v fl="$floor" -v s="$steps" 'BEGIN {
  printf "UNet: %.1f TFLOP per step (CFG batch of 2); measured fp16 matmul rate %.0f TFLOP/s; floor %.3f s per step, %.2f s per image (%d steps)\n", f / 1e12, r / 1e12, fl, fl * s, s }'

# GPU_BENCH_PROFILE=1: one denoising step (plus text encoding and VAE decode) under Nsight Compute,
# GPU time per kernel name, largest first: where our time goes.
if [ "${GPU_BENCH_PROFILE:-0}" = 1 ] && [ "$small" = 0 ]; then
  timeout "${GPU_BENCH_PROFILE_TIMEOUT:-240}" ncu --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
    "$bin" generate --model "$model" --prompt "a photo" --steps 1 --cfg 5 --sampler euler --seed 0 \
    --width "$px" --height "$px" --device "$device" --dtype "$dtype" --out "$work/prof" ${GPU_BENCH_PROFILE_ARGS:-} \
    >"$work/ncu.csv" 2>"$work/ncu.log" || { echo "ncu failed:"; tail -5 "$work/ncu.log"; }
  echo
  "$PY" tools/bench/gpu_side.py ncu-summary "$work/ncu.csv" || true
fi

#!/usr/bin/env bash
# SDXL on the GPU machine, ours beside diffusers in one run: seconds per 1024² image (30 steps,
# batch 1, CFG 5, Euler), with the VAE decode in bf16 or TF32 (and its error against f32), then the
# same with two LoRAs under merge, klora and auto, and the low-VRAM modes (ours --low-memory;
# diffusers' model offload); each row's VRAM peak; the UNet's FLOPs
# per step and the floor they set at the measured fp16 matmul rate; and our CUDA kernel tests and
# kernel timings. Rows marked "candle paths" run with LORAMIX_FUSED_KERNELS=0: the same build with
# our kernels switched off, so the table shows what they are worth end to end.
#
#   here:             bash tools/cuda/build.sh          (makes .gpu/loramix.gz, .gpu/kernel-tests.gz)
#                     python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers accelerate
#   on the GPU box:   bash tools/bench/gpu.sh           (prints the table for BENCHMARKS.md)
#   on a CPU, to check the script itself:  bash tools/bench/gpu.sh --small
#
# Under a short device lease (the device tool's 10 minutes per command), split the rows over two
# calls on the same warm machine, carrying .gpu and .whl, GPU_BENCH_DIR kept between them (the
# random model is made once, and the rows after `plain` compare with its images):
#   GPU_BENCH_DIR=/tmp/gb GPU_BENCH_ROWS="plain vae-bf16 tf32 lowvram" bash tools/bench/gpu.sh
#   GPU_BENCH_DIR=/tmp/gb GPU_BENCH_ROWS="merge klora auto" bash tools/bench/gpu.sh
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
if ! "$PY" -c "import diffusers, accelerate" 2>/dev/null; then
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

# VRAM: nvidia-smi samples the device's used memory every 50 ms while a run goes; the peak less
# the reading just before the run is what it needed, its CUDA context included on both sides (a
# figure from inside either process would leave out different things). Written to
# $work/vram-TAG, read by the table; "—" on a CPU.
vram_start() {
  rm -f "$work/vram-$1"
  [ "$small" = 1 ] && return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 > "$work/vram-$1.base"
  # Line-buffered: nvidia-smi's stdio would otherwise hold the samples when it is killed.
  stdbuf -oL nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 50 > "$work/vram-$1.samples" &
  vram_pid=$!
}
vram_stop() {
  [ "$small" = 1 ] && return 0
  kill "$vram_pid" 2>/dev/null || true
  wait "$vram_pid" 2>/dev/null || true
  awk -v base="$(head -1 "$work/vram-$1.base")" '$1 + 0 > m { m = $1 + 0 } END { if (NR == 0) print "— (no samples)"; else printf "%.2f\n", (m - base) / 1024 }' \
    "$work/vram-$1.samples" > "$work/vram-$1"
}
vram() { cat "$work/vram-$1" 2>/dev/null || echo "—"; }

# Ours: --batch-count runs `count` images in one process; the first is the warm-up (module loads,
# cuBLAS handles), the rest are timed per image (text encoding, denoising, VAE decode: what a
# diffusers pipeline call covers). ours_count=1 runs one image, timed as it is (warm-up included).
ours() {
  local tag=$1 n=${ours_count:-$count}
  shift
  vram_start "ours-$tag"
  rm -rf "$work/out-$tag"
  "$bin" generate --model "$model" --prompt "a photo" --steps "$steps" --cfg 5 --sampler euler --seed 0 \
    --width "$px" --height "$px" --device "$device" --dtype "$dtype" --batch-count "$n" --out "$work/out-$tag" "$@" \
    >/dev/null 2>"$work/ours-$tag.log" || { echo "ours ($tag) failed:" >&2; tail -5 "$work/ours-$tag.log" >&2; }
  vram_stop "ours-$tag"
  awk -v n="$n" '/^batch [0-9]+\/[0-9]+: / { k++; if (k > 1 || n == 1) { sub("s$", "", $3); print $3 } }' "$work/ours-$tag.log" | sort -g \
    | awk '{ t[++m] = $1 } END { if (m == 0) print "nan"; else print t[int((m + 1) / 2)] }'
}
theirs() {
  local tag=$1
  shift
  vram_start "theirs-$tag"
  "$PY" tools/bench/gpu_side.py diffusers "$model" --steps "$steps" --cfg 5 --height "$px" --width "$px" --iters $((count - 1)) "$@" 2>>"$work/diffusers.log" \
    | tail -1 | tee -a "$work/diffusers.jsonl" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['seconds_per_image'])" 2>/dev/null || echo nan
  vram_stop "theirs-$tag"
}

flops=$("$PY" tools/bench/gpu_side.py flops "$model" --height "$px" --width "$px" 2>/dev/null | tail -1)
read -r step_flops rate floor < <(echo "$flops" | "$PY" -c "import json, sys; d = json.load(sys.stdin); print(d['unet_flops_per_step'], d['matmul_flops_per_second'], d['floor_seconds_per_step'])")

echo
echo "| ${px}², $steps steps, batch 1, CFG 5 ($dtype) | ours (s/image) | diffusers (s/image) | diffusers / ours | ours VRAM peak (GiB) | diffusers VRAM peak (GiB) |"
echo "|---|---|---|---|---|---|"
for row in ${GPU_BENCH_ROWS:-plain plain-candle vae-bf16 tf32 merge klora klora-candle auto lowvram}; do
  t=""; their_tag=""
  case $row in
    plain) o=$(ours plain); t=$(theirs plain); their_tag=plain; label="plain" ;;
    plain-candle) o=$(LORAMIX_FUSED_KERNELS=0 ours plain-candle); t=$(cat "$work/theirs-plain.s" 2>/dev/null || true); their_tag=plain; label="plain, candle paths" ;;
    merge) o=$(ours merge "${loras[@]}" --mix merge); t=$(theirs merge "${loras[@]}"); their_tag=merge; label="2 LoRAs, merge (diffusers: fuse_lora)" ;;
    klora) o=$(ours klora "${loras[@]}" --mix klora); label="2 LoRAs, klora (diffusers has no K-LoRA)" ;;
    klora-candle) o=$(LORAMIX_FUSED_KERNELS=0 ours klora-candle "${loras[@]}" --mix klora); label="2 LoRAs, klora, candle paths" ;;
    auto) o=$(ours auto "${loras[@]}" --mix auto); label="2 LoRAs, auto (per step and layer; diffusers has none)" ;;
    # The VAE decode in reduced precision (f32 by default for SDXL's VAE, as in diffusers), with
    # its error against the plain row's images of the same seeds.
    vae-bf16|tf32)
      # On a CPU (--small) there is neither bf16 nor TF32: f16 stands in, to check the row.
      low=$([ "$small" = 1 ] && echo f16 || echo bf16)
      [ "$row" = tf32 ] && [ "$small" = 1 ] && continue
      if [ "$row" = vae-bf16 ]; then o=$(ours vae-bf16 --vae-dtype "$low"); else o=$(ours tf32 --tf32); fi
      t=$(cat "$work/theirs-plain.s" 2>/dev/null || true); their_tag=plain
      cmp=$("$PY" tools/bench/gpu_side.py compare "$work/out-plain" "$work/out-$row" 2>&1 | tail -1 || true)
      err=$(echo "$cmp" | "$PY" -c "import json, sys; d = json.load(sys.stdin); print(f\"worst PSNR {d['worst_psnr_db']:.1f} dB, mean {d['mean_abs_levels']:.2f} / max {d['max_abs_levels']} levels\")" 2>/dev/null \
        || echo "error not measured: $cmp")
      label="plain, VAE decode $([ "$row" = vae-bf16 ] && echo "in $low (--vae-dtype $low)" || echo "with TF32 (--tf32)") vs f32: $err" ;;
    # Low VRAM: a one-shot --low-memory run holds one model on the device at a time (encoders,
    # then the UNet, then the VAE in 512-pixel tiles), so it runs one image: its peak is the figure
    # for an 8 GB card, its time includes the warm-up. diffusers' nearest recipe is model offload
    # with 512-pixel VAE tiles, timed after a warm-up (it moves every model per image).
    lowvram) o=$(ours_count=1 ours lowvram --low-memory); t=$(theirs lowvram --offload model --vae-tiling); their_tag=lowvram
      label="low VRAM, 1 image: ours --low-memory (one model on the GPU at a time; first image, warm-up included); diffusers enable_model_cpu_offload + 512-px VAE tiles" ;;
    *) echo "unknown row $row; expected plain, plain-candle, vae-bf16, tf32, merge, klora, klora-candle, auto or lowvram" >&2; exit 2 ;;
  esac
  [ "$row" = plain ] && echo "$t" > "$work/theirs-plain.s"
  their_vram=$([ -n "$their_tag" ] && vram "theirs-$their_tag" || echo "—")
  if [ -n "$t" ]; then
    echo "| $label | $(printf "%.3f" "$o") | $(printf "%.3f" "$t") | $(awk -v a="$t" -v b="$o" 'BEGIN { printf "%.2f", a / b }') | $(vram "ours-$row") | $their_vram |"
  else
    echo "| $label | $(printf "%.3f" "$o") | — | — | $(vram "ours-$row") | — |"
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

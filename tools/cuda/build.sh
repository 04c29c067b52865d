#!/usr/bin/env bash
# Builds LoRAMix with the `cuda` feature on a machine without a GPU (so the CUDA code never rots)
# and packs what the GPU machine runs into .gpu/:
#   .gpu/loramix.gz              the CLI (release, CUDA)
#   .gpu/kernel-tests.gz         the kernels crate's tests (our CUDA kernels vs their references)
#   .gpu/kernel-bench.gz         our kernels vs the candle paths they replace, at SDXL shapes
#
#   bash tools/cuda/build.sh             # ~15 min on 2 cores the first time (candle's CUDA kernels)
#
# The toolchain (nvcc 13.0 and the CUDA 13.0 libraries from PyPI wheels) is installed by
# tools/cuda/toolchain.sh into ~/.cache/loramix-cuda13 on first use. The build has its own target
# folder (target/cuda) so it does not invalidate the CPU build.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(bash tools/cuda/toolchain.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --locked --features cuda --bin loramix
cargo build --release --locked -p loramix-kernels --features cuda --example kernel_bench
cargo test --release --locked -p loramix-kernels --features cuda --no-run 2>&1 | tee target/cuda/kernel-tests.log
tests_bin=$(grep -oE 'target/cuda/release/deps/fused-[0-9a-f]+' target/cuda/kernel-tests.log | tail -1)
mkdir -p .gpu
gzip -c "$CARGO_TARGET_DIR/release/loramix" > .gpu/loramix.gz
gzip -c "$tests_bin" > .gpu/kernel-tests.gz
gzip -c "$CARGO_TARGET_DIR/release/examples/kernel_bench" > .gpu/kernel-bench.gz
ls -la .gpu
echo "built: run tools/bench/gpu.sh on the GPU machine (it reads .gpu/)"

#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain from PyPI wheels into a cache folder and prints the
# environment for `cargo build --features cuda`: nvcc, the CUDA runtime/cuBLAS/cuRAND/NVRTC
# libraries to link against, and a stub of the driver library (libcuda.so.1), which a machine
# without an NVIDIA driver lacks (the real one is found on the GPU machine at run time).
#
#   eval "$(bash tools/cuda/toolchain.sh [DIR])"      # DIR defaults to ~/.cache/loramix-cuda13
#
# CUDA 13.0 exactly: the GPU test machine's driver (580) rejects PTX from a newer nvcc.
# Needs python3 with pip (wheels are zip files; nothing is installed into any Python).
set -euo pipefail
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/loramix-cuda13}
ROOT=$DIR/x/nvidia/cu13
WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.5.25
)
if [ ! -x "$ROOT/bin/nvcc" ] || [ ! -f "$DIR/lib/libcuda.so" ]; then
  mkdir -p "$DIR/whl" "$DIR/lib"
  python3 -m pip download --quiet --no-deps --dest "$DIR/whl" "${WHEELS[@]}" >&2
  for w in "$DIR"/whl/*.whl; do python3 -m zipfile -e "$w" "$DIR/x" >&2; done
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true
  # The linker wants unversioned names.
  for l in cublas cublasLt cudart nvrtc; do ln -sf "$ROOT/lib/lib$l.so.13" "$DIR/lib/lib$l.so"; done
  ln -sf "$ROOT/lib/libcurand.so.10" "$DIR/lib/libcurand.so"
  # Driver stub: every cu* entry point declared in cuda.h, as an empty function, under the
  # driver library's soname.
  printf '#include <cuda.h>\n' > "$DIR/stub.c"
  gcc -E -I"$ROOT/include" "$DIR/stub.c" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*(//' | sort -u \
    | awk '{ print "void " $1 "(void) {}" }' > "$DIR/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DIR/lib/libcuda.so" "$DIR/libcuda_stub.c"
fi
cat <<ENV
export PATH="$ROOT/bin:\$PATH" CUDA_HOME="$ROOT" CUDA_PATH="$ROOT" CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export RUSTFLAGS="\${RUSTFLAGS:-} -L $DIR/lib"
ENV

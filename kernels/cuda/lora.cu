// The low-rank branch of every active LoRA of one layer in one launch:
//   out[m, n] += sum_r (sum_k x[m, k] * a[r, k]) * scale[r] * b[n, r]
// where a stacks the LoRAs' down matrices ([r_total, k]), b their up matrices side by side
// ([n, r_total]) and scale[r] is the weight of the LoRA that row r belongs to (strength · alpha / rank;
// 0 switches a LoRA off without re-stacking). x: [m, k], out: [m, n]; all row-major, contiguous.
//
// Launch: grid (ceil(m / ROWS)), block THREADS threads, dynamic shared memory ROWS * r_total floats.
// Phase 1 puts the block's ROWS × r_total low-rank activations in shared memory; phase 2 expands
// them through b into the block's output rows. The [m, r_total] intermediate never leaves the chip.
#include "dtype.cuh"

#define ROWS 16
#define THREADS 256

template <typename T>
__device__ void lora_branch(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                            const float* __restrict__ scale, T* __restrict__ out, int m, int k, int n, int r_total) {
    extern __shared__ float low[];  // [ROWS][r_total]
    const int row0 = blockIdx.x * ROWS;
    const int rows = min(ROWS, m - row0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = THREADS / 32;

    // Phase 1: one warp per (row, r) dot product over k, lanes striding k.
    for (int idx = warp; idx < rows * r_total; idx += warps) {
        const int i = idx / r_total, r = idx % r_total;
        const T* xr = x + (size_t)(row0 + i) * k;
        const T* ar = a + (size_t)r * k;
        float s = 0.f;
        for (int c = lane; c < k; c += 32) s = fmaf(to_f32(xr[c]), to_f32(ar[c]), s);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) low[i * r_total + r] = s * scale[r];
    }
    __syncthreads();

    // Phase 2: each thread owns output columns; b's row n is read once per block.
    for (int c = threadIdx.x; c < n; c += THREADS) {
        const T* br = b + (size_t)c * r_total;
        float acc[ROWS];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) acc[i] = 0.f;
        for (int r = 0; r < r_total; ++r) {
            const float bv = to_f32(br[r]);
#pragma unroll
            for (int i = 0; i < ROWS; ++i) acc[i] = fmaf(low[i * r_total + r], bv, acc[i]);
        }
        for (int i = 0; i < rows; ++i) {
            T* o = out + (size_t)(row0 + i) * n + c;
            *o = from_f32<T>(to_f32(*o) + acc[i]);
        }
    }
}

extern "C" __global__ void lora_branch_f32(const float* x, const float* a, const float* b, const float* scale, float* out, int m, int k, int n, int r) {
    lora_branch<float>(x, a, b, scale, out, m, k, n, r);
}
extern "C" __global__ void lora_branch_f16(const __half* x, const __half* a, const __half* b, const float* scale, __half* out, int m, int k, int n, int r) {
    lora_branch<__half>(x, a, b, scale, out, m, k, n, r);
}
extern "C" __global__ void lora_branch_bf16(const __nv_bfloat16* x, const __nv_bfloat16* a, const __nv_bfloat16* b, const float* scale, __nv_bfloat16* out, int m, int k, int n, int r) {
    lora_branch<__nv_bfloat16>(x, a, b, scale, out, m, k, n, r);
}

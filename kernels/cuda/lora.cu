// The low-rank branch of every active LoRA of one layer in one launch:
//   out[m, n] += sum_r (sum_k x[m, k] * a[r, k]) * scale[r] * b[n, r]
// where a stacks the LoRAs' down matrices ([r_total, k]), b their up matrices side by side
// ([n, r_total]) and scale[r] is the weight of the LoRA that row r belongs to (strength · alpha / rank;
// 0 switches a LoRA off without re-stacking). x: [m, k], out: [m, n]; all row-major, contiguous.
//
// Launch: grid (ceil(m / ROWS)), block THREADS threads, dynamic shared memory ROWS * r_total floats
// (r_total ≤ 256 keeps the total under the 48 KiB a kernel gets without opting in).
// Phase 1 puts the block's ROWS × r_total low-rank activations in shared memory: x's rows and a's
// rows are staged through shared memory in chunks of KC columns, each warp owning two rows and
// each lane one rank row, so x is read from memory once per block. Phase 2 expands them through b
// into the block's output rows. The [m, r_total] intermediate never leaves the chip.
#include "dtype.cuh"

#define ROWS 16
#define THREADS 256
#define KC 128

template <typename T>
__device__ void lora_branch(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                            const float* __restrict__ scale, T* __restrict__ out, int m, int k, int n, int r_total) {
    extern __shared__ float low[];  // [ROWS][r_total]
    const int row0 = blockIdx.x * ROWS;
    const int rows = min(ROWS, m - row0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;  // THREADS / 32 = 8 warps, 2 rows each

    // Phase 1, per block of 32 rank rows (one per lane) and chunk of KC columns.
    __shared__ float xs[ROWS][KC];
    __shared__ float as[32][KC + 1];  // +1: lanes reading different rank rows hit different banks
    for (int rb0 = 0; rb0 < r_total; rb0 += 32) {
        const int rbn = min(32, r_total - rb0);
        float acc0 = 0.f, acc1 = 0.f;  // rows 2·warp and 2·warp + 1, rank row rb0 + lane
        for (int c0 = 0; c0 < k; c0 += KC) {
            const int cn = min(KC, k - c0);
            __syncthreads();  // the previous chunk is consumed
            for (int i = threadIdx.x; i < ROWS * KC; i += THREADS) {
                const int rr = i / KC, c = i % KC;
                xs[rr][c] = rr < rows && c < cn ? to_f32(x[(size_t)(row0 + rr) * k + c0 + c]) : 0.f;
            }
            for (int i = threadIdx.x; i < 32 * KC; i += THREADS) {
                const int rr = i / KC, c = i % KC;
                as[rr][c] = rr < rbn && c < cn ? to_f32(a[(size_t)(rb0 + rr) * k + c0 + c]) : 0.f;
            }
            __syncthreads();
#pragma unroll 8
            for (int c = 0; c < KC; ++c) {
                const float av = as[lane][c];
                acc0 = fmaf(xs[2 * warp][c], av, acc0);
                acc1 = fmaf(xs[2 * warp + 1][c], av, acc1);
            }
        }
        if (lane < rbn) {
            low[(2 * warp) * r_total + rb0 + lane] = acc0 * scale[rb0 + lane];
            low[(2 * warp + 1) * r_total + rb0 + lane] = acc1 * scale[rb0 + lane];
        }
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

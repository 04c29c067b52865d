// Fused scaled-dot-product attention, head dim 64, flash-attention style: each thread owns one
// query row and walks the keys in tiles staged through shared memory, keeping a running max, a
// running sum and the output accumulator in f32 registers (online softmax). The [q, k] score
// matrix is never written, and half-precision inputs are never upcast in global memory.
//
// q: [bh, lq, 64], k and v: [bh, lk, 64], out: [bh, lq, 64]; all contiguous, same dtype.
// Launch: grid (ceil(lq / ROWS), bh), block ROWS threads.
#include "dtype.cuh"
#include <stdint.h>

#define HEAD_DIM 64
#define ROWS 128
#define KEY_TILE 64

template <typename T>
__device__ void attention_hd64(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               T* __restrict__ out, int lq, int lk, float scale) {
    __shared__ float ks[KEY_TILE][HEAD_DIM + 1];  // +1: threads reading different keys avoid bank conflicts
    __shared__ float vs[KEY_TILE][HEAD_DIM];
    const int bh = blockIdx.y;
    const int row = blockIdx.x * ROWS + threadIdx.x;
    const bool active = row < lq;
    const T* kb = k + (size_t)bh * lk * HEAD_DIM;
    const T* vb = v + (size_t)bh * lk * HEAD_DIM;

    float qr[HEAD_DIM];
    float acc[HEAD_DIM];
    if (active) {
        const T* qp = q + ((size_t)bh * lq + row) * HEAD_DIM;
#pragma unroll
        for (int d = 0; d < HEAD_DIM; ++d) {
            qr[d] = to_f32(qp[d]) * scale;
            acc[d] = 0.f;
        }
    }
    float m = -INFINITY, l = 0.f;

    for (int start = 0; start < lk; start += KEY_TILE) {
        const int n = min(KEY_TILE, lk - start);
        for (int i = threadIdx.x; i < KEY_TILE * HEAD_DIM; i += ROWS) {
            const int j = i / HEAD_DIM, d = i % HEAD_DIM;
            const bool in = j < n;
            ks[j][d] = in ? to_f32(kb[(size_t)(start + j) * HEAD_DIM + d]) : 0.f;
            vs[j][d] = in ? to_f32(vb[(size_t)(start + j) * HEAD_DIM + d]) : 0.f;
        }
        __syncthreads();
        if (active) {
            for (int j = 0; j < n; ++j) {
                float s = 0.f;
#pragma unroll
                for (int d = 0; d < HEAD_DIM; ++d) s = fmaf(qr[d], ks[j][d], s);
                if (s > m) {
                    // A new maximum: rescale what was accumulated against the old one.
                    const float c = __expf(m - s);
                    l *= c;
#pragma unroll
                    for (int d = 0; d < HEAD_DIM; ++d) acc[d] *= c;
                    m = s;
                }
                const float p = __expf(s - m);
                l += p;
#pragma unroll
                for (int d = 0; d < HEAD_DIM; ++d) acc[d] = fmaf(p, vs[j][d], acc[d]);
            }
        }
        __syncthreads();
    }
    if (active) {
        T* op = out + ((size_t)bh * lq + row) * HEAD_DIM;
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int d = 0; d < HEAD_DIM; ++d) op[d] = from_f32<T>(acc[d] * inv);
    }
}

extern "C" __global__ void attention_hd64_f32(const float* q, const float* k, const float* v, float* out, int lq, int lk, float scale) {
    attention_hd64<float>(q, k, v, out, lq, lk, scale);
}
extern "C" __global__ void attention_hd64_f16(const __half* q, const __half* k, const __half* v, __half* out, int lq, int lk, float scale) {
    attention_hd64<__half>(q, k, v, out, lq, lk, scale);
}
extern "C" __global__ void attention_hd64_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out, int lq, int lk, float scale) {
    attention_hd64<__nv_bfloat16>(q, k, v, out, lq, lk, scale);
}

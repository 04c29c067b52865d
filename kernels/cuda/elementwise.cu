// Memory-bound steps that candle runs as chains of generic (strided, broadcasting) kernels:
//
// - group_norm_reduce_* / group_norm_apply_*: GroupNorm (+ SiLU) in three launches. A group of
//   [n, c, spatial] in NCHW order is one contiguous run of c/groups · spatial elements (a "row"),
//   cut into chunks of GN_CHUNK, one block each (grid (chunks, rows), block GN_THREADS), so that
//   even one sample's 32 groups fill the GPU. Reduce pass 0 writes each chunk's sum; pass 1 the
//   chunk's sum of squares about the row mean (the two reads the reference makes); apply
//   normalises, applies the affine and the optional SiLU and writes the input dtype. f32 inside.
// - bias_add_*: out[i] = y[i] + bias[(i / inner) % c]: a Linear's bias (inner = 1) or a
//   convolution's (inner = spatial size). Launch: grid-stride, any grid.
// - geglu_*: out[r, j] = h[r, j] · gelu_erf(h[r, n + j]) for h: [rows, 2n] in one pass.
//   Launch: grid-stride, any grid.
// - im2col_*: x [b, c, h, w] → cols [b, c·k·k, oh·ow] (zero padding), the layout whose GEMM with
//   the weight [o, c·k·k] is the convolution's output already in NCHW order. One block row per
//   (b, c, ky, kx), threads along output pixels: coalesced writes, and reads along input rows.
//   Launch: grid (ceil(oh·ow / 256) capped, b·c·k·k), block 256.
#include "dtype.cuh"
#include <stdint.h>

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

#define GN_CHUNK 16384
#define GN_THREADS 256

template <typename T>
__device__ void group_norm_reduce(const T* __restrict__ x, const float* __restrict__ sums, float* __restrict__ out,
                                  size_t len, int pass) {
    __shared__ float scratch[32];
    __shared__ float mean_s;
    const int row = blockIdx.y, chunks = gridDim.x;
    const T* xr = x + (size_t)row * len;
    const size_t start = (size_t)blockIdx.x * GN_CHUNK, end = min(len, start + GN_CHUNK);
    float mean = 0.f;
    if (pass == 1) {
        if (threadIdx.x == 0) {
            float s = 0.f;
            for (int k = 0; k < chunks; ++k) s += sums[row * chunks + k];
            mean_s = s / (float)len;
        }
        __syncthreads();
        mean = mean_s;
    }
    float acc = 0.f;
#pragma unroll 8
    for (size_t i = start + threadIdx.x; i < end; i += GN_THREADS) {
        const float d = to_f32(xr[i]) - mean;
        acc += pass == 1 ? d * d : d;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[row * chunks + blockIdx.x] = acc;
}

template <typename T>
__device__ void group_norm_apply(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                                 T* __restrict__ y, const float* __restrict__ sums, const float* __restrict__ sqsums,
                                 size_t len, int hw, int cg, int groups, float eps, int silu) {
    __shared__ float stats[2];
    const int row = blockIdx.y, chunks = gridDim.x, g = row % groups;
    if (threadIdx.x == 0) {
        float s = 0.f, q = 0.f;
        for (int k = 0; k < chunks; ++k) {
            s += sums[row * chunks + k];
            q += sqsums[row * chunks + k];
        }
        stats[0] = s / (float)len;
        stats[1] = 1.f / sqrtf(q / (float)len + eps);
    }
    __syncthreads();
    const float mean = stats[0], inv_std = stats[1];
    const T* xr = x + (size_t)row * len;
    T* yr = y + (size_t)row * len;
    const size_t start = (size_t)blockIdx.x * GN_CHUNK, end = min(len, start + GN_CHUNK);
#pragma unroll 4
    for (size_t i = start + threadIdx.x; i < end; i += GN_THREADS) {
        const int ch = g * cg + (int)(i / hw);
        float val = (to_f32(xr[i]) - mean) * inv_std * w[ch] + b[ch];
        if (silu) val = val / (1.f + __expf(-val));
        yr[i] = from_f32<T>(val);
    }
}

template <typename T>
__device__ void bias_add(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out, size_t total, int inner, int c) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int ch = (int)((inner == 1 ? i : i / inner) % c);
        out[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[ch]));
    }
}

template <typename T>
__device__ void geglu(const T* __restrict__ h, T* __restrict__ out, size_t rows, int n) {
    const size_t total = rows * n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / n;
        const int j = (int)(i % n);
        const float a = to_f32(h[r * 2 * n + j]);
        const float gate = to_f32(h[r * 2 * n + n + j]);
        out[i] = from_f32<T>(a * (0.5f * gate * (1.f + erff(gate * 0.70710678118654752f))));
    }
}

template <typename T>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ cols, int c, int h, int w, int k, int stride, int pad,
                       int oh, int ow) {
    const int r = blockIdx.y;  // ((b·c + ci)·k + ky)·k + kx
    const int kx = r % k, ky = (r / k) % k, plane_index = r / (k * k);
    const T* plane = x + (size_t)plane_index * h * w;
    T* dst = cols + (size_t)r * oh * ow;
    const int pixels = oh * ow;
    const T zero = from_f32<T>(0.f);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < pixels; i += gridDim.x * blockDim.x) {
        const int oy = i / ow, ox = i % ow;
        const int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        dst[i] = iy >= 0 && iy < h && ix >= 0 && ix < w ? plane[(size_t)iy * w + ix] : zero;
    }
}

#define INSTANTIATE(T, S)                                                                                              \
    extern "C" __global__ void __launch_bounds__(GN_THREADS)                                                           \
        group_norm_reduce_##S(const T* x, const float* sums, float* out, size_t len, int pass) {                       \
        group_norm_reduce<T>(x, sums, out, len, pass);                                                                 \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(GN_THREADS)                                                           \
        group_norm_apply_##S(const T* x, const float* w, const float* b, T* y, const float* sums,                      \
                             const float* sqsums, size_t len, int hw, int cg, int groups, float eps, int silu) {       \
        group_norm_apply<T>(x, w, b, y, sums, sqsums, len, hw, cg, groups, eps, silu);                                 \
    }                                                                                                                  \
    extern "C" __global__ void bias_add_##S(const T* y, const T* bias, T* out, size_t total, int inner, int c) {       \
        bias_add<T>(y, bias, out, total, inner, c);                                                                    \
    }                                                                                                                  \
    extern "C" __global__ void geglu_##S(const T* h, T* out, size_t rows, int n) { geglu<T>(h, out, rows, n); }       \
    extern "C" __global__ void im2col_##S(const T* x, T* cols, int c, int h, int w, int k, int stride, int pad, int oh, \
                                          int ow) {                                                                    \
        im2col<T>(x, cols, c, h, w, k, stride, pad, oh, ow);                                                           \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

// Fused scaled-dot-product attention, head dim 64, flash-attention style (online softmax): the
// [q, k] score matrix is never written to memory, and half-precision inputs are never upcast in
// global memory. Two kernels:
//
// - f16 / bf16 (`attention_hd64_tc_*`): tensor cores through WMMA. A block of 4 warps owns 64
//   query rows (16 per warp) and walks the keys in tiles of 32 staged through shared memory. Per
//   tile each warp computes S = Q Kᵀ (f32 accumulate), updates its rows' running max and sum, writes
//   P = exp(S·scale − max) rounded to the input dtype (as flash-attention does), rescales its f32
//   output rows and adds P V. Launch: grid (ceil(lq / 64), bh), block 128 threads.
// - f32 (`attention_hd64_f32`): CUDA cores; each thread owns one query row and keeps the running
//   max, sum and output accumulator in registers. Launch: grid (ceil(lq / 128), bh), block 128.
//
// q: [bh, lq, 64], k and v: [bh, lk, 64], out: [bh, lq, 64]; all contiguous, same dtype.
#include "dtype.cuh"
#include <mma.h>
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

// ---- tensor-core kernel (f16 / bf16) ----

#define TC_WARPS 4
#define TC_ROWS (16 * TC_WARPS)
#define TC_KEYS 32

template <typename T>
__device__ void attention_hd64_tc(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  T* __restrict__ out, int lq, int lk, float scale) {
    using namespace nvcuda;
    // 44.5 KiB in all: under the 48 KiB a kernel gets without opting in.
    __shared__ __align__(32) T qs[TC_ROWS][HEAD_DIM];
    __shared__ __align__(32) T ks[TC_KEYS][HEAD_DIM];
    __shared__ __align__(32) T vs[TC_KEYS][HEAD_DIM];
    __shared__ __align__(32) float ss[TC_WARPS][16][TC_KEYS];   // this tile's scores
    __shared__ __align__(32) T ps[TC_WARPS][16][TC_KEYS];       // this tile's probabilities
    __shared__ __align__(32) float os[TC_WARPS][16][HEAD_DIM];  // running output (unnormalised)

    const int bh = blockIdx.y;
    const int row0 = blockIdx.x * TC_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const T* qb = q + (size_t)bh * lq * HEAD_DIM;
    const T* kb = k + (size_t)bh * lk * HEAD_DIM;
    const T* vb = v + (size_t)bh * lk * HEAD_DIM;
    const T zero = from_f32<T>(0.f);

    for (int i = threadIdx.x; i < TC_ROWS * HEAD_DIM; i += blockDim.x) {
        const int r = i / HEAD_DIM, d = i % HEAD_DIM;
        qs[r][d] = row0 + r < lq ? qb[(size_t)(row0 + r) * HEAD_DIM + d] : zero;
    }
    for (int i = lane; i < 16 * HEAD_DIM; i += 32) os[warp][i / HEAD_DIM][i % HEAD_DIM] = 0.f;
    __syncthreads();

    // This warp's Q rows as four 16×16 A fragments (d in steps of 16), loaded once.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[HEAD_DIM / 16];
#pragma unroll
    for (int s = 0; s < HEAD_DIM / 16; ++s) wmma::load_matrix_sync(qf[s], &qs[warp * 16][s * 16], HEAD_DIM);

    // Two lanes per row, each owning half of the tile's columns (and half of the output's).
    const int r = lane / 2, half = lane % 2;
    float m = -INFINITY, l = 0.f;

    for (int start = 0; start < lk; start += TC_KEYS) {
        const int n = min(TC_KEYS, lk - start);
        __syncthreads();  // every warp is done with the previous tile
        for (int i = threadIdx.x; i < TC_KEYS * HEAD_DIM; i += blockDim.x) {
            const int j = i / HEAD_DIM, d = i % HEAD_DIM;
            const bool in = j < n;  // past the last key: zeros, so masked columns add exact zeros
            ks[j][d] = in ? kb[(size_t)(start + j) * HEAD_DIM + d] : zero;
            vs[j][d] = in ? vb[(size_t)(start + j) * HEAD_DIM + d] : zero;
        }
        __syncthreads();

        // S = Q Kᵀ: K row-major [key][d] is Kᵀ column-major.
#pragma unroll
        for (int t = 0; t < TC_KEYS / 16; ++t) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
            wmma::fill_fragment(sf, 0.f);
#pragma unroll
            for (int s = 0; s < HEAD_DIM / 16; ++s) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, &ks[t * 16][s * 16], HEAD_DIM);
                wmma::mma_sync(sf, qf[s], kf, sf);
            }
            wmma::store_matrix_sync(&ss[warp][0][t * 16], sf, TC_KEYS, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax over this tile, in f32. Lane (r, half) visits its 16 columns rotated by r,
        // so that the 32 lanes hit 32 different shared-memory banks at each step.
        float sv[TC_KEYS / 2];
        float tmax = -INFINITY;
#pragma unroll
        for (int c = 0; c < TC_KEYS / 2; ++c) {
            const int col = half * (TC_KEYS / 2) + (c + r) % (TC_KEYS / 2);
            sv[c] = col < n ? ss[warp][r][col] * scale : -INFINITY;
            tmax = fmaxf(tmax, sv[c]);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        const float mnew = fmaxf(m, tmax);    // finite: every tile has at least one key
        const float corr = __expf(m - mnew);  // 0 on the first tile (m = -inf)
        float psum = 0.f;
#pragma unroll
        for (int c = 0; c < TC_KEYS / 2; ++c) {
            const int col = half * (TC_KEYS / 2) + (c + r) % (TC_KEYS / 2);
            const float p = __expf(sv[c] - mnew);  // exp(-inf) = 0 past the last key
            psum += p;
            ps[warp][r][col] = from_f32<T>(p);
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        l = l * corr + psum;
        m = mnew;
        // Lane (r, half) owns the output columns half + 2·j, visited rotated by r (conflict-free).
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 2; ++j) os[warp][r][half + 2 * ((j + r) % (HEAD_DIM / 2))] *= corr;
        __syncwarp();

        // O += P V.
#pragma unroll
        for (int t = 0; t < HEAD_DIM / 16; ++t) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
            wmma::load_matrix_sync(of, &os[warp][0][t * 16], HEAD_DIM, wmma::mem_row_major);
#pragma unroll
            for (int s = 0; s < TC_KEYS / 16; ++s) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, &ps[warp][0][s * 16], TC_KEYS);
                wmma::load_matrix_sync(vf, &vs[s * 16][t * 16], HEAD_DIM);
                wmma::mma_sync(of, pf, vf, of);
            }
            wmma::store_matrix_sync(&os[warp][0][t * 16], of, HEAD_DIM, wmma::mem_row_major);
        }
        __syncwarp();
    }

    const int row = row0 + warp * 16 + r;
    if (row < lq) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        T* op = out + ((size_t)bh * lq + row) * HEAD_DIM;
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 2; ++j) {
            const int d = half + 2 * ((j + r) % (HEAD_DIM / 2));
            op[d] = from_f32<T>(os[warp][r][d] * inv);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) attention_hd64_tc_f16(const __half* q, const __half* k, const __half* v, __half* out, int lq, int lk, float scale) {
    attention_hd64_tc<__half>(q, k, v, out, lq, lk, scale);
}
extern "C" __global__ void __launch_bounds__(128) attention_hd64_tc_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out, int lq, int lk, float scale) {
    attention_hd64_tc<__nv_bfloat16>(q, k, v, out, lq, lk, scale);
}

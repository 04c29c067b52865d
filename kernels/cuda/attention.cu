// Fused scaled-dot-product attention, head dim 64, flash-attention style (online softmax): the
// [q, k] score matrix is never written to memory, and half-precision inputs are never upcast in
// global memory. Two kernels:
//
// - f16 / bf16 (`attention_hd64_tc_*`): tensor cores through `mma.sync.m16n8k16` (PTX), whose
//   register layouts are specified, so scores, probabilities and the output stay in registers. A
//   block of 4 warps owns 64 query rows (16 per warp) and walks the keys in tiles of 64 staged
//   through shared memory (V transposed there). Per tile each warp computes S = Q Kᵀ (f32
//   accumulate), updates its rows' running max, turns S into P = exp(S·scale − max) rounded to the
//   input dtype (as flash-attention does) in the A-operand layout directly, rescales its f32 output
//   and adds P V. Launch: grid (ceil(lq / 64), bh), block 128 threads.
// - f32 (`attention_hd64_f32`): CUDA cores; each thread owns one query row and keeps the running
//   max, sum and output accumulator in registers. Launch: grid (ceil(lq / 128), bh), block 128.
//
// f32: q [bh, lq, 64], k and v [bh, lk, 64], out [bh, lq, 64]; all contiguous.
// f16 / bf16: logical [b, heads, tokens, 64] with element strides (batch, head, token) per tensor
// and unit stride along the head dim, so the models' [b, tokens, heads, 64] projections are read
// and the output written in that order without transposing copies; every row starts 16-byte
// aligned (strides and offsets multiples of 8 elements).
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

// ---- tensor-core kernel (f16 / bf16) ----
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), with g = lane / 4 and t = lane % 4:
//   A (16×16, row): reg0 = A[g][2t, 2t+1], reg1 = A[g+8][2t, 2t+1], reg2 = A[g][2t+8, 2t+9], reg3 = A[g+8][2t+8, 2t+9]
//   B (16×8, col):  reg0 = B[2t, 2t+1][g], reg1 = B[2t+8, 2t+9][g]
//   C (16×8, f32):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// Two C tiles side by side (16 columns) are exactly one A fragment: P never leaves registers.

#define TC_ROWS 64   // query rows per block, 16 per warp
#define TC_KEYS 64   // keys per shared-memory tile
#define TC_LD (HEAD_DIM + 8)  // padded row (halves): fragment loads hit 32 different banks

template <typename T> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ float2 unpack(uint32_t u) {
        return __half22float2(*reinterpret_cast<__half2*>(&u));
    }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ float2 unpack(uint32_t u) {
        return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
    }
};

// Two adjacent elements (an even column) of row `row` (rows `stride` elements apart), or zeros
// past the end.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* base, int row, int rows, long long stride, int col) {
    return row < rows ? *reinterpret_cast<const uint32_t*>(base + row * stride + col) : 0u;
}

// Element strides of one operand: batch, head, token.
struct Strides {
    long long b, h, t;
};

template <typename T>
__device__ void attention_hd64_tc(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  T* __restrict__ out, int lq, int lk, int heads, Strides qs, Strides ks_, Strides vs_,
                                  Strides os, float scale) {
    __shared__ __align__(16) T ks[TC_KEYS][TC_LD];   // K tile, [key][d]
    __shared__ __align__(16) T vt[HEAD_DIM][TC_LD];  // V tile transposed, [d][key]

    const int bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int ra = blockIdx.x * TC_ROWS + warp * 16 + g, rb = ra + 8;  // this lane's two rows
    const int bi = bh / heads, hi = bh % heads;
    const T* qb = q + bi * qs.b + hi * qs.h;
    const T* kb = k + bi * ks_.b + hi * ks_.h;
    const T* vb = v + bi * vs_.b + hi * vs_.h;

    // Q as four A fragments (d in steps of 16), straight from global memory, once.
    uint32_t qa[HEAD_DIM / 16][4];
#pragma unroll
    for (int s = 0; s < HEAD_DIM / 16; ++s) {
        qa[s][0] = load_pair(qb, ra, lq, qs.t, s * 16 + 2 * t);
        qa[s][1] = load_pair(qb, rb, lq, qs.t, s * 16 + 2 * t);
        qa[s][2] = load_pair(qb, ra, lq, qs.t, s * 16 + 2 * t + 8);
        qa[s][3] = load_pair(qb, rb, lq, qs.t, s * 16 + 2 * t + 8);
    }

    const float scale_log2 = scale * 1.4426950408889634f;  // exp(x·scale) = exp2(x·scale·log2 e)
    float m0 = -INFINITY, m1 = -INFINITY;  // running max of rows ra, rb (log2 domain)
    float l0 = 0.f, l1 = 0.f;              // this lane's part of the running sums
    float o[HEAD_DIM / 8][4];              // output, 8 C tiles over d
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

    for (int start = 0; start < lk; start += TC_KEYS) {
        __syncthreads();  // every warp is done with the previous tile
        // K: 16-byte chunks, coalesced. V: a warp takes 32 consecutive keys of one 8-wide column
        // chunk, so the transposed 2-byte stores land in distinct banks.
        for (int i = threadIdx.x; i < TC_KEYS * HEAD_DIM / 8; i += blockDim.x) {
            const int key = i / 8, c8 = i % 8;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (start + key < lk) val = *reinterpret_cast<const uint4*>(kb + (start + key) * ks_.t + c8 * 8);
            *reinterpret_cast<uint4*>(&ks[key][c8 * 8]) = val;
        }
        for (int i = threadIdx.x; i < TC_KEYS * HEAD_DIM / 8; i += blockDim.x) {
            const int key = i % TC_KEYS, c8 = i / TC_KEYS;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (start + key < lk) val = *reinterpret_cast<const uint4*>(vb + (start + key) * vs_.t + c8 * 8);
            const T* e = reinterpret_cast<const T*>(&val);
#pragma unroll
            for (int d = 0; d < 8; ++d) vt[c8 * 8 + d][key] = e[d];
        }
        __syncthreads();

        // S = Q Kᵀ: 8 C tiles of 8 keys. B = Kᵀ (col layout) is K's rows read as pairs along d.
        float s[TC_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < TC_KEYS / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&ks[j * 8 + g][kk * 16 + 2 * t]);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&ks[j * 8 + g][kk * 16 + 2 * t + 8]);
                Mma<T>::run(s[j], qa[kk], b0, b1);
            }
        }

        // Online softmax, in f32 registers. Keys past the end get -inf (probability exactly 0).
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < TC_KEYS / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = start + j * 8 + 2 * t + (e & 1);
                s[j][e] = key < lk ? s[j][e] * scale_log2 : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        // A row's 64 scores are spread over the 4 lanes of its group.
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);  // finite: a tile has at least one key
        const float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);  // 0 on the first tile (m = -inf)
        m0 = n0;
        m1 = n1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 8; ++j) {
            o[j][0] *= c0;
            o[j][1] *= c0;
            o[j][2] *= c1;
            o[j][3] *= c1;
        }

        // O += P V, 16 keys at a time: C tiles 2kk and 2kk+1 of S form P's A fragment.
#pragma unroll
        for (int kk = 0; kk < TC_KEYS / 16; ++kk) {
            float p[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int e = 0; e < 4; ++e) p[h][e] = exp2f(s[2 * kk + h][e] - (e < 2 ? m0 : m1));
                l0 += p[h][0] + p[h][1];
                l1 += p[h][2] + p[h][3];
            }
            const uint32_t pa[4] = {Mma<T>::pack(p[0][0], p[0][1]), Mma<T>::pack(p[0][2], p[0][3]),
                                    Mma<T>::pack(p[1][0], p[1][1]), Mma<T>::pack(p[1][2], p[1][3])};
#pragma unroll
            for (int j = 0; j < HEAD_DIM / 8; ++j) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&vt[j * 8 + g][kk * 16 + 2 * t]);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&vt[j * 8 + g][kk * 16 + 2 * t + 8]);
                Mma<T>::run(o[j], pa, b0, b1);
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* ob = out + bi * os.b + hi * os.h;
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) {
        if (ra < lq) *reinterpret_cast<uint32_t*>(ob + ra * os.t + j * 8 + 2 * t) = Mma<T>::pack(o[j][0] * i0, o[j][1] * i0);
        if (rb < lq) *reinterpret_cast<uint32_t*>(ob + rb * os.t + j * 8 + 2 * t) = Mma<T>::pack(o[j][2] * i1, o[j][3] * i1);
    }
}

#define TC_ENTRY(T, S)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                                  \
        attention_hd64_tc_##S(const T* q, const T* k, const T* v, T* out, int lq, int lk, int heads, long long qb,     \
                              long long qh, long long qt, long long kb, long long kh, long long kt, long long vb,       \
                              long long vh, long long vt, long long ob, long long oh, long long ot, float scale) {      \
        attention_hd64_tc<T>(q, k, v, out, lq, lk, heads, Strides{qb, qh, qt}, Strides{kb, kh, kt},                   \
                             Strides{vb, vh, vt}, Strides{ob, oh, ot}, scale);                                         \
    }
TC_ENTRY(__half, f16)
TC_ENTRY(__nv_bfloat16, bf16)

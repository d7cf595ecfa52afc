// Single-query attention at a held position (the GPU's graphed decode step): one block per query head.
//
// Memory layout: q float [H][D], already scaled by 1/sqrt(D); k, v half [KV][S][D] (one layer's cache slot,
// row-major), read as half2 pairs; pos int [1], the query's position; out float [H][D]. Query head h reads KV
// head h / rep. Dynamic shared memory: the query (D floats), the scores of positions 0..pos (S floats), and
// each warp's partial output (warps x D floats).
// Scores: warp w takes positions w, w + warps, ..., its lanes striding over the D/2 pairs of a key row. Then
// the block's max, the exponentials and their sum. Output: warp w sums p_j v_j over the same positions, lane l
// holding pairs l, l + 32, ... of the row; the warps' partial sums are added at the end.
#include <cuda_fp16.h>

namespace held {
constexpr int WARP = 32;
constexpr int MAX_PAIRS = 4;  // pairs per lane: D <= 2 * 32 * MAX_PAIRS = 256

// The block's max (is_max) or sum of x; every thread gets it. red: one float per warp.
__device__ __forceinline__ float block_reduce(float x, bool is_max, float* red) {
    for (int o = WARP / 2; o > 0; o /= 2) {
        const float y = __shfl_xor_sync(0xffffffffu, x, o);
        x = is_max ? fmaxf(x, y) : x + y;
    }
    if (threadIdx.x % WARP == 0) red[threadIdx.x / WARP] = x;
    __syncthreads();
    x = red[0];
    for (int w = 1; w < blockDim.x / WARP; ++w) x = is_max ? fmaxf(x, red[w]) : x + red[w];
    __syncthreads();
    return x;
}
}  // namespace held

extern "C" __global__ void held_attention(const float* __restrict__ q, const __half* __restrict__ k,
                                          const __half* __restrict__ v, const int* __restrict__ pos,
                                          float* __restrict__ out, int seq, int dim, int rep) {
    extern __shared__ float shared[];
    __shared__ float red[32];
    float* qs = shared;
    float* p = qs + dim;
    float* part = p + seq;
    const int h = blockIdx.x, n = pos[0] + 1, pairs = dim / 2;
    const int lane = threadIdx.x % held::WARP, warp = threadIdx.x / held::WARP, warps = blockDim.x / held::WARP;
    const __half2* kh = reinterpret_cast<const __half2*>(k) + (long long)(h / rep) * seq * pairs;
    const __half2* vh = reinterpret_cast<const __half2*>(v) + (long long)(h / rep) * seq * pairs;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) qs[d] = q[(long long)h * dim + d];
    __syncthreads();
    float m = -__int_as_float(0x7f800000);  // -inf (NVRTC has no math.h)
#pragma unroll 4
    for (int j = warp; j < n; j += warps) {
        float s = 0.f;
        for (int e = lane; e < pairs; e += held::WARP) {
            const float2 kv = __half22float2(kh[(long long)j * pairs + e]);
            s = fmaf(qs[2 * e], kv.x, fmaf(qs[2 * e + 1], kv.y, s));
        }
        for (int o = held::WARP / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) p[j] = s;
        m = fmaxf(m, s);
    }
    m = held::block_reduce(m, true, red);
    float l = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(p[j] - m);
        p[j] = e;
        l += e;
    }
    l = held::block_reduce(l, false, red);
    float2 acc[held::MAX_PAIRS];
#pragma unroll
    for (int r = 0; r < held::MAX_PAIRS; ++r) acc[r] = make_float2(0.f, 0.f);
#pragma unroll 4
    for (int j = warp; j < n; j += warps) {
        const float pj = p[j];
#pragma unroll
        for (int r = 0; r < held::MAX_PAIRS; ++r) {
            const int e = lane + held::WARP * r;
            if (e < pairs) {
                const float2 vv = __half22float2(vh[(long long)j * pairs + e]);
                acc[r].x = fmaf(pj, vv.x, acc[r].x);
                acc[r].y = fmaf(pj, vv.y, acc[r].y);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < held::MAX_PAIRS; ++r) {
        const int e = lane + held::WARP * r;
        if (e < pairs) {
            part[warp * dim + 2 * e] = acc[r].x;
            part[warp * dim + 2 * e + 1] = acc[r].y;
        }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < warps; ++w) o += part[w * dim + d];
        out[(long long)h * dim + d] = o / l;
    }
}

// Single-query attention at a held position (the GPU's graphed decode step): one block per query head.
//
// Memory layout: q float [H][D], already scaled by 1/sqrt(D); k, v half [KV][S][D] (one layer's cache slot,
// row-major); pos int [1], the query's position; out float [H][D]. Query head h reads KV head h / rep.
// Dynamic shared memory holds the query (D floats) and the scores of positions 0..pos (S floats).
// Scores: warp w takes positions w, w + warps, ..., its lanes striding over D; then the block's max, the
// exponentials and their sum; then thread d sums p_j v_j[d] over the positions.
#include <cuda_fp16.h>

namespace held {
constexpr int WARP = 32;

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
    float* p = shared + dim;
    const int h = blockIdx.x, n = pos[0] + 1;
    const int lane = threadIdx.x % held::WARP, warp = threadIdx.x / held::WARP, warps = blockDim.x / held::WARP;
    const __half* kh = k + (long long)(h / rep) * seq * dim;
    const __half* vh = v + (long long)(h / rep) * seq * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) qs[d] = q[(long long)h * dim + d];
    __syncthreads();
    float m = -__int_as_float(0x7f800000);  // -inf (NVRTC has no math.h)
    for (int j = warp; j < n; j += warps) {
        float s = 0.f;
        for (int d = lane; d < dim; d += held::WARP) s = fmaf(qs[d], __half2float(kh[(long long)j * dim + d]), s);
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
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; ++j) acc = fmaf(p[j], __half2float(vh[(long long)j * dim + d]), acc);
        out[(long long)h * dim + d] = acc / l;
    }
}

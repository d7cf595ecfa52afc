// FP16 dense GEMV, y = W x with FP32 accumulation: the decode step of dense matrices on the GPU, where cuBLAS
// cannot go (CuPy refuses cuBLAS calls while a CUDA graph is captured).
//
// Memory layout: w half [out][in] row-major, x half [in], y half [out]. One warp per row; with VEC (in % 8 == 0
// and 16-byte aligned rows and x) lane l reads 8 halves at a time, at columns 8l, 8l + 256, ..., so a warp's
// loads of a row are contiguous 512-byte runs; otherwise one half at a time.
#include <cuda_fp16.h>

template <bool VEC>
__global__ void dense_gemv(const __half* __restrict__ w, const __half* __restrict__ x, __half* __restrict__ y,
                           int out, int in) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= out) return;
    const __half* r = w + (long long)row * in;
    float acc = 0.f;
    if (VEC) {
        for (int c = 8 * lane; c < in; c += 8 * 32) {
            const uint4 wv = __ldg(reinterpret_cast<const uint4*>(r + c));
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + c));
            const __half2* wh = reinterpret_cast<const __half2*>(&wv);
            const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 a = __half22float2(wh[e]), b = __half22float2(xh[e]);
                acc = fmaf(a.x, b.x, fmaf(a.y, b.y, acc));
            }
        }
    } else {
        for (int c = lane; c < in; c += 32) acc = fmaf(__half2float(r[c]), __half2float(x[c]), acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = __float2half(acc);
}

#ifdef SAGE_INSTANTIATE_ALL  // for offline compile checks (nvcc -c); dense_cuda.py instantiates by name
template __global__ void dense_gemv<true>(const __half*, const __half*, __half*, int, int);
template __global__ void dense_gemv<false>(const __half*, const __half*, __half*, int, int);
#endif

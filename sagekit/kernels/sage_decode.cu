// Prefill on packed `sage` weights: the matrix decoded to FP16, for a cuBLAS GEMM after (Y = X W_hat^T).
// Decoding costs one pass over the planes; the GEMM then runs at cuBLAS's speed on tensor cores, and NVRTC
// needs no WMMA headers (which CUDA 13's pip wheels do not ship complete).
//
// Memory layout: the planes and salient arrays as in sage_gemv.cu (FORMAT.md, row-major); w half [out][in].
// sage_decode: one thread per 32-column word of a row (its sign and id words read once, 32 halves written);
// sage_salient: one thread per row, adding s_r * q at the row's salient columns (after sage_decode).
#include "sage_gemv.cu"

template <int NB>
__global__ void sage_decode(const unsigned* __restrict__ sign, const unsigned* __restrict__ gid,
                            const __half* __restrict__ alpha, int n_groups, __half* __restrict__ w, int out, int in,
                            int words) {
    __shared__ float tab[2 << NB];
    load_signed_alpha<NB>(alpha, n_groups, tab);
    __syncthreads();
    const long long plane = (long long)out * words;
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= plane) return;
    const int row = (int)(e / words), c0 = 32 * (int)(e % words);
    Bits<NB> bits{sign[e]};
#pragma unroll
    for (int i = 0; i < NB; ++i) bits.g[i] = gid[i * plane + e];
    __half* dst = w + (long long)row * in;
#pragma unroll
    for (int b = 0; b < 32; ++b)
        if (c0 + b < in) dst[c0 + b] = __float2half(tab[bits.code(b)]);
}

__global__ void sage_salient(const int* __restrict__ sal_ptr, const unsigned short* __restrict__ sal_idx,
                             const signed char* __restrict__ sal_val, const __half* __restrict__ sal_scale,
                             __half* __restrict__ w, int out, int in) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= out) return;
    const float s = __half2float(sal_scale[row]);
    __half* dst = w + (long long)row * in;
    for (int p = sal_ptr[row]; p < sal_ptr[row + 1]; ++p)
        dst[sal_idx[p]] = __float2half(__half2float(dst[sal_idx[p]]) + s * (float)sal_val[p]);
}

#ifdef SAGE_INSTANTIATE_ALL  // for offline compile checks (nvcc -c); cuda.py instantiates by name via NVRTC
#define SAGE_DECODE(NB)                                                                                  \
    template __global__ void sage_decode<NB>(const unsigned*, const unsigned*, const __half*, int, __half*, \
                                             int, int, int);
SAGE_DECODE(0) SAGE_DECODE(1) SAGE_DECODE(2) SAGE_DECODE(3)
#endif

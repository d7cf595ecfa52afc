// Decode GEMV on packed `sage` weights: y = W_hat x, FP16 in and out, FP32 accumulation.
//
// Memory layout (docs/FORMAT.md, row-major, as stored):
//   sign  uint32 [out][words]       bit b of word k in row r = column 32k+b is >= 0
//   gid   uint32 [NB][out][words]   bit plane i of every weight's group id, same bit order
//   alpha half [G], sal_ptr int32 [out+1], sal_idx uint16 [nnz], sal_val int8 [nnz], sal_scale half [out]
//   x     half [in], y half [out]
// One warp per output row; lane l reads words l, l+32, ... of the row (or 4 consecutive words with one
// 16-byte load when words % 4 == 0), so a warp's loads of a plane are contiguous and coalesced. The
// weight value (+-alpha of the group) is a lookup in a 2^(1+NB) entry shared table indexed by the code
// (sign bit | id bits << 1); salient corrections come from the row's CSR slice, lane-strided.
#ifndef SAGE_GEMV_CU
#define SAGE_GEMV_CU
#include <cuda_fp16.h>

constexpr int WARP = 32;

// tab[code] = (sign bit ? +1 : -1) * alpha[code >> 1]; ids >= G never occur and get 0.
template <int NB>
__device__ __forceinline__ void load_signed_alpha(const __half* alpha, int n_groups, float* tab) {
    for (int c = threadIdx.x; c < (2 << NB); c += blockDim.x) {
        const float a = (c >> 1) < n_groups ? __half2float(alpha[c >> 1]) : 0.f;
        tab[c] = (c & 1) ? a : -a;
    }
}

template <int NB>
struct Bits {
    unsigned s;
    unsigned g[NB > 0 ? NB : 1];
    __device__ __forceinline__ unsigned code(int b) const {
        unsigned c = (s >> b) & 1u;
#pragma unroll
        for (int i = 0; i < NB; ++i) c |= ((g[i] >> b) & 1u) << (i + 1);
        return c;
    }
};

// x[c0 .. c0+31] as floats, zero past `in` (padding bits of the planes are 0 and must meet x = 0).
__device__ __forceinline__ void load_x32(const __half* __restrict__ x, int c0, int in, float* xf) {
    if (c0 + 32 <= in && (in & 7) == 0) {
        const uint4* v = reinterpret_cast<const uint4*>(x + c0);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const uint4 u = __ldg(v + q);
            const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = __half22float2(h[e]);
                xf[8 * q + 2 * e] = f.x;
                xf[8 * q + 2 * e + 1] = f.y;
            }
        }
    } else {
#pragma unroll
        for (int b = 0; b < 32; ++b) xf[b] = c0 + b < in ? __half2float(x[c0 + b]) : 0.f;
    }
}

template <int NB>
__device__ __forceinline__ float word_dot(const Bits<NB>& w, const __half* __restrict__ x, int c0, int in,
                                          const float* tab) {
    float xf[32];
    load_x32(x, c0, in, xf);
    float a0 = 0.f, a1 = 0.f;  // two chains so consecutive FMAs do not wait on each other
#pragma unroll
    for (int b = 0; b < 32; b += 2) {
        a0 = fmaf(tab[w.code(b)], xf[b], a0);
        a1 = fmaf(tab[w.code(b + 1)], xf[b + 1], a1);
    }
    return a0 + a1;
}

template <int NB, bool VEC4>
__global__ void sage_gemv(const unsigned* __restrict__ sign, const unsigned* __restrict__ gid,
                          const __half* __restrict__ alpha, int n_groups, const int* __restrict__ sal_ptr,
                          const unsigned short* __restrict__ sal_idx, const signed char* __restrict__ sal_val,
                          const __half* __restrict__ sal_scale, const __half* __restrict__ x,
                          __half* __restrict__ y, int out, int in, int words) {
    __shared__ float tab[2 << NB];
    load_signed_alpha<NB>(alpha, n_groups, tab);
    __syncthreads();
    const int lane = threadIdx.x % WARP;
    const int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= out) return;
    const long long plane = (long long)out * words;
    const long long base = (long long)row * words;
    float acc = 0.f;
    if (VEC4) {  // words % 4 == 0, so every row starts 16-byte aligned
        for (int w4 = lane; w4 < words / 4; w4 += WARP) {
            const uint4 s = __ldg(reinterpret_cast<const uint4*>(sign + base) + w4);
            uint4 g[NB > 0 ? NB : 1];
#pragma unroll
            for (int i = 0; i < NB; ++i) g[i] = __ldg(reinterpret_cast<const uint4*>(gid + i * plane + base) + w4);
            Bits<NB> b0{s.x}, b1{s.y}, b2{s.z}, b3{s.w};
#pragma unroll
            for (int i = 0; i < NB; ++i) {
                b0.g[i] = g[i].x;
                b1.g[i] = g[i].y;
                b2.g[i] = g[i].z;
                b3.g[i] = g[i].w;
            }
            const int c0 = 128 * w4;
            acc += word_dot<NB>(b0, x, c0, in, tab) + word_dot<NB>(b1, x, c0 + 32, in, tab) +
                   word_dot<NB>(b2, x, c0 + 64, in, tab) + word_dot<NB>(b3, x, c0 + 96, in, tab);
        }
    } else {
        for (int w = lane; w < words; w += WARP) {
            Bits<NB> b{__ldg(sign + base + w)};
#pragma unroll
            for (int i = 0; i < NB; ++i) b.g[i] = __ldg(gid + i * plane + base + w);
            acc += word_dot<NB>(b, x, 32 * w, in, tab);
        }
    }
    float sal = 0.f;
    for (int j = sal_ptr[row] + lane; j < sal_ptr[row + 1]; j += WARP)
        sal += (float)sal_val[j] * __half2float(x[sal_idx[j]]);
    acc = fmaf(__half2float(sal_scale[row]), sal, acc);
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = __float2half(acc);
}

#ifdef SAGE_INSTANTIATE_ALL  // for offline compile checks (nvcc -c); cuda.py instantiates by name via NVRTC
#define SAGE_GEMV(NB, V)                                                                                       \
    template __global__ void sage_gemv<NB, V>(const unsigned*, const unsigned*, const __half*, int, const int*, \
                                              const unsigned short*, const signed char*, const __half*,        \
                                              const __half*, __half*, int, int, int);
SAGE_GEMV(0, true) SAGE_GEMV(0, false) SAGE_GEMV(1, true) SAGE_GEMV(1, false)
SAGE_GEMV(2, true) SAGE_GEMV(2, false) SAGE_GEMV(3, true) SAGE_GEMV(3, false)
#endif
#endif  // SAGE_GEMV_CU

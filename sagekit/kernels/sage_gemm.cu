// Prefill GEMM on packed `sage` weights: Y = X W_hat^T with WMMA tensor cores, FP16 in/out, FP32 accumulation.
//
// Memory layout: the planes and salient arrays as in sage_gemv.cu (FORMAT.md, row-major);
//   X half [T][in], Y half [T][out].
// A block computes a 64-token x 64-row tile of Y with 4 warps (32 x 32 each, 2 x 2 fragments of 16x16x16).
// For each 32-column step it stages X[64 tokens][32] row-major in shared memory (WMMA matrix_a) and unpacks
// W[64 rows][32] to FP16 in shared memory, which read as [k][n] is column-major (WMMA matrix_b). Each row
// of the W tile is unpacked by two threads (16 columns each) that walk the row's salient CSR slice forward
// with the tile, adding q * s_r at the salient columns.
#include "sage_gemv.cu"
#include <mma.h>

namespace gemm {
constexpr int BM = 64;        // tokens per block
constexpr int BN = 64;        // output rows per block
constexpr int BK = 32;        // columns per step: one plane word per row
constexpr int LDA = BK + 8;   // padded shared strides (multiples of 8 halves / 4 floats for WMMA)
constexpr int LDB = BK + 8;
constexpr int LDC = BN + 4;
constexpr int THREADS = 128;
}  // namespace gemm

template <int NB>
__global__ void __launch_bounds__(gemm::THREADS)
    sage_gemm(const unsigned* __restrict__ sign, const unsigned* __restrict__ gid, const __half* __restrict__ alpha,
              int n_groups, const int* __restrict__ sal_ptr, const unsigned short* __restrict__ sal_idx,
              const signed char* __restrict__ sal_val, const __half* __restrict__ sal_scale,
              const __half* __restrict__ x, __half* __restrict__ y, int n_tok, int out, int in, int words) {
    using namespace gemm;
    using namespace nvcuda;
    __shared__ float tab[2 << NB];
    __shared__ __align__(32) __half As[BM * LDA];
    __shared__ __align__(32) __half Bs[BN * LDB];
    __shared__ __align__(32) float Cs[BM * LDC];
    load_signed_alpha<NB>(alpha, n_groups, tab);

    const int t0 = blockIdx.y * BM, r0 = blockIdx.x * BN;
    const int tid = threadIdx.x, warp = tid / WARP;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const int n = tid / 2, half_ = tid % 2, row = r0 + n;  // this thread unpacks W[row][16 half_ + 0..15]
    const long long plane = (long long)out * words;
    int p = row < out ? sal_ptr[row] : 0;
    const int p_end = row < out ? sal_ptr[row + 1] : 0;
    const float s_row = row < out ? __half2float(sal_scale[row]) : 0.f;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    __syncthreads();

    for (int k = 0; k < words; ++k) {
        const int c0 = k * BK;
        for (int e = tid; e < BM * BK; e += THREADS) {
            const int m = e / BK, kk = e % BK, t = t0 + m, c = c0 + kk;
            As[m * LDA + kk] = (t < n_tok && c < in) ? x[(long long)t * in + c] : __float2half(0.f);
        }
        __half* b_row = Bs + n * LDB;
        if (row < out) {
            Bits<NB> bits{sign[(long long)row * words + k]};
#pragma unroll
            for (int i = 0; i < NB; ++i) bits.g[i] = gid[i * plane + (long long)row * words + k];
#pragma unroll
            for (int b = 16 * half_; b < 16 * half_ + 16; ++b) b_row[b] = __float2half(tab[bits.code(b)]);
            for (; p < p_end && sal_idx[p] < c0 + 16 * half_ + 16; ++p) {
                const int c = sal_idx[p] - c0;
                if (c >= 16 * half_) b_row[c] = __float2half(__half2float(b_row[c]) + s_row * (float)sal_val[p]);
            }
        } else {
#pragma unroll
            for (int b = 16 * half_; b < 16 * half_ + 16; ++b) b_row[b] = __float2half(0.f);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm + 16 * i) * LDA + kk, LDA);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn + 16 * j) * LDB + kk, LDB);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Cs + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < BM * BN; e += THREADS) {
        const int m = e / BN, c = e % BN, t = t0 + m, r = r0 + c;
        if (t < n_tok && r < out) y[(long long)t * out + r] = __float2half(Cs[m * LDC + c]);
    }
}

#ifdef SAGE_INSTANTIATE_ALL  // for offline compile checks (nvcc -c); cuda.py instantiates by name via NVRTC
#define SAGE_GEMM(NB)                                                                                    \
    template __global__ void sage_gemm<NB>(const unsigned*, const unsigned*, const __half*, int, const int*, \
                                           const unsigned short*, const signed char*, const __half*,        \
                                           const __half*, __half*, int, int, int, int);
SAGE_GEMM(0) SAGE_GEMM(1) SAGE_GEMM(2) SAGE_GEMM(3)
#endif

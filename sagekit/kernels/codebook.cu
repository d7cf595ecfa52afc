// Byte-indexed codebook weights (`sage-vq`, and `sage-grid` with D = 8 / B codes joined a byte):
// W_hat[r, jD + i] = scale[r] * book[codes[r, j]][i]. FP16 activations, FP32 accumulation.
//
// Memory layout (row-major, codebook_matmul.byte_codes):
//   codes  uint8 [out][runs]   byte j of row r codes weights jD .. jD+D-1 of that row (runs * D >= in;
//                              the padding weights of a last partial run meet x = 0)
//   book   float [K][D]        K <= 256 codewords, staged in shared memory (8 KiB at most)
//   scale  float [out]
//   x      half [in] (GEMV), w half [out][in] (decode, the prefill's scratch for cuBLAS)
#include <cuda_fp16.h>

namespace codebook {
constexpr int WARP = 32;
constexpr int MAX_ENTRIES = 256 * 8;  // K * D floats
}  // namespace codebook

// Decode GEMV, one warp per output row at a time: lane l reads runs l, l+32, ... of the row, so a warp's
// code bytes and its x reads (D halves a run) are contiguous; each run is one shared-memory codeword read.
// The grid is a few blocks per SM whose warps stride over the rows, so the codebook is staged once a block,
// not once per 8 rows.
template <int D>
__global__ void codebook_gemv(const unsigned char* __restrict__ codes, const float* __restrict__ book,
                              int entries, const float* __restrict__ scale, const __half* __restrict__ x,
                              __half* __restrict__ y, int out, int in, int runs) {
    __shared__ float words[codebook::MAX_ENTRIES];
    for (int i = threadIdx.x; i < entries * D; i += blockDim.x) words[i] = book[i];
    __syncthreads();
    const int lane = threadIdx.x % codebook::WARP, warps = blockDim.x / codebook::WARP;
    for (int r = blockIdx.x * warps + threadIdx.x / codebook::WARP; r < out; r += gridDim.x * warps) {
        const unsigned char* row = codes + static_cast<size_t>(r) * runs;
        float acc = 0.f;
        for (int j = lane; j < runs; j += codebook::WARP) {
            const float* w = words + static_cast<int>(row[j]) * D;
#pragma unroll
            for (int i = 0; i < D; ++i) {
                const int c = j * D + i;
                if (c < in) acc += w[i] * __half2float(x[c]);
            }
        }
#pragma unroll
        for (int off = codebook::WARP / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) y[r] = __float2half(acc * scale[r]);
    }
}

// Prefill: the whole matrix decoded to FP16 (one thread a weight, grid-strided), for a cuBLAS GEMM after.
template <int D>
__global__ void codebook_decode(const unsigned char* __restrict__ codes, const float* __restrict__ book,
                                const float* __restrict__ scale, __half* __restrict__ w, int out, int in,
                                int runs) {
    const size_t n = static_cast<size_t>(out) * in;
    for (size_t e = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; e < n;
         e += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const int r = static_cast<int>(e / in), c = static_cast<int>(e % in);
        const int code = codes[static_cast<size_t>(r) * runs + c / D];
        w[e] = __float2half(scale[r] * book[code * D + c % D]);
    }
}

#ifdef SAGE_INSTANTIATE_ALL  // for offline compile checks (nvcc -c); codebook_cuda.py instantiates by name
#define CODEBOOK(D)                                                                                         \
    template __global__ void codebook_gemv<D>(const unsigned char*, const float*, int, const float*,       \
                                              const __half*, __half*, int, int, int);                      \
    template __global__ void codebook_decode<D>(const unsigned char*, const float*, const float*, __half*, \
                                                int, int, int);
CODEBOOK(1) CODEBOOK(2) CODEBOOK(3) CODEBOOK(4) CODEBOOK(5) CODEBOOK(6) CODEBOOK(7) CODEBOOK(8)
#endif

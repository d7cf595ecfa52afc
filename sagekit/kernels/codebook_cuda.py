"""GPU matmul on byte-indexed codebooks (`sage-vq`, `sage-grid`): CuPy RawKernels from codebook.cu.

The codes stay at one byte a run on the device (vq at its stored size). Decode (one token) is the GEMV
kernel; longer inputs decode the matrix to an FP16 scratch and hand it to cuBLAS, as the CPU path decodes
row tiles for BLAS. The rotation R x runs as two small cuBLAS matmuls with R's Kronecker factors.
CuPy is imported only when a GPU function runs, so this module imports on machines without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from sagekit.format import rotation
from sagekit.format.sage_grid import PackedGrid
from sagekit.format.sage_vq import PackedVQ
from sagekit.kernels.codebook_matmul import byte_codes
from sagekit.kernels.cuda import KERNEL_DIR, cupy_module

GEMV_WARPS = 8  # warps per GEMV block, one row each at a time
GEMV_BLOCKS_PER_SM = 4  # the GEMV grid: its warps stride over the rows, each block stages the codebook once
DECODE_THREADS = 256
MAX_ENTRIES = 256 * 8  # codebook.cu's shared table: K codewords x D floats


@dataclass(frozen=True)
class CodebookGPU:
    """A codebook matrix on the device: codes uint8 (out, runs), codewords float32 (K, D), scale float32 (out,)."""

    codes: Any
    codewords: Any
    scale: Any
    shape: tuple[int, int]

    @property
    def dim(self) -> int:
        return int(self.codewords.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.codewords.nbytes + self.scale.nbytes)


def to_device(p: PackedVQ | PackedGrid) -> CodebookGPU:
    cp = cupy_module()
    codes, words = byte_codes(p)
    if words.size > MAX_ENTRIES:
        raise ValueError(f"a codebook of {words.shape[0]} x {words.shape[1]} exceeds the kernel's {MAX_ENTRIES} floats")
    return CodebookGPU(cp.asarray(np.ascontiguousarray(codes)), cp.asarray(np.ascontiguousarray(words)),
                       cp.asarray(p.scale, dtype=cp.float32), p.shape)


@functools.cache
def _sm_count() -> int:
    return int(cupy_module().cuda.Device().attributes["MultiProcessorCount"])


@functools.cache
def _kernels(d: int) -> tuple[Any, Any]:
    """(gemv, decode) for runs of d weights."""
    names = [f"codebook_gemv<{d}>", f"codebook_decode<{d}>"]
    module = cupy_module().RawModule(code=(KERNEL_DIR / "codebook.cu").read_text(), options=("--std=c++17",),
                               name_expressions=names)
    return tuple(module.get_function(n) for n in names)


def decode(dev: CodebookGPU) -> Any:
    """float16 (out, in): the stored W R^T, decoded on the device."""
    cp = cupy_module()
    out, in_ = dev.shape
    w = cp.empty((out, in_), dtype=cp.float16)
    blocks = min(-(-out * in_ // DECODE_THREADS), 65535)
    _, kernel = _kernels(dev.dim)
    kernel((blocks,), (DECODE_THREADS,), (dev.codes, dev.codewords, dev.scale, w, cp.int32(out), cp.int32(in_),
                                          cp.int32(dev.codes.shape[1])))
    return w


def codebook_matmul_gpu(x: Any, dev: CodebookGPU) -> Any:
    """float16 x of shape (T, in) -> float16 (T, out); one row is the decode GEMV."""
    cp = cupy_module()
    out, in_ = dev.shape
    x = cp.ascontiguousarray(x, dtype=cp.float16)
    if x.ndim != 2 or x.shape[1] != in_:
        raise ValueError(f"x: expected (T, {in_}), got {x.shape}")
    if x.shape[0] > 1:
        return x @ decode(dev).T
    gemv, _ = _kernels(dev.dim)
    y = cp.empty((1, out), dtype=cp.float16)
    blocks = min(-(-out // GEMV_WARPS), GEMV_BLOCKS_PER_SM * _sm_count())
    gemv((blocks,), (32 * GEMV_WARPS,),
         (dev.codes, dev.codewords, cp.int32(dev.codewords.shape[0]), dev.scale, x, y, cp.int32(out), cp.int32(in_),
          cp.int32(dev.codes.shape[1])))
    return y


@functools.cache
def _factors(n: int, seed: int, dtype: str) -> tuple[Any, Any]:
    """(A, B^T) on the device, so that R x = A X B^T for x viewed as (a, b)."""
    a, b = rotation.factors(n, seed)
    cp = cupy_module()
    return cp.asarray(a, dtype=dtype), cp.asarray(np.ascontiguousarray(b.T), dtype=dtype)


def rotate(x: Any, seed: int) -> Any:
    """R x for every row of x (T, n) on the device, float16: rotation.rotate's algebra. Many rows go through two
    cuBLAS matmuls in float16; one row (decode) through broadcast products and sums in float32, since CuPy
    refuses cuBLAS calls inside a captured CUDA graph (sagekit.model.decode_graph)."""
    cp = cupy_module()
    if x.shape[0] != 1:
        left, right = _factors(x.shape[-1], seed, "float16")
        xm = x.astype(left.dtype, copy=False).reshape(x.shape[0], left.shape[0], right.shape[0])
        return (left @ xm @ right).reshape(x.shape)
    left, right = _factors(x.shape[-1], seed, "float32")
    xm = x.astype(cp.float32, copy=False).reshape(left.shape[0], right.shape[0])
    z = (xm[:, :, None] * right[None]).sum(axis=1)  # X B^T
    return (left[:, :, None] * z[None]).sum(axis=1).astype(cp.float16).reshape(x.shape)

"""CPU matmul on FP16 weights (Numba): NumPy has no fast float16 matmul, and upcasting doubles the bytes.

An FP16 matrix (the tied embedding / lm_head of a compressed model) stays FP16 in memory: decode converts
the half bits of each row as it reads them, long prompts convert row tiles for BLAS.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from sagekit.kernels.fastmath import FASTMATH, ordered_dot
from sagekit.kernels.serial_twin import serial_twin

HALF_BLOCK_ROWS = 64  # rows converted into one scratch row at a time per thread
HALF_BLAS_MIN_TOKENS = 16  # from here on, converting row tiles for BLAS beats the per-row dot products
HALF_TO_F32 = np.float32(2.0 ** 112)  # moves a half's exponent bias (15) to a float's (127)
# A decode step's lm_head (49152 x 576 on the demo, 2.4 ms on one core of the 2-core VM, 1.7 ms on two)
# is worth one wake-up of the thread pool; an embedding-sized row block is not.
HALF_PARALLEL_MIN_BITS = 1 << 24


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _half_matmul(x, w, y):
    """Layout: x (T, in) f32; w (out, in) uint16 holding IEEE half bits, row-major; y (T, out) f32.

    A half h becomes the float with bits (sign << 16) | (exponent, mantissa) << 13, times 2^112: exact
    for normal and subnormal halves (weights are finite: the loader refuses Inf and NaN)."""
    n_tok, in_ = x.shape
    out = w.shape[0]
    for b in prange(-(-out // HALF_BLOCK_ROWS)):
        bits = np.empty(in_, dtype=np.uint32)
        row = bits.view(np.float32)
        for r in range(b * HALF_BLOCK_ROWS, min(out, (b + 1) * HALF_BLOCK_ROWS)):
            for j in range(in_):
                h = np.uint32(w[r, j])
                bits[j] = ((h & 0x8000) << 16) | ((h & 0x7FFF) << 13)
            for t in range(n_tok):
                y[t, r] = ordered_dot(row, x[t], in_) * HALF_TO_F32


_half_matmul_serial = serial_twin(_half_matmul)


def half_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32 (T, in) @ float16 (out, in).T -> float32 (T, out), reading the half weights directly:
    half the bytes of a float32 matvec for decode; long prompts convert row tiles for BLAS instead."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out, in_ = w.shape
    if x.ndim != 2 or x.shape[1] != in_:
        raise ValueError(f"x: expected (T, {in_}), got {x.shape}")
    y = np.empty((x.shape[0], out), dtype=np.float32)
    if x.shape[0] >= HALF_BLAS_MIN_TOKENS:
        for r0 in range(0, out, 4096):
            np.matmul(x, w[r0:r0 + 4096].astype(np.float32).T, out=y[:, r0:r0 + 4096])
        return y
    if w.size * 16 * x.shape[0] < HALF_PARALLEL_MIN_BITS:
        _half_matmul_serial(x, w.view(np.uint16), y)
    else:
        _half_matmul(x, w.view(np.uint16), y)
    return y

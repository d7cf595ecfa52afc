"""Baseline `q1` (sage-ptq.md section 4, llama.cpp Q1_0 style): sign x one FP16 scale per block of the row.

Blocks of 128 weights (fixed, as in Q1_0) run along the input dimension; each block's scale is its mean |w|,
the scale that minimises the block's squared error for fixed signs. Stored: `sign` uint32 (out, ceil(in/32))
in FORMAT.md bit order and `scale` float16 (out, ceil(in/128)). True bits = 1 + 16/128 = 1.125 when in is a
multiple of 128 (a short last block pays a whole scale). Paper-style bits count the same: nothing is left out.
"""

from __future__ import annotations

import time

import numpy as np

from sagekit.quant.pack import pack_bits, unpack_bits
from sagekit.quant.rtn import PackedSignScale, matrix_stats, plus_minus
from sagekit.quant.stats import MatrixStats

BLOCK = 128


def n_blocks(in_: int) -> int:
    return (in_ + BLOCK - 1) // BLOCK


class PackedQ1(PackedSignScale):
    @staticmethod
    def scale_shape(out: int, in_: int) -> tuple[int, ...]:
        return (out, n_blocks(in_))

    def unpack(self) -> np.ndarray:
        in_ = self.shape[1]
        per_column = np.repeat(self.scale.astype(np.float32), BLOCK, axis=1)[:, :in_]
        return plus_minus(unpack_bits(self.sign, in_)) * per_column


def fit(w: np.ndarray, h: np.ndarray | None = None) -> tuple[PackedQ1, np.ndarray]:
    """(packed, the quantiser's own W_hat): sign and block mean |w|; h is ignored (weights only)."""
    w = np.asarray(w, dtype=np.float32)
    out, in_ = w.shape
    nb = n_blocks(in_)
    padded = np.zeros((out, nb * BLOCK), dtype=np.float32)
    padded[:, :in_] = np.abs(w)
    counts = np.minimum(BLOCK, in_ - BLOCK * np.arange(nb)).astype(np.float32)
    scale = (padded.reshape(out, nb, BLOCK).sum(axis=2) / counts).astype(np.float16)
    per_column = scale.astype(np.float32)[:, np.arange(in_) // BLOCK]
    w_hat = np.where(w >= 0, np.float32(1), np.float32(-1)) * per_column
    return PackedQ1.from_arrays({"sign": pack_bits(w >= 0), "scale": scale}, w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "") -> tuple[PackedQ1, MatrixStats]:
    """Paper-style bits: weight bits 1, scale bits 16 per block (llama.cpp's 1.125 at whole blocks)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h)
    nb = n_blocks(w.shape[1])
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0, 16.0 * nb / w.shape[1], t0, groups=nb)

"""Baseline `q1` (sage-ptq.md section 4, llama.cpp Q1_0 style): sign x one FP16 scale per block of the row.

Blocks of 128 weights (fixed, as in Q1_0) run along the input dimension; each block's scale is its mean |w|,
the scale that minimises the block's squared error for fixed signs. The stored layout is
sagekit.format.sign_scale.PackedQ1: true bits = 1 + 16/128 = 1.125 when in is a multiple of 128 (a short
last block pays a whole scale). Paper-style bits count the same: nothing is left out.
"""

from __future__ import annotations

import time

import numpy as np

from sagekit.format.bits import pack_bits
from sagekit.format.sign_scale import Q1_BLOCK, PackedQ1, q1_blocks
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant.registry import Method, NoKnobs


def fit(w: np.ndarray, h: np.ndarray | None = None) -> tuple[PackedQ1, np.ndarray]:
    """(packed, the quantiser's own W_hat): sign and block mean |w|; h is ignored (weights only)."""
    w = np.asarray(w, dtype=np.float32)
    out, in_ = w.shape
    nb = q1_blocks(in_)
    padded = np.zeros((out, nb * Q1_BLOCK), dtype=np.float32)
    padded[:, :in_] = np.abs(w)
    counts = np.minimum(Q1_BLOCK, in_ - Q1_BLOCK * np.arange(nb)).astype(np.float32)
    scale = (padded.reshape(out, nb, Q1_BLOCK).sum(axis=2) / counts).astype(np.float16)
    per_column = scale.astype(np.float32)[:, np.arange(in_) // Q1_BLOCK]
    w_hat = np.where(w >= 0, np.float32(1), np.float32(-1)) * per_column
    return PackedQ1.from_arrays({"sign": pack_bits(w >= 0), "scale": scale}, w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "") -> tuple[PackedQ1, MatrixStats]:
    """Paper-style bits: weight bits 1, scale bits 16 per block (llama.cpp's 1.125 at whole blocks)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h)
    nb = q1_blocks(w.shape[1])
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0, 16.0 * nb / w.shape[1], t0, groups=nb)


METHOD = Method(name="q1", layout="q1", knobs=NoKnobs)

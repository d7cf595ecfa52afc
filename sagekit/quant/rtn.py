"""Baseline `rtn` (sage-ptq.md section 4): w_hat = sign(w) * mean|w| of its row, the plainest 1-bit scheme.

The stored layout is sagekit.format.sign_scale.PackedRTN: true bits = 1 + 16/in when in is a multiple of 32.
Paper-style bits count the same two things (weight bits 1, scale bits 16/in): nothing is left out.
"""

from __future__ import annotations

import time

import numpy as np

from sagekit.format.bits import pack_bits
from sagekit.format.sign_scale import PackedRTN
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant.registry import Method, NoKnobs


def fit(w: np.ndarray, h: np.ndarray | None = None) -> tuple[PackedRTN, np.ndarray]:
    """(packed, the quantiser's own W_hat): sign and row mean |w|; h is ignored (RTN uses the weights only)."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).mean(axis=1).astype(np.float16)
    w_hat = np.where(w >= 0, np.float32(1), np.float32(-1)) * scale.astype(np.float32)[:, None]
    return PackedRTN.from_arrays({"sign": pack_bits(w >= 0), "scale": scale}, w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "") -> tuple[PackedRTN, MatrixStats]:
    """Paper-style bits: weight bits 1, scale bits 16/in (the one FP16 scale per row)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h)
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0, 16.0 / w.shape[1], t0)


METHOD = Method(name="rtn", layout="rtn", knobs=NoKnobs)

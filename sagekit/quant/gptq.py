"""Baseline `gptq` (Frantar et al., ICLR 2023): the standard calibrated peer of the grid recipe.

Plain GPTQ as its reference code runs it: columns in act-order (descending Hessian diagonal), groups of
`group` (64) consecutive columns in that order, each with an asymmetric min-max grid of 2^bits levels per
row (FP16 scale, integer zero point), set when the quantiser reaches the group's first column (so it sees
the error already pushed onto the group); each column's rounding error moves onto the later columns
through U, the upper Cholesky factor of H^-1, with lazy updates between blocks of 128 columns.

Stored as sagekit.format.gptq.PackedGPTQ. True bits = B + 24/group + 16/out (+ padding): 2.375 at B = 2, group 64, before the perm's share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
import numpy as np

from sagekit.format.bits import pack_bits
from sagekit.format.gptq import MAX_IN, PackedGPTQ
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant.hessian import inverse_hessian_factor
from sagekit.quant.registry import Method

GROUP = 64
BLOCK = 128


def _group_grid(wg: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row FP16 scale and integer zero of the min-max grid over a group's current weights."""
    lo, hi = np.minimum(wg.min(axis=1), 0), np.maximum(wg.max(axis=1), 0)
    scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1))
    zero = np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def fit(w: np.ndarray, h: np.ndarray, bits: int = 4, group: int = GROUP,
        damp: float = 0.01) -> tuple[PackedGPTQ, np.ndarray]:
    """(packed, its W_hat); GPTQ's column loop in act-order with per-group grids set as they are reached."""
    out, in_ = w.shape
    if in_ > MAX_IN:
        raise ValueError(f"in = {in_} columns exceed the uint16 act-order permutation")
    maxq = (1 << bits) - 1
    perm = np.argsort(-np.diag(h), kind="stable")
    u, dead = inverse_hessian_factor(np.asarray(h)[np.ix_(perm, perm)], damp)
    wp = np.array(w, dtype=np.float32)[:, perm]
    wp[:, dead] = 0
    ng = -(-in_ // group)
    scale, zero = np.zeros((out, ng), np.float32), np.zeros((out, ng), np.float32)
    q = np.zeros((out, in_), np.int64)
    for st in range(0, in_, BLOCK):
        ed = min(st + BLOCK, in_)
        err = np.zeros((out, ed - st), np.float32)
        for j in range(st, ed):
            if j % group == 0:
                g = j // group
                scale[:, g], zero[:, g] = _group_grid(wp[:, j:min(j + group, in_)], maxq)
            g = j // group
            q[:, j] = np.clip(np.round(wp[:, j] / scale[:, g] + zero[:, g]), 0, maxq)
            err[:, j - st] = (wp[:, j] - scale[:, g] * (q[:, j] - zero[:, g])) / u[j, j]
            wp[:, j + 1:ed] -= np.outer(err[:, j - st], u[j, j + 1:ed])
        wp[:, ed:] -= err @ u[st:ed, ed:]
    codes = np.stack([pack_bits(((q >> k) & 1).astype(bool)) for k in range(bits)])
    packed = PackedGPTQ.from_arrays({"codes": codes, "scale": scale.astype(np.float16),
                                     "zero": zero.astype(np.uint8), "perm": perm.astype(np.uint16)}, (out, in_))
    return packed, packed.unpack()


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "", bits: int = 4, group: int = GROUP,
             damp: float = 0.01) -> tuple[PackedGPTQ, MatrixStats]:
    """Paper-style bits: GPTQ's own count, bits + 16/group for the scale (the zero point and act-order left out)."""
    if h is None:
        raise ValueError("gptq needs a calibration Hessian")
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h, bits, group, damp)
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, float(bits), 16.0 / group, t0)


@dataclass(frozen=True)
class GPTQKnobs:
    bits: int = 4
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean


METHOD = Method(name="gptq", layout="gptq", knobs=GPTQKnobs, calibration="required")

"""Baseline `pbllm` (PB-LLM, Shang et al., ICLR 2024): partial binarisation with GPTQ, every stored byte counted.

As PB-LLM's GPTQ variant does: the salient set is the top `fraction` (default 10%) of all entries by OBS
saliency w^2 / U_jj^2, fixed up front on the original weights; salient entries are stored as 8-bit
per-channel asymmetric integers (scale and zero point from the row's min/max, as GPTQ's quantiser); the rest
are binarised as mean + scale * sign with a per-row mean and scale (mean |w - mean|) over the row's
non-salient entries. Columns are then quantised one at a time, left to right, each column's error spread
over the later columns through U (full GPTQ: hessian.gptq_columns inside blocks, hessian.compensate across).

The stored layout is sagekit.format.pbllm.PackedPBLLM. Paper-style bits are PB-LLM's own count,
1 + fraction x (8 - 1) (1.7 at 10%), with no scale bits: it leaves out the positions of the salient entries and
the per-row parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sagekit.format.bits import pack_bits
from sagekit.format.pbllm import PackedPBLLM, decode, position_arrays
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant.hessian import compensate, gptq_columns, inverse_hessian_factor, saliency
from sagekit.quant.registry import Method

BLOCK = 128
BITS = 8
MAXQ = (1 << BITS) - 1
FRACTION = 0.1


def _row_params(w: np.ndarray, salient: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sal_scale, sal_zero, mean, scale) per row, rounded to what is stored (float16, uint8)."""
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    flat = (lo == 0) & (hi == 0)
    lo, hi = np.where(flat, -1.0, lo), np.where(flat, 1.0, hi)
    sal_scale = ((hi - lo) / MAXQ).astype(np.float16)
    sal_zero = np.clip(np.round(-lo / sal_scale.astype(np.float32)), 0, MAXQ).astype(np.uint8)
    binary = ~salient
    count = np.maximum(binary.sum(axis=1), 1)
    mean = np.where(binary, w, 0.0).sum(axis=1) / count
    scale = np.where(binary, np.abs(w - mean[:, None]), 0.0).sum(axis=1) / count
    return sal_scale, sal_zero, mean.astype(np.float16), scale.astype(np.float16)


def fit(w: np.ndarray, h: np.ndarray | None, fraction: float = FRACTION, damp: float = 0.01,
        propagate: bool = True) -> tuple[PackedPBLLM, np.ndarray]:
    """(packed, the quantiser's own W_hat) for weight w (out, in) and layer-input Hessian h (in, in).

    propagate=False quantises every column of the original weights (no GPTQ updates): the ablation.
    """
    if h is None:
        raise ValueError("pbllm needs the calibration Hessian of the layer's inputs")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: {fraction} is outside [0, 1]")
    w = np.asarray(w, dtype=np.float32)
    u, dead = inverse_hessian_factor(h, damp)
    work = w.copy()
    work[:, dead] = 0.0
    nnz = int(round(fraction * w.size))
    salient = np.zeros(w.size, dtype=bool)
    if nnz:
        salient[np.argpartition(-saliency(work, u).ravel(), nnz - 1)[:nnz]] = True
    salient = salient.reshape(w.shape)
    sal_scale, sal_zero, mean, scale = _row_params(work, salient)
    ss, sz, m, s = (a.astype(np.float32) for a in (sal_scale, sal_zero, mean, scale))
    qint = np.zeros(w.shape, dtype=np.uint8)
    sign = np.zeros(w.shape, dtype=bool)

    def column(j: int, x: np.ndarray) -> np.ndarray:
        qint[:, j] = np.clip(np.round(x / ss) + sz, 0, MAXQ)
        sign[:, j] = x - m >= 0
        return decode(salient[:, j], qint[:, j], sign[:, j], ss, sal_zero, m, s)

    def block(wb: np.ndarray, st: int) -> np.ndarray:
        ub = u[st:st + wb.shape[1], st:st + wb.shape[1]]
        return gptq_columns(wb, ub, lambda i, x: column(st + i, x), propagate)

    w_hat = compensate(work, u, block, BLOCK, propagate)
    arrays = {"sign": pack_bits(sign[~salient][None, :])[0], **position_arrays(salient),
              "sal_val": qint[salient], "sal_scale": sal_scale, "sal_zero": sal_zero, "mean": mean, "scale": scale}
    return PackedPBLLM.from_arrays(arrays, w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None, name: str = "", fraction: float = FRACTION, damp: float = 0.01,
             propagate: bool = True) -> tuple[PackedPBLLM, MatrixStats]:
    """fit() plus the report row; paper-style bits 1 + 7 x fraction, PB-LLM's count (see the module docstring)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h, fraction, damp, propagate)
    r = packed.sal_val.shape[0] / w.size
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0 + r * (BITS - 1), 0.0, t0, salient_fraction=r)


@dataclass(frozen=True)
class PBLLMKnobs:
    fraction: float = field(default=FRACTION, metadata={"option": "pbllm_fraction"})  # kept as 8-bit integers
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean


METHOD = Method(name="pbllm", layout="pbllm", knobs=PBLLMKnobs, calibration="required")

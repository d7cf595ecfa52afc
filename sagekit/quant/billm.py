"""Baseline `billm` (BiLLM, Huang et al., ICML 2024) on a calibration Hessian, with every stored byte counted.

Per block of 128 input columns, left to right:
1. Salient columns are those with the largest OBS saliency sum_r w^2 / U_jj^2 (U: upper Cholesky factor of
   H^-1); their count k in 1..max_cols-1 (BiLLM's up_lim = 50) is searched per block.
2. Salient columns get binary residual approximation of order 2 per row: mean m1 and scale a1 over the row's
   salient entries of the block, then m2, a2 over the residual: w_hat = m1 + a1 s1 + m2 + a2 s2.
3. The other entries split by |w| at a break point, searched over the 10th..90th percentiles in steps of 1
   (as BiLLM), into a small and a large group, each binarised with its own per-row mean and scale.
4. The block's error is pushed onto the later blocks through U (hessian.compensate).
Both searches minimise the block's OBS loss sum (w - w_hat)^2 / U_jj^2, the quantity compensation works on
(BiLLM's code measures the MSE of the saliency matrix itself). While k is searched, the non-salient part is
modelled as one order-2 group, as in BiLLM's code, so that the two searches stay one-dimensional.

The stored layout is sagekit.format.billm.PackedBiLLM (true bits near 2.9). Paper-style bits are BiLLM's own
count: 1 + S/in (a second bit on salient weights) and no scale bits; it leaves out the group bitmap, the column
flags and every mean and scale, which is how the paper reaches "1.08 bits".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numba
import numpy as np

from sagekit.format.billm import BLOCK, PackedBiLLM, decode_block, n_blocks
from sagekit.format.bits import pack_bits
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant.hessian import compensate, inverse_hessian_factor
from sagekit.quant.registry import Method

MAX_COLS = 50  # BiLLM's up_lim: at most 49 salient columns per block
PERCENTILES = np.linspace(0.10, 0.90, 81)


@numba.njit(cache=True)
def _residual_error(row: np.ndarray, cw: np.ndarray, lo: int, hi: int, order: int, buf: np.ndarray) -> float:
    """Weighted squared error of an order-`order` residual binarisation of row[lo:hi] (one mean, one scale each)."""
    n = hi - lo
    if n <= 0:
        return 0.0
    for j in range(n):
        buf[j] = row[lo + j]
    for _ in range(order):
        m = 0.0
        for j in range(n):
            m += buf[j]
        m /= n
        a = 0.0
        for j in range(n):
            a += abs(buf[j] - m)
        a /= n
        for j in range(n):
            d = buf[j] - m
            buf[j] = d - a if d >= 0 else d + a
    e = 0.0
    for j in range(n):
        e += cw[lo + j] * buf[j] * buf[j]
    return e


@numba.njit(parallel=True, cache=True)
def _count_errors(wp: np.ndarray, cwp: np.ndarray, kmax: int) -> np.ndarray:
    """Block error for k = 1..kmax salient columns (columns already sorted by saliency, most salient first)."""
    rows, n = wp.shape
    errs = np.zeros((rows, kmax))
    for r in numba.prange(rows):
        buf = np.empty(n)
        for k in range(1, kmax + 1):
            errs[r, k - 1] = _residual_error(wp[r], cwp, 0, k, 2, buf) + _residual_error(wp[r], cwp, k, n, 2, buf)
    return errs.sum(axis=0)


@numba.njit(parallel=True, cache=True)
def _split_errors(wp: np.ndarray, cwp: np.ndarray, k: int, breaks: np.ndarray) -> np.ndarray:
    """Error of the non-salient columns wp[:, k:] split at each break point into two order-1 groups."""
    rows, n = wp.shape
    errs = np.zeros((rows, len(breaks)))
    for r in numba.prange(rows):
        row = wp[r]
        for t in range(len(breaks)):
            bp = breaks[t]
            s0, s1, c0, c1 = 0.0, 0.0, 0, 0
            for j in range(k, n):
                if abs(row[j]) >= bp:
                    s1 += row[j]
                    c1 += 1
                else:
                    s0 += row[j]
                    c0 += 1
            m0, m1 = s0 / max(c0, 1), s1 / max(c1, 1)
            a0, a1 = 0.0, 0.0
            for j in range(k, n):
                if abs(row[j]) >= bp:
                    a1 += abs(row[j] - m1)
                else:
                    a0 += abs(row[j] - m0)
            a0, a1 = a0 / max(c0, 1), a1 / max(c1, 1)
            e = 0.0
            for j in range(k, n):
                big = abs(row[j]) >= bp
                m, a = (m1, a1) if big else (m0, a0)
                d = row[j] - m
                d = d - a if d >= 0 else d + a
                e += cwp[j] * d * d
            errs[r, t] = e
    return errs.sum(axis=0)


def _residual_fit(x: np.ndarray, mask: np.ndarray, order: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """BiLLM's binary residual approximation per row over the masked entries: (mean, scale, sign bits) per order."""
    count = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float64)
    r = np.where(mask, x, 0.0).astype(np.float64)
    fits = []
    for _ in range(order):
        m = r.sum(axis=1, keepdims=True) / count
        dev = np.where(mask, r - m, 0.0)
        a = np.abs(dev).sum(axis=1, keepdims=True) / count
        s = dev >= 0
        fits.append((m[:, 0], a[:, 0], s))
        r = np.where(mask, dev - np.where(s, a, -a), 0.0)
    return fits


@dataclass
class _Codes:
    """The whole matrix's bits and parameters, filled block by block."""

    s1: np.ndarray
    s2: np.ndarray
    large: np.ndarray
    sal: np.ndarray
    sal_mean: np.ndarray
    sal_scale: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def empty(cls, out: int, in_: int) -> _Codes:
        nb = n_blocks(in_)
        bits = lambda: np.zeros((out, in_), dtype=bool)  # noqa: E731
        return cls(bits(), bits(), bits(), np.zeros(in_, dtype=bool), np.zeros((out, nb), np.float16),
                   np.zeros((out, nb, 2), np.float16), np.zeros((out, nb, 2), np.float16),
                   np.zeros((out, nb, 2), np.float16))

    def pack(self, shape: tuple[int, int]) -> PackedBiLLM:
        return PackedBiLLM.from_arrays({
            "sal_cols": pack_bits(self.sal[None, :])[0], "sign": pack_bits(self.s1),
            "sign2": pack_bits(self.s2[:, self.sal]), "group": pack_bits(self.large[:, ~self.sal]),
            "sal_mean": self.sal_mean, "sal_scale": self.sal_scale, "mean": self.mean, "scale": self.scale}, shape)


def _quantize_block(wb: np.ndarray, d: np.ndarray, max_cols: int, codes: _Codes, st: int) -> np.ndarray:
    """Structure search, fit and decode of one block (writes its codes); returns the block's W_hat."""
    out, n = wb.shape
    b, c = st // BLOCK, slice(st, st + n)
    cw = 1.0 / d.astype(np.float64) ** 2
    order = np.argsort(-((wb.astype(np.float64) ** 2).sum(axis=0) * cw), kind="stable")
    wp, cwp = np.ascontiguousarray(wb[:, order], dtype=np.float64), np.ascontiguousarray(cw[order])
    k = 1 + int(np.argmin(_count_errors(wp, cwp, min(max_cols - 1, n))))
    sal = np.zeros(n, dtype=bool)
    sal[order[:k]] = True
    sal_mask = np.broadcast_to(sal[None, :], wb.shape)
    large = np.zeros(wb.shape, dtype=bool)
    if k < n:
        breaks = np.quantile(np.abs(wp[:, k:]), PERCENTILES)
        bp = breaks[int(np.argmin(_split_errors(wp, cwp, k, breaks)))]
        large = (np.abs(wb) >= bp) & ~sal_mask
    (m1, a1, s1_sal), (m2, a2, s2) = _residual_fit(wb, sal_mask, 2)
    (m_small, a_small, s_small), = _residual_fit(wb, ~sal_mask & ~large, 1)
    (m_large, a_large, s_large), = _residual_fit(wb, large, 1)
    codes.sal[c] = sal
    codes.s1[:, c] = np.where(sal_mask, s1_sal, np.where(large, s_large, s_small))
    codes.s2[:, c] = s2 & sal_mask
    codes.large[:, c] = large
    codes.sal_mean[:, b] = m1 + m2
    codes.sal_scale[:, b] = np.stack([a1, a2], axis=1)
    codes.mean[:, b] = np.stack([m_small, m_large], axis=1)
    codes.scale[:, b] = np.stack([a_small, a_large], axis=1)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    return decode_block(codes.s1[:, c], codes.s2[:, c], large, sal, f32(codes.sal_mean[:, b]),
                        f32(codes.sal_scale[:, b]), f32(codes.mean[:, b]), f32(codes.scale[:, b]))


def fit(w: np.ndarray, h: np.ndarray | None, max_cols: int = MAX_COLS, damp: float = 0.01,
        propagate: bool = True) -> tuple[PackedBiLLM, np.ndarray]:
    """(packed, the quantiser's own W_hat) for weight w (out, in) and layer-input Hessian h (in, in).

    propagate=False quantises every block of the original weights (no error compensation): the ablation.
    """
    if h is None:
        raise ValueError("billm needs the calibration Hessian of the layer's inputs")
    w = np.asarray(w, dtype=np.float32)
    u, dead = inverse_hessian_factor(h, damp)
    work = w.copy()
    work[:, dead] = 0.0  # inputs that are always 0: the weight cannot matter, GPTQ zeroes it
    codes = _Codes.empty(*w.shape)
    d = np.diag(u)
    w_hat = compensate(work, u, lambda wb, st: _quantize_block(wb, d[st:st + wb.shape[1]], max_cols, codes, st),
                       BLOCK, propagate)
    return codes.pack(w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None, name: str = "", max_cols: int = MAX_COLS, damp: float = 0.01,
             propagate: bool = True) -> tuple[PackedBiLLM, MatrixStats]:
    """fit() plus the report row; paper-style bits 1 + S/in, BiLLM's count (see the module docstring)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h, max_cols, damp, propagate)
    s, in_ = int(packed.salient_columns.sum()), w.shape[1]
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0 + s / in_, 0.0, t0, salient_fraction=s / in_,
                                groups=3)


@dataclass(frozen=True)
class BiLLMKnobs:
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean


METHOD = Method(name="billm", layout="billm", knobs=BiLLMKnobs, calibration="required")

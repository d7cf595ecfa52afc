"""Dual-mode quantiser: sign x one scalar per |w| group at every position, plus a sparse b-bit
correction at salient positions with one scale per row (the storage contract of docs/FORMAT.md).

The unsalient part only depends on |w| against the thresholds, so the alternating refinement runs on
prefix sums of sorted |w| in O(G log n) per step; the threshold search reuses the sort via DualPrep.
"""

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from sagekit.quant.saliency import salient_count

_RATIOS = np.linspace(0.5, 1.5, 17)  # scale candidates as multiples of max|r| / qmax; > 1 helps rows with few salient


@dataclass
class DualMode:
    sign: np.ndarray  # bool (out, in), True where w >= 0
    gid: np.ndarray  # uint8 (out, in)
    alpha: np.ndarray  # float32 (G,), ascending, float16-representable
    boundaries: np.ndarray  # float32 (G-1,), group g is boundaries[g-1] <= |w| < boundaries[g]
    sal_ptr: np.ndarray  # int32 (out+1,)
    sal_idx: np.ndarray  # int32 (nnz,)
    sal_val: np.ndarray  # int8 (nnz,)
    sal_scale: np.ndarray  # float32 (out,), float16-representable
    rel_error: float


@dataclass(frozen=True)
class DualPrep:
    """What the threshold search reuses across calls on one matrix: sorting |w| once is the O(n log n) part."""

    w: np.ndarray  # float32 (out, in), C-contiguous
    order: np.ndarray  # saliency order of w
    abs_sorted: np.ndarray  # float32 ascending |w|
    cum1: np.ndarray  # float64 prefix sums of abs_sorted
    cum2: np.ndarray  # float64 prefix sums of abs_sorted**2
    norm2: float


@njit(cache=True)
def _f16(x: float) -> float:
    """x rounded as np.float32(x).astype(np.float16) rounds it (nearest, ties to even), as a float."""
    v = np.float64(np.float32(x))
    a = abs(v)
    if a == 0.0 or not np.isfinite(a):
        return v
    if a >= 65520.0:
        return math.copysign(np.inf, v)
    e = math.frexp(a)[1]
    q = max(e - 11, -24)  # exponent of the float16 ulp at a: 11 significant bits, subnormal below 2**-14
    return math.copysign(np.rint(a * 2.0 ** (-q)) * 2.0**q, v)


def _prefix(sorted_abs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = sorted_abs.astype(np.float64)
    return np.concatenate(([0.0], np.cumsum(x))), np.concatenate(([0.0], np.cumsum(x * x)))


@njit(cache=True)
def _fit_alpha(
    abs_all: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    abs_sal: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    bounds: np.ndarray,
) -> tuple[np.ndarray, float]:
    """float16 alphas (mean unsalient |w| per group) and the unsalient squared error they give.

    Unsalient stats are all-entries stats minus salient ones, each a prefix-sum difference. A group
    with no unsalient member keeps the centre of its interval, so it stays ascending and never NaN, and
    can win members back at the next boundary move.
    """
    g_count = bounds.shape[0] + 1
    alpha = np.empty(g_count)
    err = 0.0
    pa, ps = 0, 0
    for g in range(g_count):
        if g < g_count - 1:
            ia = np.searchsorted(abs_all, bounds[g])
            js = np.searchsorted(abs_sal, bounds[g])
        else:
            ia, js = abs_all.shape[0], abs_sal.shape[0]
        cnt = (ia - pa) - (js - ps)
        if cnt > 0:
            m1 = (c1[ia] - c1[pa]) - (s1[js] - s1[ps])
            m2 = (c2[ia] - c2[pa]) - (s2[js] - s2[ps])
            a = _f16(m1 / cnt)
            err += m2 - 2.0 * a * m1 + cnt * a * a
        else:
            lo = np.float64(bounds[g - 1]) if g > 0 else 0.0
            hi = np.float64(bounds[g]) if g < g_count - 1 else lo
            a = _f16(0.5 * (lo + hi))
        alpha[g] = a
        pa, ps = ia, js
    return alpha, max(err, 0.0)


@njit(cache=True)
def _refine(
    abs_all: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    abs_sal: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    bounds: np.ndarray,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd-Max on unsalient |w|: thresholds to midpoints of alphas, alphas to group means, while the
    error strictly falls; the state returned is the best seen, so refinement never adds error."""
    best_b = bounds.copy()
    best_a, best_e = _fit_alpha(abs_all, c1, c2, abs_sal, s1, s2, best_b)
    for _ in range(max_iter):
        nb = np.empty_like(best_b)
        for g in range(nb.shape[0]):
            nb[g] = np.float32(0.5 * (best_a[g] + best_a[g + 1]))
        na, ne = _fit_alpha(abs_all, c1, c2, abs_sal, s1, s2, nb)
        if not ne < best_e:
            break
        best_b, best_a, best_e = nb, na, ne
    return best_b, best_a, best_e


@njit(cache=True)
def _row_error(wv: np.ndarray, bv: np.ndarray, r: np.ndarray, s: float, qmax: int, q: np.ndarray) -> float:
    """Salient error of one row at scale s, with W_hat formed in float32 exactly as dequantize does."""
    err = 0.0
    s32 = np.float32(s)
    for j in range(r.shape[0]):
        qj = 0.0 if s == 0.0 else min(max(np.rint(r[j] / s), -qmax), qmax)
        q[j] = qj
        wh = bv[j] + np.float32(qj) * s32
        err += (np.float64(wv[j]) - np.float64(wh)) ** 2
    return err


@njit(cache=True)
def _salient(
    wflat: np.ndarray,
    idx: np.ndarray,
    ptr: np.ndarray,
    bounds: np.ndarray,
    alpha: np.ndarray,
    qmax: int,
    ratios: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-row scale and int corrections for the salient entries (flat `idx`, CSR `ptr`), and their error.

    Candidates are float16-rounded multiples of max|r|/qmax, then one least-squares step from the
    best; s = 0 (no correction) is always a candidate, so a row never does worse than the binary part.
    """
    rows = ptr.shape[0] - 1
    q_out = np.zeros(idx.shape[0], dtype=np.int8)
    scale = np.zeros(rows, dtype=np.float32)
    total = 0.0
    for row in range(rows):
        lo, hi = ptr[row], ptr[row + 1]
        m = hi - lo
        if m == 0:
            continue
        wv = np.empty(m, dtype=np.float32)
        bv = np.empty(m, dtype=np.float32)
        r = np.empty(m)
        amax = 0.0
        for j in range(m):
            x = wflat[idx[lo + j]]
            g = 0
            while g < bounds.shape[0] and abs(x) >= bounds[g]:
                g += 1
            b = np.float32(alpha[g]) if x >= 0 else np.float32(-alpha[g])
            wv[j], bv[j] = x, b
            r[j] = np.float64(x) - np.float64(b)
            amax = max(amax, abs(r[j]))
        q = np.empty(m)
        best_s = 0.0
        best_e = _row_error(wv, bv, r, 0.0, qmax, q)
        for t in ratios:
            s = _f16(amax / qmax * t)
            if s > 0.0:
                e = _row_error(wv, bv, r, s, qmax, q)
                if e < best_e:
                    best_s, best_e = s, e
        if best_s > 0.0:
            _row_error(wv, bv, r, best_s, qmax, q)
            qq = (q * q).sum()
            if qq > 0.0:
                s = _f16((r * q).sum() / qq)
                if s > 0.0:
                    e = _row_error(wv, bv, r, s, qmax, q)
                    if e < best_e:
                        best_s, best_e = s, e
        _row_error(wv, bv, r, best_s, qmax, q)
        for j in range(m):
            q_out[lo + j] = np.int8(q[j])
        scale[row] = best_s
        total += best_e
    return q_out, scale, total


def _csr(flat_idx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    counts = np.bincount(flat_idx // shape[1], minlength=shape[0])
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def _check_bounds(boundaries: np.ndarray) -> np.ndarray:
    b = np.asarray(boundaries, dtype=np.float32).ravel()
    if b.size and (not np.all(np.isfinite(b)) or np.any(np.diff(b) < 0)):
        raise ValueError("boundaries must be finite and ascending")
    return b


def _solve(
    w: np.ndarray, abs_sorted: np.ndarray, c1: np.ndarray, c2: np.ndarray, sal_flat: np.ndarray,
    boundaries: np.ndarray, salient_bits: int, max_iter: int,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray, np.ndarray, float]:
    """Refine, then fit the salient corrections; shared so quantize_dual and dual_error decide alike.

    Refinement judges the unsalient error only, and moving alphas also moves the binary part under the
    salient corrections; if the total error came out worse than at the given thresholds, those win.
    That can only happen when the unsalient gain is below the refined salient error, so the second
    salient fit is rarely paid for.
    """
    if salient_bits < 2:
        raise ValueError("salient_bits must be >= 2")
    wflat = w.ravel()
    abs_sal = np.sort(np.abs(wflat[sal_flat]))
    s1, s2 = _prefix(abs_sal)
    b0 = _check_bounds(boundaries)
    bounds, alpha, unsal_err = _refine(abs_sorted, c1, c2, abs_sal, s1, s2, b0, max_iter)
    ptr = _csr(sal_flat, w.shape)
    qmax = 2 ** (salient_bits - 1) - 1
    q, scale, sal_err = _salient(wflat, sal_flat, ptr, bounds, alpha, qmax, _RATIOS)
    alpha0, unsal0 = _fit_alpha(abs_sorted, c1, c2, abs_sal, s1, s2, b0)
    if unsal0 - unsal_err < sal_err and not np.array_equal(bounds, b0):
        q0, scale0, sal0 = _salient(wflat, sal_flat, ptr, b0, alpha0, qmax, _RATIOS)
        if unsal0 + sal0 < unsal_err + sal_err:
            return b0, alpha0, unsal0, ptr, q0, scale0, sal0
    return bounds, alpha, unsal_err, ptr, q, scale, sal_err


def prepare_dual(w: np.ndarray, order: np.ndarray) -> DualPrep:
    """Sort |w| once per matrix so each dual_error call costs O(k log k + G log n) plus the salient rows."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    abs_sorted = np.sort(np.abs(w).ravel())
    c1, c2 = _prefix(abs_sorted)
    return DualPrep(w, np.asarray(order, dtype=np.int64), abs_sorted, c1, c2, float(c2[-1]))


def dual_error(
    prep: DualPrep, p: float, boundaries: np.ndarray, salient_bits: int = 4, max_iter: int = 20
) -> float:
    """rel_error of quantize_dual(w, salient_mask(order, w.shape, p), boundaries, ...), without building W_hat.

    Agrees with it to float64 round-off (the unsalient error comes from prefix sums, not a dense pass).
    """
    k = salient_count(p, prep.w.size)
    sal_flat = np.sort(prep.order[:k])
    *_, unsal_err, _, _, _, sal_err = _solve(
        prep.w, prep.abs_sorted, prep.cum1, prep.cum2, sal_flat, boundaries, salient_bits, max_iter
    )
    return (unsal_err + sal_err) / prep.norm2 if prep.norm2 > 0 else 0.0


def quantize_dual(
    w: np.ndarray, salient: np.ndarray, boundaries: np.ndarray, salient_bits: int = 4, max_iter: int = 20
) -> DualMode:
    """Quantise `w`: binary part everywhere with G = len(boundaries) + 1 groups, b-bit corrections on the
    `salient` mask. A group left with no unsalient member is kept (the caller's bit budget holds) with
    the centre of its |w| interval as alpha: finite, ascending, and able to win members back."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if salient.shape != w.shape:
        raise ValueError(f"salient mask shape {salient.shape} != weight shape {w.shape}")
    abs_sorted = np.sort(np.abs(w).ravel())
    c1, c2 = _prefix(abs_sorted)
    sal_flat = np.flatnonzero(salient.ravel())
    bounds, alpha, _, ptr, q, scale, _ = _solve(w, abs_sorted, c1, c2, sal_flat, boundaries, salient_bits, max_iter)
    d = DualMode(
        sign=w >= 0,
        gid=np.searchsorted(bounds, np.abs(w), side="right").astype(np.uint8),
        alpha=alpha.astype(np.float32),
        boundaries=bounds,
        sal_ptr=ptr.astype(np.int32),
        sal_idx=(sal_flat % w.shape[1]).astype(np.int32),
        sal_val=q,
        sal_scale=scale,
        rel_error=0.0,
    )
    norm2 = float(c2[-1])
    d.rel_error = float(np.sum((w.astype(np.float64) - dequantize(d)) ** 2)) / norm2 if norm2 > 0 else 0.0
    return d


def dequantize(d: DualMode) -> np.ndarray:
    """The exact W_hat the stored arrays describe, in float32."""
    mag = d.alpha[d.gid]
    w_hat = np.where(d.sign, mag, -mag).astype(np.float32)
    rows = np.repeat(np.arange(d.sal_ptr.shape[0] - 1), np.diff(d.sal_ptr))
    w_hat[rows, d.sal_idx] += d.sal_val.astype(np.float32) * d.sal_scale[rows]
    return w_hat

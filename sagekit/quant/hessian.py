"""Second-order machinery shared by the calibrated baselines (BiLLM, PB-LLM): OBC/GPTQ error compensation.

The layer-wise objective is ||X W^T - X W_hat^T||^2 with H = 2/n X^T X. GPTQ works with U, the upper
Cholesky factor of H^-1 (H^-1 = U^T U): quantising columns left to right, the error of a column (or of a
block of columns) is pushed onto the columns to its right through the rows of U, which is the optimal
least-squares correction of what is still unquantised. `U[j, j]` also gives the OBS saliency of a
weight, w^2 / U_jj^2, which both baselines use to pick the weights they treat specially.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def linalg():
    """scipy.linalg, imported on first use: only compression needs it, loading a packed folder must not."""
    import scipy.linalg

    return scipy.linalg


DAMP_RETRIES = 6  # each retry raises the damping tenfold (from 1e-6 when none was asked for): H still gets a factor


def inverse_hessian_factor(h: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U float32 upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1, as GPTQ builds it.

    dead marks the input columns that never saw a non-zero activation; their diagonal is set to 1 so the
    factor exists, and callers zero those weight columns (they cannot affect the calibration output).
    """
    h = np.array(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or not np.isfinite(h).all():
        raise ValueError(f"Hessian must be a finite square matrix, got shape {h.shape}")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(DAMP_RETRIES):
        try:
            d = damp if attempt == 0 else max(damp, 1e-6) * 10.0 ** attempt
            hd = h + d * mean_diag * np.eye(len(h))
            lower = linalg().cholesky(hd, lower=True)
            hinv = linalg().cho_solve((lower, True), np.eye(len(h)))
            return linalg().cholesky(hinv, lower=False).astype(np.float32), dead
        except np.linalg.LinAlgError:
            continue
    raise ValueError("Hessian is not positive definite even with heavy damping (are the calibration inputs broken?)")


def drift_target(w: np.ndarray, h: np.ndarray, cross: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The weight to quantise so that the layer-wise fit matches the FP16 model (GPTAQ's asymmetric calibration).

    GPTQ fits ||X~ W_hat^T - X~ W^T|| on the inputs X~ that the already quantised layers produce; the FP16
    model saw X. Minimising ||X~ W_hat^T - X W^T|| instead is the same problem for the target
    W + W (C - H) (H + damp * mean(diag H) * I)^-1, with H = 2/n X~^T X~ and C = 2/n X^T X~ (the cross term),
    so any Hessian-aware rounding of that target under H minimises the asymmetric objective. The damping
    shrinks the correction, never W: when X~ = X (the first layer) the target is W itself.
    """
    h = np.asarray(h, dtype=np.float64)
    hd = h + damp * float(np.mean(np.diag(h))) * np.eye(len(h))
    correction = linalg().solve(hd, (np.asarray(cross, dtype=np.float64) - h).T, assume_a="pos").T
    w = np.asarray(w, dtype=np.float64)
    return (w + w @ correction).astype(np.float32)


def saliency(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """OBS saliency w^2 / U_jj^2 of every weight: the output error that zeroing it alone would cause."""
    return w.astype(np.float32) ** 2 / np.diag(u)[None, :].astype(np.float32) ** 2


def gptq_columns(w1: np.ndarray, u1: np.ndarray, quantize_column: Callable[[int, np.ndarray], np.ndarray],
                 update: bool = True) -> np.ndarray:
    """GPTQ inside one block: quantise column i of w1, then spread its error over the block's later columns.

    quantize_column(i, current column) -> quantised column. Returns the block's quantised weights.
    """
    w1 = w1.copy()
    q = np.empty_like(w1)
    for i in range(w1.shape[1]):
        q[:, i] = quantize_column(i, w1[:, i])
        if update:
            err = (w1[:, i] - q[:, i]) / u1[i, i]
            w1[:, i + 1:] -= np.outer(err, u1[i, i + 1:])
    return q


def compensate(w: np.ndarray, u: np.ndarray, quantize_block: Callable[[np.ndarray, int], np.ndarray],
               block: int, propagate: bool = True) -> np.ndarray:
    """Quantise blocks of `block` columns left to right; each block's error moves onto the later columns.

    quantize_block(current block weights, first column) -> quantised block (it may run gptq_columns inside).
    The pushed error is (W_block - Q_block) U_bb^-1 (a triangular solve): exactly what GPTQ's column loop
    accumulates, and the optimal correction when the whole block is quantised at once (BiLLM's code
    divides by diag(U_bb) only, an approximation we do not copy). propagate=False quantises every block
    of the original weights with no correction: the ablation the tests compare against.
    """
    w = np.array(w, dtype=np.float32)
    q = np.empty_like(w)
    n = w.shape[1]
    for st in range(0, n, block):
        ed = min(st + block, n)
        qb = quantize_block(w[:, st:ed], st)
        q[:, st:ed] = qb
        if propagate and ed < n:
            err = linalg().solve_triangular(u[st:ed, st:ed], (w[:, st:ed] - qb).T, trans="T", lower=False).T
            w[:, ed:] -= err.astype(np.float32) @ u[st:ed, ed:]
    return q

"""Saliency: the outliers of a matrix's weight distribution, ranked once so any fraction is a prefix."""

import numpy as np


def saliency_order(w: np.ndarray, input_rms: np.ndarray | None = None) -> np.ndarray:
    """Flat indices of `w` by descending z = |w - mean| / std, ties by ascending index.

    The threshold search tries many fractions p; sorting once makes each salient set a prefix.
    Dividing by std does not change the order, so it is skipped (and a constant matrix is no special case).
    With `input_rms` (per input column, from calibration: sqrt of the Hessian's diagonal) the score is
    |w - mean| * rms(x_j), the size of the weight's contribution to the output (Wanda's metric): an
    option beyond the paper, whose authors found magnitude saliency better.
    """
    w64 = np.asarray(w, dtype=np.float64)
    z = np.abs(w64 - w64.mean())
    if input_rms is not None:
        z = z * np.asarray(input_rms, dtype=np.float64)[None, :]
    return np.argsort(-z.ravel(), kind="stable").astype(np.int64)


def salient_count(p: float, size: int) -> int:
    """Number of salient entries for fraction p; the single rounding rule every caller shares."""
    return min(max(int(round(p * size)), 0), size)


def salient_mask(order: np.ndarray, shape: tuple[int, int], p: float) -> np.ndarray:
    """Bool mask of the top round(p * size) entries of `order`."""
    size = int(np.prod(shape))
    mask = np.zeros(size, dtype=bool)
    mask[order[: salient_count(p, size)]] = True
    return mask.reshape(shape)

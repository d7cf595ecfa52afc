"""What every method reports about one quantised matrix: a row of report.json and of a resumable run's
partial store, so its fields are part of what compress writes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class MatrixStats:
    name: str
    shape: tuple[int, int]
    salient_fraction: float
    groups: int
    silhouette_groups: int
    paper_bits: float
    paper_scale_bits: float
    true_bits: float
    rel_error: float
    seconds: float
    nbytes: int


def matrix_stats(name: str, w: np.ndarray, w_hat: np.ndarray, nbytes: int, paper_bits: float, paper_scale_bits: float,
                 t0: float, salient_fraction: float = 0.0, groups: int = 1) -> MatrixStats:
    """The report row of one matrix; relative error is against the original weight."""
    n = w.size
    err = float(np.sum((w.astype(np.float64) - w_hat) ** 2) / max(np.sum(w.astype(np.float64) ** 2), 1e-30))
    return MatrixStats(name=name, shape=(int(w.shape[0]), int(w.shape[1])), salient_fraction=salient_fraction,
                       groups=groups, silhouette_groups=0, paper_bits=paper_bits, paper_scale_bits=paper_scale_bits,
                       true_bits=8.0 * nbytes / n, rel_error=err, seconds=time.perf_counter() - t0, nbytes=nbytes)

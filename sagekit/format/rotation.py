"""Incoherence processing: a seeded orthogonal transform R = A (x) B (a Kronecker product of two small
random orthogonal factors) applied to one side of a weight before it is quantised.

Why: a random rotation spreads outlier rows and columns over every weight, so the rotated weights are
close to Gaussian and one scale per row suffices (QuIP, QuaRot). Why Kronecker factors: they exist for any
size (576 = 24 x 24, 1536 = 32 x 48, 192 = 12 x 16), cost O(n (a + b)) per vector at run time, and are
rebuilt from a 32-bit seed, so the stored matrix pays 4 bytes for its rotation.

Layout: a vector x of length n = a * b is read row-major as an (a, b) matrix X; R x is A X B^T, flattened.
For a weight W (out, n) used as y = W x, the input-side rotation stores W R^T and the run time feeds R x.
It lives in format because the stored seed is part of the sage-grid layout: PackedGrid.unpack undoes R, and
the quantiser (sagekit.quant.sage_grid) applies it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def split(n: int) -> tuple[int, int]:
    """n = a * b with a <= b and a as close to sqrt(n) as divisibility allows (a = 1 for a prime n)."""
    a = int(np.sqrt(n))
    while n % a:
        a -= 1
    return a, n // a


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal), float64."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


@lru_cache(maxsize=64)
def factors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) float64 with A (a, a), B (b, b) orthogonal; the same (n, seed) always gives the same pair."""
    a, b = split(n)
    rng = np.random.default_rng([seed, n])
    return _orthogonal(rng, a), _orthogonal(rng, b)


def matrix(n: int, seed: int) -> np.ndarray:
    """R = A (x) B, float64 (n, n); quantisation time only (the run time applies the factors)."""
    a, b = factors(n, seed)
    return np.kron(a, b)


@lru_cache(maxsize=256)
def factors_as(n: int, seed: int, dtype: np.dtype, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(left, right), C-contiguous, with R x = left X right (or R^T x when inverse), in the activations' dtype:
    what rotate applies, and what the fused decode step (sagekit.kernels.decode_step) reads."""
    a, b = factors(n, seed)
    left, right = (a.T, b) if inverse else (a, b.T)
    return np.ascontiguousarray(left, dtype=dtype), np.ascontiguousarray(right, dtype=dtype)


def _apply(x: np.ndarray, seed: int, inverse: bool) -> np.ndarray:
    left, right = factors_as(x.shape[-1], seed, x.dtype, inverse)
    xm = x.reshape(*x.shape[:-1], left.shape[0], right.shape[0])
    return np.matmul(np.matmul(left, xm), right).reshape(x.shape)


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """R x for every row of x (..., n): A X B^T on each row viewed as (a, b)."""
    return _apply(x, seed, inverse=False)


def unrotate(x: np.ndarray, seed: int) -> np.ndarray:
    """R^T x for every row of x (..., n): A^T X B, the inverse of rotate."""
    return _apply(x, seed, inverse=True)

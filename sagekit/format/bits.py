"""Bit planes as every layout stores them (FORMAT.md bit order): bit b of uint32 word k is column 32k + b,
padding bits 0."""

from __future__ import annotations

import numpy as np


def n_words(in_: int) -> int:
    return (in_ + 31) // 32


def pack_bits(plane: np.ndarray) -> np.ndarray:
    """bool (out, in) -> uint32 (out, ceil(in/32)); bit b of word k is column 32k+b, padding bits 0."""
    out, in_ = plane.shape
    padded = np.zeros((out, n_words(in_) * 32), dtype=bool)
    padded[:, :in_] = plane
    return np.packbits(padded, axis=1, bitorder="little").view("<u4").astype(np.uint32, copy=False)


def unpack_bits(words: np.ndarray, in_: int) -> np.ndarray:
    """uint32 (out, words) -> bool (out, in); the inverse of pack_bits."""
    as_bytes = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)
    return np.unpackbits(as_bytes, axis=1, count=in_, bitorder="little").view(bool)


def plus_minus(bits: np.ndarray) -> np.ndarray:
    """bool -> float32 +1 / -1."""
    return np.where(bits, np.float32(1), np.float32(-1))

"""Field checks every layout's `from_arrays` runs on arrays read from a file, which may be corrupt or hostile:
each failure is a ValueError naming the field, so the reader can say which tensor is bad."""

from __future__ import annotations

import numpy as np


def check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    out, in_ = (int(d) for d in shape)
    if out < 1 or in_ < 1:
        raise ValueError(f"shape: {shape} must be positive")
    return out, in_


def check_arrays(arrays: dict[str, np.ndarray],
                 expect: dict[str, tuple[type, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Exactly the fields of `expect`, each with its dtype and shape; returns contiguous copies-or-views."""
    for name in arrays:
        if name not in expect:
            raise ValueError(f"{name}: not a field of this layout")
    out = {}
    for name, (dtype, shape) in expect.items():
        if name not in arrays:
            raise ValueError(f"{name}: missing")
        a = np.ascontiguousarray(arrays[name])
        if a.dtype != dtype or a.shape != tuple(shape):
            raise ValueError(f"{name}: expected {np.dtype(dtype).name} {tuple(shape)}, got {a.dtype} {a.shape}")
        out[name] = a
    return out


def check_padding(name: str, words: np.ndarray, n_bits: int) -> None:
    """Bits at positions >= n_bits of the last word of every row (of a 2-D plane) must be 0."""
    tail = n_bits % 32
    if words.size and tail and (words[..., -1] & np.uint32(~((1 << tail) - 1) & 0xFFFFFFFF)).any():
        raise ValueError(f"{name}: padding bits are not 0")


def check_finite(name: str, a: np.ndarray, nonnegative: bool = False) -> None:
    f = a.astype(np.float32)
    if not np.isfinite(f).all() or (nonnegative and (f < 0).any()):
        raise ValueError(f"{name}: must be finite{' and non-negative' if nonnegative else ''}")


def check_csr(ptr: np.ndarray, idx: np.ndarray, in_: int) -> None:
    """Per-row sparse positions as every reader relies on them: monotone row pointer, columns in range and
    strictly ascending within a row (shared by every layout that stores salient positions this way)."""
    nnz = idx.shape[0]
    if ptr[0] != 0 or ptr[-1] != nnz or (np.diff(ptr) < 0).any():
        raise ValueError(f"sal_ptr: must rise monotonically from 0 to nnz = {nnz}")
    if nnz and int(idx.max()) >= in_:
        raise ValueError(f"sal_idx: column >= in = {in_}")
    row_start = np.zeros(nnz, dtype=bool)
    row_start[ptr[:-1][ptr[:-1] < nnz]] = True
    if (np.diff(idx.astype(np.int64)) <= 0)[~row_start[1:]].any():
        raise ValueError("sal_idx: columns not strictly ascending within a row")

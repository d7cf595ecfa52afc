"""Per-thread scratch arrays for the prefill kernels, kept between calls and grown on demand.

Why: a fresh array of a few MB costs its page faults on every call (tiles.py's float32 tiles, int8_gemm's
rounded tokens and weight bytes); one per thread keeps concurrent generations apart.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def buffer(name: str, n: int, dtype: type) -> np.ndarray:
    """The first n items of this thread's scratch array `name` (of dtype; a name keeps one dtype)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype=dtype)
        setattr(_local, name, buf)
    return buf[:n]

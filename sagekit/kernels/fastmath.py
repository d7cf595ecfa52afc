"""The CPU kernels' float contract: fast math without reassociation, and the fixed-order sums that keep the
reductions vectorised under it.

Why: Numba builds a parallel kernel twice. The process that compiles it runs one build; the build it stores
in its cache has been optimised by LLVM a second time (numba/numba#10617), which vectorises the remainder
loops the first pass left scalar. With reassociation allowed the two builds add a sum's terms in different
orders, so results depended on whether the cache was warm: a calibrated compress gave other bytes on its
first run than on the next, and the demo model's logits moved by up to 0.13 after a 130-token prompt.
Without reassociation every sum runs in the order its source writes, whichever build runs. Kept: no NaNs or
infinities, no signed zeros, reciprocals, contraction into FMA, approximate functions.

Numba's cache checks only the source file of the kernel it caches: after editing here, clear the cache (the
__pycache__ folders or NUMBA_CACHE_DIR).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from sagekit.kernels.llvm_intrinsics import dot32

FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}  # every fast-math flag but "reassoc"


@njit(cache=True, fastmath=FASTMATH, inline="always")
def ordered_dot(a, b, n):
    """sum_{j<n} a[j] * b[j] in a fixed order: dot32's lanes over the first multiple of 32, then the tail in
    order. a, b: 1-D C-contiguous float32."""
    n32 = n // 32 * 32
    s = dot32(a, b, np.int64(n32))
    for j in range(n32, n):
        s += a[j] * b[j]
    return s


@njit(cache=True, fastmath=FASTMATH, inline="always")
def ordered_sum(a, n):
    """sum_{j<n} a[j] in a fixed order, as ordered_dot."""
    n32 = n // 32 * 32
    s = dot32(a, None, np.int64(n32))
    for j in range(n32, n):
        s += a[j]
    return s

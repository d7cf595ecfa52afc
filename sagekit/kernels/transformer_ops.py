"""CPU transformer ops (Numba) for the float32 forward pass: decode attention, RMSNorm, RoPE and SiLU.

At one token NumPy's and BLAS's per-call costs outweigh the arithmetic of these ops, so each kernel does
the same math as the NumPy path in one call.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from sagekit.kernels.llvm_intrinsics import ROWS, scores16, weighted_rows64

POW2 = np.ldexp(np.float32(1), np.arange(-126, 1)).astype(np.float32)  # 2^n for n = -126..0
EXP_TAYLOR = tuple(np.float32(np.log(2.0) ** k / math.factorial(k)) for k in range(8))


@njit(cache=True, fastmath=True, inline="always")
def _exp_nonpositive(x):
    """exp(x) for x <= 0 without a libm call, so the loop around it vectorises: 2^n from a table times
    2^f by its degree-7 Taylor series on |f| <= 1/2. Absolute error < 1.2e-7 (results are <= 1: about
    one float32 ulp), which is what softmax weights need; the relative error grows to ~3e-6 near x = -87
    with float32's rounding of x log2(e)."""
    t = max(x, np.float32(-87.0)) * np.float32(1.4426950408889634)
    n = np.floor(t + np.float32(0.5))
    f = t - n
    c = EXP_TAYLOR
    p = c[0] + f * (c[1] + f * (c[2] + f * (c[3] + f * (c[4] + f * (c[5] + f * (c[6] + f * c[7]))))))
    return p * POW2[np.int64(n) + 126]


@njit(cache=True, fastmath=True, inline="always")
def attend_head(q, h, k, v, length, p, o):
    """o = softmax(q[h] k^T) v for query head h over positions < length of its KV head (k, v: (S_max, D)).
    p: float32 scratch of at least `length`. Both loops run along D in unit stride."""
    d = q.shape[1]
    blocked = length // ROWS * ROWS if d % ROWS == 0 else 0  # 16 positions at a time, their sums reduced together
    for j0 in range(0, blocked, ROWS):
        scores16(p, np.int64(j0), k, np.int64(j0), q, np.int64(h))
    for j in range(blocked, length):
        s = np.float32(0)
        for e in range(d):
            s += q[h, e] * k[j, e]
        p[j] = s
    top = -np.inf
    for j in range(length):
        top = max(top, p[j])
    total = np.float32(0)
    for j in range(length):
        p[j] = _exp_nonpositive(p[j] - top)
        total += p[j]
    if d % 64 == 0:
        for c0 in range(0, d, 64):
            weighted_rows64(o, np.int64(c0), v, np.int64(c0), p, np.int64(length))
    else:
        o[:] = 0
        for j in range(length):
            for e in range(d):
                o[e] += p[j] * v[j, e]
    o *= np.float32(1) / total


@njit(cache=True, fastmath=True)
def decode_attention(q, keys, values, length, out):
    """One query position over the cache: softmax(q k^T) v per head, grouped-query heads sharing a KV head.

    Layout: q (H, D) f32, already scaled by 1/sqrt(D); keys and values (KV, S_max, D) f32, one layer of the
    cache, positions < length valid; out (H, D) f32. At 3 queries x 64 dims per KV head a BLAS call would
    cost ~10 us of overhead each (measured: 36 us for the whole layer here against 97 us through NumPy at
    544 positions)."""
    rep = q.shape[0] // keys.shape[0]
    p = np.empty(length, dtype=np.float32)
    for h in range(q.shape[0]):
        attend_head(q, h, keys[h // rep], values[h // rep], length, p, out[h])


@njit(cache=True, fastmath=True, inline="always")
def rmsnorm_row(x, weight, eps, out):
    """out = x / rms(x) * weight for one row, in one pass over it. Layout: x, weight, out (dim,) f32."""
    ss = np.float32(0)
    for j in range(x.size):
        ss += x[j] * x[j]
    r = np.float32(1) / np.sqrt(ss / np.float32(x.size) + np.float32(eps))
    for j in range(x.size):
        out[j] = x[j] * r * weight[j]


@njit(cache=True, fastmath=True)
def rmsnorm(x, weight, eps):
    """x / rms(x) * weight per row. Layout: x (T, dim) f32, weight (dim,) f32. NumPy needs seven calls for
    this, ~8 us at one token: a decode step makes 61 of them."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        rmsnorm_row(x[i], weight, eps, out[i])
    return out


@njit(cache=True, fastmath=True, inline="always")
def rope_head(x, cos, sin, out):
    """One head's rotary embedding in the HF layout (dim j paired with j + D/2). Layout: x, cos, sin, out
    (D,) f32, cos and sin the row of x's position."""
    half = x.size // 2
    for j in range(half):
        a, b = x[j], x[j + half]
        out[j] = a * cos[j] - b * sin[j]
        out[j + half] = b * cos[j + half] + a * sin[j + half]


@njit(cache=True, fastmath=True)
def rope(x, cos, sin):
    """Rotary embedding of every head. Layout: x (T, H, D) f32; cos and sin (T, D) f32, the rows of x's
    positions."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            rope_head(x[i, h], cos[i], sin[i], out[i, h])
    return out


@njit(cache=True, fastmath=True, inline="always")
def silu(g):
    """g / (1 + e^-g) from e = e^-|g| (<= 1, so the libm-free exp above serves): g / (1 + e) for g >= 0 and
    g e / (1 + e) below. The NumPy path's silu_mul (model/llama.py) computes the same."""
    e = _exp_nonpositive(-abs(g))
    return (g if g >= 0 else g * e) / (np.float32(1) + e)

"""CPU transformer ops (Numba) for the float32 forward pass: decode attention, the prefill's causal softmax,
RMSNorm, RoPE and SwiGLU.

At one token NumPy's and BLAS's per-call costs outweigh the arithmetic of these ops, and at many NumPy makes a
pass over memory per array call; each kernel does the same math as the NumPy path in one call and one pass.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from sagekit.kernels.fastmath import FASTMATH, ordered_dot, ordered_sum
from sagekit.kernels.llvm_intrinsics import ROWS, pow2, scores16, weighted_rows64

EXP_TAYLOR = tuple(np.float32(np.log(2.0) ** k / math.factorial(k)) for k in range(8))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _larger(a, b):
    return a if a > b else b


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _exp_nonpositive(x):
    """exp(x) for x <= 0 without a libm call, so the loop around it vectorises: 2^n from its exponent bits times
    2^f by its degree-7 Taylor series on |f| <= 1/2. Absolute error < 1.2e-7 (results are <= 1: about
    one float32 ulp), which is what softmax weights need; the relative error grows to ~3e-6 near x = -87
    with float32's rounding of x log2(e)."""
    t = _larger(x, np.float32(-87.0)) * np.float32(1.4426950408889634)
    n = np.floor(t + np.float32(0.5))
    f = t - n
    c = EXP_TAYLOR
    p = c[0] + f * (c[1] + f * (c[2] + f * (c[3] + f * (c[4] + f * (c[5] + f * (c[6] + f * c[7]))))))
    return p * pow2(np.int32(n))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _row_max(row, n):
    """max(row[:n]), n >= 1, in eight running maxima that do not wait on each other: a single running max waits
    on each compare (2.2 against 1.05 ns a float over 512, calls included; neither compiles to vector code)."""
    n8 = n // 8 * 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = row[0]
    for j in range(0, n8, 8):
        a0, a1, a2, a3 = _larger(a0, row[j]), _larger(a1, row[j + 1]), _larger(a2, row[j + 2]), _larger(a3, row[j + 3])
        a4, a5 = _larger(a4, row[j + 4]), _larger(a5, row[j + 5])
        a6, a7 = _larger(a6, row[j + 6]), _larger(a7, row[j + 7])
    top = _larger(_larger(_larger(a0, a1), _larger(a2, a3)), _larger(_larger(a4, a5), _larger(a6, a7)))
    for j in range(n8, n):
        top = _larger(top, row[j])
    return top


@njit(cache=True, fastmath=FASTMATH, inline="always")
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
    top = _row_max(p, length)
    for j in range(length):
        p[j] = _exp_nonpositive(p[j] - top)
    total = ordered_sum(p, length)
    if d % 64 == 0:
        for c0 in range(0, d, 64):
            weighted_rows64(o, np.int64(c0), v, np.int64(c0), p, np.int64(length))
    else:
        o[:] = 0
        for j in range(length):
            for e in range(d):
                o[e] += p[j] * v[j, e]
    o *= np.float32(1) / total


@njit(cache=True, fastmath=FASTMATH)
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


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def causal_softmax(scores):
    """In place, each row's exp(s - max) over its causal keys and 0 past them; returns the row sums. Layout:
    scores (B, Tb, n) f32, the scores of a block's Tb queries, the last Tb of n positions: query i sees keys
    < n - Tb + i + 1. One pass for what took NumPy five (mask, max, subtract, exp, sum), with an exp that
    vectorises; the rows split over the threads."""
    n_b, tb, n = scores.shape
    sums = np.empty((n_b, tb, 1), dtype=np.float32)
    for r in prange(n_b * tb):
        b, i = r // tb, r % tb
        row, length = scores[b, i], n - tb + i + 1
        top = _row_max(row, length)
        for j in range(length):
            row[j] = _exp_nonpositive(row[j] - top)
        for j in range(length, n):
            row[j] = 0
        sums[b, i, 0] = ordered_sum(row, length)
    return sums


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def swiglu(g, u):
    """silu(g) * u, the MLP's activation, rows split over the threads. Layout: g, u (T, inter) f32. silu's
    libm-free exp vectorises, which np.exp inside a Numba loop did not."""
    out = np.empty_like(g)
    for i in prange(g.shape[0]):
        for j in range(g.shape[1]):
            out[i, j] = silu(g[i, j]) * u[i, j]
    return out


@njit(cache=True, fastmath=FASTMATH, inline="always")
def rmsnorm_row(x, weight, eps, out):
    """out = x / rms(x) * weight for one row, in one pass over it. Layout: x, weight, out (dim,) f32."""
    ss = ordered_dot(x, x, x.size)
    r = np.float32(1) / np.sqrt(ss / np.float32(x.size) + np.float32(eps))
    for j in range(x.size):
        out[j] = x[j] * r * weight[j]


@njit(cache=True, fastmath=FASTMATH)
def rmsnorm(x, weight, eps):
    """x / rms(x) * weight per row. Layout: x (T, dim) f32, weight (dim,) f32. NumPy needs seven calls for
    this, ~8 us at one token: a decode step makes 61 of them."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        rmsnorm_row(x[i], weight, eps, out[i])
    return out


@njit(cache=True, fastmath=FASTMATH, inline="always")
def rope_head(x, cos, sin, out):
    """One head's rotary embedding in the HF layout (dim j paired with j + D/2). Layout: x, cos, sin, out
    (D,) f32, cos and sin the row of x's position."""
    half = x.size // 2
    for j in range(half):
        a, b = x[j], x[j + half]
        out[j] = a * cos[j] - b * sin[j]
        out[j + half] = b * cos[j + half] + a * sin[j + half]


@njit(cache=True, fastmath=FASTMATH)
def rope(x, cos, sin):
    """Rotary embedding of every head. Layout: x (T, H, D) f32; cos and sin (T, D) f32, the rows of x's
    positions."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            rope_head(x[i, h], cos[i], sin[i], out[i, h])
    return out


@njit(cache=True, fastmath=FASTMATH, inline="always")
def silu(g):
    """g / (1 + e^-g) from e = e^-|g| (<= 1, so the libm-free exp above serves): g / (1 + e) for g >= 0 and
    g e / (1 + e) below. The NumPy path's silu_mul (model/llama.py) computes the same."""
    e = _exp_nonpositive(-abs(g))
    return (g if g >= 0 else g * e) / (np.float32(1) + e)

"""One token through every decoder layer in one Numba call, on all threads: the CPU decode step of a model
whose linears all run on the level kernel (level_matmul.py).

Why: at one token, the demo model's step is ~200 products of under 2M weights and ~600 small ops. Run from
Python, each product ran on one thread (forking the pool per product cost as much as the product) and each call
paid its Python dispatch. Here the threads fork once per step and split every product's 16-row blocks between
them, meeting at a spinning barrier (barrier.py) where one needs the other's rows. The math is model/llama.py's
`block`, in the same order: RMSNorm, R x, q|k|v, RoPE and the cache, attention, o, residual, RMSNorm, R x,
gate|up, SiLU, R m, down, residual. Small vector work (norms, rotations) is done by every thread on its own copy,
which costs less than a barrier's wait for one thread to do it.

Layout of what a step reads (built by sagekit.model.decode_plan), per layer l and matrix j of MATRICES, m = 7 l + j:
  codes[m], tables[m], scales[m]: the matrix's LevelCPU codes (uint32 flat), level table, row scales;
  meta[m] = (out, chunks, bits, a, b): the product's rows, its 32-column chunks, its code bits, and the Kronecker
            rotation's factor sizes (a = 0: no rotation); lefts[m] (a, a) and rights[m] (b, b) float32 with
            R x = left X right for x read row-major as X (a, b) (sagekit.format.rotation);
  norms (L, 2, dim) float32: attention and MLP RMSNorm weights; cache_k, cache_v (L, KV, S_max, D) float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from sagekit.kernels.barrier import meet
from sagekit.kernels.level_matmul import level_block16
from sagekit.kernels.llvm_intrinsics import ROWS
from sagekit.kernels.transformer_ops import attend_head, rmsnorm_row, rope_head, silu

MATRICES = ("q", "k", "v", "o", "gate", "up", "down")  # a layer's products, in the order of meta's rows
Q, K, V, O, GATE, UP, DOWN = range(7)


@njit(parallel=True)
def _start_pool(n):
    total = 0
    for i in prange(n):
        total += i
    return total


def threads() -> int:
    """Threads a step splits over: the pool's, under OpenMP, whose n iterations of a region of n run on n
    threads at once (the barrier needs that); one under another threading layer."""
    _start_pool(2)  # the threading layer is chosen when the first parallel region runs
    return numba.get_num_threads() if numba.threading_layer() == "omp" else 1


@njit(cache=True, fastmath=True, inline="always")
def _rows_times(w, m, out, i0, i1):
    """out[i] = w[i] @ m for rows i0..i1, four rows of m at a time: one load and store of out[i] per four
    multiply-adds, where one per multiply-add left the rotation at a third of the speed."""
    n = m.shape[0]
    n4 = n // 4 * 4
    for i in range(i0, i1):
        o = out[i]
        o[:] = 0
        for k in range(0, n4, 4):
            w0, w1, w2, w3 = w[i, k], w[i, k + 1], w[i, k + 2], w[i, k + 3]
            m0, m1, m2, m3 = m[k], m[k + 1], m[k + 2], m[k + 3]
            for j in range(o.size):
                o[j] += w0 * m0[j] + w1 * m1[j] + w2 * m2[j] + w3 * m3[j]
        for k in range(n4, n):
            wk, mk = w[i, k], m[k]
            for j in range(o.size):
                o[j] += wk * mk[j]


@njit(cache=True, fastmath=True, inline="always")
def _rotate(x, left, right, a, b, tmp, out, width, part, n_parts):
    """This thread's share of out[:width] = R x: rows i of R x read as (a, b) are left[i] X right, so each thread
    makes its rows alone; padding zeros from x.size on. a = 0: out = x."""
    n = x.size
    if a == 0:
        i0, i1 = _share(n, part, n_parts)
        out[i0:i1] = x[i0:i1]
    else:
        i0, i1 = _share(a, part, n_parts)
        t = tmp[:n].reshape(a, b)
        _rows_times(left, x.reshape(a, b), t, i0, i1)
        _rows_times(t, right, out[:n].reshape(a, b), i0, i1)
    if part == 0:
        out[n:width] = 0


@njit(cache=True, fastmath=True, inline="always")
def _share(n_items, part, n_parts):
    """This thread's [first, last) of n_items split evenly over n_parts."""
    return n_items * part // n_parts, n_items * (part + 1) // n_parts


@njit(cache=True, fastmath=True, inline="always")
def _product(m, rx, y, codes, tables, scales, meta, part, n_parts):
    """y[r] = scale[r] (levels[code[r]] . rx) for this thread's rows r of matrix m, 16-row blocks at a time;
    y holds a whole number of blocks."""
    out, chunks, bits = meta[m, 0], meta[m, 1], meta[m, 2]
    c, table, scale = codes[m], tables[m], scales[m]
    b0, b1 = _share((out + ROWS - 1) // ROWS, part, n_parts)
    for blk in range(b0, b1):
        r0 = blk * ROWS
        y[r0:r0 + ROWS] = 0
        level_block16(y, r0, c, blk * chunks * bits * ROWS, chunks, table, rx, np.int64(0), bits)
        for r in range(r0, min(out, r0 + ROWS)):
            y[r] *= scale[r]
    return b0 * ROWS, min(out, b1 * ROWS)


@njit(cache=True, fastmath=True, inline="always")
def _rotated(m, x, meta, lefts, rights, tmp, rx, part, n_parts):
    """This thread's share of rx = R_m x, padded to matrix m's chunks (what _product reads)."""
    _rotate(x, lefts[m], rights[m], meta[m, 3], meta[m, 4], tmp, rx, meta[m, 1] * 32, part, n_parts)


@njit(cache=True, fastmath=True, parallel=True)
def decode_layers(h, codes, tables, scales, meta, lefts, rights, norms, eps, cache_k, cache_v, cos, sin, start,
                  n_heads, n_threads):
    """The residual stream (dim,) float32 after every layer, for one token at position `start`, whose keys and
    values it writes into the cache. n_threads: threads to split over (see threads())."""
    n_layers, n_kv, _, d = cache_k.shape
    dim, inter, rep = h.size, meta[GATE, 0], n_heads // n_kv
    pad = ROWS * ((max(dim, inter, n_heads * d, n_kv * d) + ROWS - 1) // ROWS) + 32 * ROWS
    ys = np.zeros((7, pad), dtype=np.float32)  # each product's output, shared by the threads
    q = np.empty((n_heads, d), dtype=np.float32)
    att, mid = np.zeros((n_heads, d), dtype=np.float32), np.zeros(inter, dtype=np.float32)
    rx = np.empty(pad, dtype=np.float32)  # R x, what the products read
    counter = np.zeros(1, dtype=np.int64)
    scale = np.float32(1.0 / np.sqrt(d))
    for part in prange(n_threads):
        x, tmp = np.empty(dim, dtype=np.float32), np.empty(pad, dtype=np.float32)
        p = np.empty(start + 1, dtype=np.float32)
        kr = np.empty(d, dtype=np.float32)
        phase = 1
        for layer in range(n_layers):
            m = 7 * layer
            rmsnorm_row(h, norms[layer, 0], eps, x)
            _rotated(m + Q, x, meta, lefts, rights, tmp, rx, part, n_threads)
            phase = meet(counter, n_threads, phase)
            for j in (Q, K, V):
                _product(m + j, rx, ys[j], codes, tables, scales, meta, part, n_threads)
            phase = meet(counter, n_threads, phase)
            k0, k1 = _share(n_kv, part, n_threads)
            for g in range(k0, k1):  # this thread's KV heads into the cache
                rope_head(ys[K, g * d:(g + 1) * d], cos, sin, kr)
                cache_k[layer, g, start] = kr
                cache_v[layer, g, start] = ys[V, g * d:(g + 1) * d]
            h0, h1 = _share(n_heads, part, n_threads)
            for i in range(h0, h1):
                rope_head(ys[Q, i * d:(i + 1) * d], cos, sin, q[i])
                q[i] *= scale
            phase = meet(counter, n_threads, phase)
            for i in range(h0, h1):
                attend_head(q, i, cache_k[layer, i // rep], cache_v[layer, i // rep], start + 1, p, att[i])
            phase = meet(counter, n_threads, phase)
            _rotated(m + O, att.reshape(-1), meta, lefts, rights, tmp, rx, part, n_threads)
            phase = meet(counter, n_threads, phase)
            r0, r1 = _product(m + O, rx, ys[O], codes, tables, scales, meta, part, n_threads)
            h[r0:r1] += ys[O, r0:r1]
            phase = meet(counter, n_threads, phase)
            rmsnorm_row(h, norms[layer, 1], eps, x)
            _rotated(m + GATE, x, meta, lefts, rights, tmp, rx, part, n_threads)
            phase = meet(counter, n_threads, phase)
            _product(m + GATE, rx, ys[GATE], codes, tables, scales, meta, part, n_threads)
            r0, r1 = _product(m + UP, rx, ys[UP], codes, tables, scales, meta, part, n_threads)
            for r in range(r0, r1):
                mid[r] = silu(ys[GATE, r]) * ys[UP, r]
            phase = meet(counter, n_threads, phase)
            _rotated(m + DOWN, mid, meta, lefts, rights, tmp, rx, part, n_threads)
            phase = meet(counter, n_threads, phase)
            r0, r1 = _product(m + DOWN, rx, ys[DOWN], codes, tables, scales, meta, part, n_threads)
            h[r0:r1] += ys[DOWN, r0:r1]
            phase = meet(counter, n_threads, phase)
    return h

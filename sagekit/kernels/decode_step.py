"""One token through every decoder layer in one Numba call, on all threads: the CPU decode step of a model
whose linears all run on the level kernel (level_matmul.py) or the codebook kernel (codebook_matmul.py).

Why: at one token, the demo model's step is ~200 products of under 2M weights and ~600 small ops. Run from
Python, each product ran on one thread (forking the pool per product cost as much as the product) and each call
paid its Python dispatch. Here the threads fork once per step and split every product's 16-row blocks (and a
codebook's table runs, and each rotation's rows) between them, meeting at a spinning barrier (barrier.py) where
one needs the other's part. The math is model/llama.py's `block`, in the same order: RMSNorm, R x, q|k|v, RoPE
and the cache, attention, o, residual, RMSNorm, R x, gate|up, SiLU, R m, down, residual. The norms are done by
every thread on its own copy, which costs less than a barrier's wait for one thread to do them.

Its first run compiles it (25 s on the 2-core machine, then read from Numba's cache). What each thread runs is
one function, _thread_step, compiled once: as the body of the parallel loop it was compiled twice, and the
region's np.zeros each became a parallel loop of its own. Copies between arrays are loops: a slice assignment
compiles Numba's shape-error message, seconds each. Together these took the first run from 60 s to 25 s.

Layout of what a step reads (built by sagekit.model.decode_plan), per layer l and matrix j of MATRICES,
m = 7 l + j, in two int64 tables:
  meta[m] = (out, cols, bits, a, b, kind, k, n_codes, n_table): the product's rows; kind LEVEL: its 32-column
            chunks and code bits, kind BOOK: its runs, its run length D and its k = 256 codewords; the Kronecker
            rotation's factor sizes (a = 0: no rotation); the sizes of its codes and of its level table (LEVEL) or
            the rows of its codewords_t (BOOK);
  at[m] = addresses of (codes, table, scale, left, right): a LevelCPU's uint32 codes and float32 level table or
            a CodebookCPU's uint8 codes and float32 codewords_t (n_table, k); the float32 row scales; the rotation
            factors, left (a, a) and right (b, b), with R x = left X right for x read row-major as X (a, b)
            (sagekit.format.rotation). Addresses, not typed lists of the arrays: building those lists compiled
            Numba's list code at every load, 2.8 s and 75 MiB. The plan keeps the arrays alive;
  norms (L, 2, dim) float32: attention and MLP RMSNorm weights; cache_k, cache_v (L, KV, S_max, D) float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from sagekit.kernels.barrier import meet
from sagekit.kernels.codebook_intrinsics import BYTE_SLOTS, table_run_blocks, table_run_bytes
from sagekit.kernels.codebook_matmul import table_run
from sagekit.kernels.fastmath import FASTMATH
from sagekit.kernels.level_matmul import level_block16
from sagekit.kernels.llvm_intrinsics import AVX512_BF16, AVX512_VBMI, ROWS
from sagekit.kernels.transformer_ops import attend_head, rmsnorm_row, rope_head, silu

MATRICES = ("q", "k", "v", "o", "gate", "up", "down")  # a layer's products, in the order of meta's rows
Q, K, V, O, GATE, UP, DOWN = range(7)
LEVEL, BOOK = 0, 1  # meta's kinds


@njit(cache=True, parallel=True)
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


@njit(cache=True, fastmath=FASTMATH, inline="always")
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


@njit(cache=True, fastmath=FASTMATH)
def _rotate(x, left, right, a, b, tmp, out, part, n_parts):
    """This thread's share of out = R x: rows i of R x read as (a, b) are left[i] X right, so each thread makes
    its rows alone; zeros from x.size on (the products' padding). a = 0: out = x. Loops, not slice assignments
    between arrays: those compile Numba's shape-error message, seconds of a first run."""
    n = x.size
    if a == 0:
        i0, i1 = _share(n, part, n_parts)
        for i in range(i0, i1):
            out[i] = x[i]
    else:
        i0, i1 = _share(a, part, n_parts)
        t = tmp[:n].reshape(a, b)
        _rows_times(left, x.reshape(a, b), t, i0, i1)
        _rows_times(t, right, out[:n].reshape(a, b), i0, i1)
    if part == 0:
        out[n:] = 0


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _share(n_items, part, n_parts):
    """This thread's [first, last) of n_items split evenly over n_parts."""
    return n_items * part // n_parts, n_items * (part + 1) // n_parts


def _pointer_to(dtype):
    """An intrinsic making an int64 address a pointer to `dtype`, for numba.carray."""

    @intrinsic
    def pointer(typingctx, address):
        if address != types.int64:
            return None
        sig = types.CPointer(dtype)(address)
        return sig, lambda context, builder, sig, args: builder.inttoptr(args[0], context.get_value_type(
            sig.return_type))

    return pointer


_u32_at, _u8_at, _f32_at = _pointer_to(types.uint32), _pointer_to(types.uint8), _pointer_to(types.float32)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _rotated(m, x, meta, at, tmp, rx, part, n_parts):
    """This thread's share of rx = R_m x (what _product reads)."""
    a, b = meta[m, 3], meta[m, 4]
    left, right = carray(_f32_at(at[m, 3]), (a, a)), carray(_f32_at(at[m, 4]), (b, b))
    _rotate(x, left, right, a, b, tmp, rx, part, n_parts)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _run_f32(acc, cw, rx, b, d, tab, codes, c0, blocks):
    """_run_bytes without the rounding, for AVX-512 CPUs without BF16 or VBMI: the table made in `tab`, the rows
    in their own order."""
    table_run(rx, b, cw, d, tab)
    table_run_blocks(acc, tab, 0, codes, c0, ROWS, blocks)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _run_bytes(acc, cw, rx, b, d, tab, codes, c0, blocks):
    """table_run_bytes with _run_f32's arguments: its table stays in registers, so `tab` goes unused."""
    table_run_bytes(acc, cw, rx, b, d, codes, c0, blocks)


BYTES = AVX512_BF16 and AVX512_VBMI
_run = _run_bytes if BYTES else _run_f32


@njit(cache=True, inline="always")
def _slot(r):
    """Where _run adds row r's sums: table_run_bytes permutes the rows of each 64-row group."""
    return (r & -64) | BYTE_SLOTS[r & 63] if BYTES else r


@njit(cache=True, fastmath=FASTMATH)
def _book_partial(m, rx, acc, tab, meta, at, part, n_parts):
    """acc[r] = sum over this thread's runs j of codebook matrix m of T_j[code of row r's run j], unscaled, every
    row (at _slot(r)): each run's table T_j = codewords . rx[jD : jD + D] is made and read at once for all rows,
    in registers and rounded to bfloat16 where the CPU has AVX-512 BF16 and VBMI (table_run_bytes), else in
    `tab` (256 floats, in L1). Split by runs, a thread reads only the tables it made: split by rows, each read the
    other's tables across the cores, and two threads ran no faster than one."""
    out, runs, d = meta[m, 0], meta[m, 1], meta[m, 2]
    blocks = (out + ROWS - 1) // ROWS
    acc[:(blocks + 3) // 4 * 4 * ROWS] = 0  # whole 64-row groups: table_run_bytes adds to all of the last one
    c, cw = carray(_u8_at(at[m, 0]), meta[m, 7]), carray(_f32_at(at[m, 1]), (meta[m, 8], meta[m, 6]))
    j0, j1 = _share(runs, part, n_parts)
    for run in range(j0, j1):
        _run(acc, cw, rx, run * d, d, tab, c, run * blocks * ROWS, blocks)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _share_rows(out, part, n_parts):
    """The rows of an out-row product that _product gives this thread (whole 16-row blocks)."""
    b0, b1 = _share((out + ROWS - 1) // ROWS, part, n_parts)
    return b0 * ROWS, min(out, b1 * ROWS)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _add_rows(h, y, part, n_parts):
    """h += y on this thread's rows of h (the residual after o and after down), as _product split them."""
    r0, r1 = _share_rows(h.size, part, n_parts)
    for r in range(r0, r1):
        h[r] += y[r]


@njit(cache=True, fastmath=FASTMATH)
def _product(m, rx, y, partials, meta, at, part, n_parts):
    """y[r] = scale[r] (W_hat[r] . rx) for this thread's rows r of matrix m, in 16-row blocks; y holds a whole
    number of blocks. LEVEL: a lookup per weight; BOOK: the threads' partial sums (_book_partial) added."""
    out, chunks, bits = meta[m, 0], meta[m, 1], meta[m, 2]
    r0, r1 = _share_rows(out, part, n_parts)
    b0, b1 = r0 // ROWS, (r1 + ROWS - 1) // ROWS
    if meta[m, 5] == LEVEL:
        c, table = carray(_u32_at(at[m, 0]), meta[m, 7]), carray(_f32_at(at[m, 1]), meta[m, 8])
        y[r0:b1 * ROWS] = 0
        for blk in range(b0, b1):
            level_block16(y, blk * ROWS, c, blk * chunks * bits * ROWS, chunks, table, rx, np.int64(0), bits)
    else:
        for r in range(r0, r1):
            y[r] = partials[0, _slot(r)]
        for t in range(1, n_parts):
            for r in range(r0, r1):
                y[r] += partials[t, _slot(r)]
    scale = carray(_f32_at(at[m, 2]), out)
    for r in range(r0, r1):
        y[r] *= scale[r]


@njit(cache=True, fastmath=FASTMATH)
def _products_of(x, m, first, last, meta, at, tmp, rx, ys, partials, tab, counter, phase, part, n_parts):
    """This thread's rows of matrices m + first .. m + last (sharing their input and its rotation) times x, into
    ys[first..last]; the threads meet after the rotation and after the codebook partial sums (if any), not after
    the products. partials (threads, 7, pad): those sums; tab: this thread's table. Returns the phase reached."""
    _rotated(m + first, x, meta, at, tmp, rx, part, n_parts)
    phase = meet(counter, n_parts, phase)
    books = 0
    for j in range(first, last + 1):
        if meta[m + j, 5] == BOOK:
            _book_partial(m + j, rx, partials[part, j], tab, meta, at, part, n_parts)
            books += 1
    if books:
        phase = meet(counter, n_parts, phase)
    for j in range(first, last + 1):
        _product(m + j, rx, ys[j], partials[:, j], meta, at, part, n_parts)
    return phase


@njit(cache=True)
def _scratch(dim, inter, n_heads, n_kv, d, n_threads):
    """The arrays the threads share: each product's output ys, each thread's codebook sums, the queries, the
    attention and MLP activations, R x and the barrier's counter. Allocated here, outside the parallel function,
    whose np.zeros would each become a parallel loop of their own, compiled on their own."""
    pad = ROWS * ((max(dim, inter, n_heads * d, n_kv * d) + ROWS - 1) // ROWS) + 32 * ROWS
    ys = np.zeros((7, pad), dtype=np.float32)  # each product's output, shared by the threads
    partials = np.zeros((n_threads, 7, pad), dtype=np.float32)  # each thread's codebook sums, all rows
    q = np.empty((n_heads, d), dtype=np.float32)
    att, mid = np.zeros(n_heads * d, dtype=np.float32), np.zeros(inter, dtype=np.float32)
    rx = np.empty(pad, dtype=np.float32)  # R x, what the products read
    return ys, partials, q, att, mid, rx, np.zeros(1, dtype=np.int64)


@njit(cache=True, fastmath=FASTMATH)
def _thread_step(part, h, meta, at, norms, eps, cache_k, cache_v, cos, sin, start, n_heads, n_threads, shared):
    """Thread `part`'s share of every layer for one token (decode_layers); the threads meet at each barrier. A
    function of its own, not the body of the parallel loop, so that it compiles once, as any other function."""
    ys, partials, q, att, mid, rx, counter = shared
    n_layers, n_kv, _, d = cache_k.shape
    dim, inter, rep = h.size, meta[GATE, 0], n_heads // n_kv
    scale = np.float32(1.0 / np.sqrt(d))
    # the products that share an input, as run-time values: constants would compile _products_of once per value
    first, last = np.array([Q, O, GATE, DOWN]), np.array([V, O, UP, DOWN])
    x, tmp = np.empty(dim, dtype=np.float32), np.empty(rx.size, dtype=np.float32)
    p = np.empty(start + 1, dtype=np.float32)
    tab = np.empty(256, dtype=np.float32)
    phase = np.int64(1)  # not 1: a literal would compile _products_of a second time
    for layer in range(n_layers):
        m = 7 * layer
        rmsnorm_row(h, norms[layer, 0], eps, x)
        phase = _products_of(x, m, first[0], last[0], meta, at, tmp, rx, ys, partials, tab, counter, phase, part, n_threads)
        phase = meet(counter, n_threads, phase)
        k0, k1 = _share(n_kv, part, n_threads)
        for g in range(k0, k1):  # this thread's KV heads into the cache
            rope_head(ys[K, g * d:(g + 1) * d], cos, sin, cache_k[layer, g, start])
            for e in range(d):
                cache_v[layer, g, start, e] = ys[V, g * d + e]
        h0, h1 = _share(n_heads, part, n_threads)
        for i in range(h0, h1):
            rope_head(ys[Q, i * d:(i + 1) * d], cos, sin, q[i])
            for e in range(d):  # not q[i] *= scale: that compiles an array assignment and its error message
                q[i, e] *= scale
        phase = meet(counter, n_threads, phase)
        for i in range(h0, h1):
            attend_head(q, i, cache_k[layer, i // rep], cache_v[layer, i // rep], start + 1, p, att[i * d:(i + 1) * d])
        phase = meet(counter, n_threads, phase)
        phase = _products_of(att, m, first[1], last[1], meta, at, tmp, rx, ys, partials, tab, counter, phase, part, n_threads)
        _add_rows(h, ys[O], part, n_threads)
        phase = meet(counter, n_threads, phase)
        rmsnorm_row(h, norms[layer, 1], eps, x)
        phase = _products_of(x, m, first[2], last[2], meta, at, tmp, rx, ys, partials, tab, counter, phase, part, n_threads)
        r0, r1 = _share_rows(inter, part, n_threads)
        for r in range(r0, r1):
            mid[r] = silu(ys[GATE, r]) * ys[UP, r]
        phase = meet(counter, n_threads, phase)
        phase = _products_of(mid, m, first[3], last[3], meta, at, tmp, rx, ys, partials, tab, counter, phase, part, n_threads)
        _add_rows(h, ys[DOWN], part, n_threads)
        phase = meet(counter, n_threads, phase)


@njit(cache=True, parallel=True)
def decode_layers(h, meta, at, norms, eps, cache_k, cache_v, cos, sin, start, n_heads, n_threads):
    """The residual stream (dim,) float32 after every layer, for one token at position `start`, whose keys and
    values it writes into the cache. meta, at: the matrices (module docstring); n_threads: see threads()."""
    n_kv, d = cache_k.shape[1], cache_k.shape[3]
    shared = _scratch(h.size, meta[GATE, 0], n_heads, n_kv, d, n_threads)
    for part in prange(n_threads):
        _thread_step(np.int64(part), h, meta, at, norms, eps, cache_k, cache_v, cos, sin, start, n_heads, n_threads, shared)
    return h

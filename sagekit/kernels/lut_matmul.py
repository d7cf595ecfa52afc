"""CPU matmul on packed `sage` weights (Numba): y = x @ W_hat.T straight from the bit planes.

Method (T-MAC / bitnet.cpp style lookup tables, made exact for any number of groups):
  * Each weight is U * alpha[g] with U = 2 sign - 1 = +-1. Expanding alpha over the NB group-id bits in the
    Walsh basis gives  U * alpha[g] = sum_A beta_A * U * prod_{i in A} (2 g_i - 1),  and every product of +-1
    factors is again +-1, stored as one bit: plane_A = sign XOR g_i for i in A. So the matrix is a sum of
    2^NB pure +-1 matrices with scalar weights beta_A (one plane for G = 1, two for G = 2, four for G = 4).
  * For a +-1 plane, y_r = sum over 4-column chunks of T_c[nibble], with T_c[m] = sum_i (+-x_{4c+i}) the
    16 signed partial sums of x. The tables are built once per x and shared by all rows and planes.
  * The planes are laid out "vertically" (word k of 16 consecutive rows side by side), so one AVX-512
    `vpermps` looks up 16 rows at once from the 16-entry table held in a register: 3 instructions (shift,
    permute, add) per 64 weights per plane, against 64 multiply-adds for dense float32.
  * Salient corrections are a sparse pass over x added afterwards: per row (CSR) for a batch of tokens;
    for one token, rows grouped by their count of corrections, so a gather serves 16 rows.
  * Tokens go through in batches of 16 that share each load of the planes (prefill = many decodes).
The lookup is hand-written LLVM IR (llvm_intrinsics.py); without AVX-512 it is emitted as a 16-lane table read
that LLVM lowers for the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
from numba import njit, prange

from sagekit.format.bits import n_words
from sagekit.format.sage import PackedSage
from sagekit.kernels.fastmath import FASTMATH
from sagekit.kernels.llvm_intrinsics import ROWS, lut_planes, sparse_row16
from sagekit.kernels.serial_twin import serial_twin

TOKEN_BATCH = ROWS  # tokens sharing one pass over the planes; the salient pass holds them in one vector
BLAS_MIN_TOKENS = 64  # prefill with 4+ Walsh planes: unpacked row tiles through BLAS beat 4+ lookups a weight
BLAS_TILE_ROWS = 128  # rows unpacked at a time: the only dense float32 scratch, (in, 128)
PARALLEL_MIN_BITS = 1 << 22  # smaller matrices run on the calling thread: waking others costs more than it saves
SHORT_ROW = 16  # decode's salient pass: rows with up to this many corrections go 16 rows to a gather
MAX_GROUPS = 16  # 2^NB Walsh planes cost one G = 1 matrix each; past 16 a lookup per code would be the way


@dataclass(frozen=True)
class SageCPU:
    """A PackedSage re-laid once at load time for the CPU kernel."""

    # uint32 (1+NB, WORDS*OUT16 + 16): sign, then id bit planes; [p, k*OUT16 + r] = word k of row r (rows padded
    # to OUT16, a multiple of 16), then 16 words of slack for the kernel's offset loads
    planes: np.ndarray
    beta: np.ndarray  # float32 (2^NB,): Walsh coefficients of alpha, sign of odd subsets folded in
    values: np.ndarray  # float32 (2^(1+NB),): the weight of code sign | id << 1, i.e. (2 sign - 1) alpha[id]
    sal_ptr: np.ndarray  # int32 (out+1,)
    sal_idx: np.ndarray  # uint16 (nnz,)
    sal_val: np.ndarray  # int8 (nnz,)
    sal_scale: np.ndarray  # float32 (out,)
    # Decode's copy of the salient entries (most rows hold 0-5, so a loop per row is all branch misses):
    # rows with c = 1..SHORT_ROW entries are grouped by c, and group c's entries stored column-major, entry j
    # of its i-th row at [offset_c + j * n_c + i], so one gather serves 16 rows; longer rows use the CSR.
    short_rows: np.ndarray  # int32: the rows of group 1, then group 2, ...
    short_ptr: np.ndarray  # int64 (SHORT_ROW + 2,): group c is short_rows[short_ptr[c] : short_ptr[c + 1]]
    short_idx: np.ndarray  # uint16
    short_val: np.ndarray  # int8
    long_rows: np.ndarray  # int32: rows with more than SHORT_ROW entries
    shape: tuple[int, int]
    plane_rows: tuple[np.ndarray, ...] = ()  # the rows of `planes`, made once: the kernel takes a tuple

    @cached_property
    def kernel_args(self) -> tuple:
        """What _lut_matmul takes after x, in its order (made once: a decode step makes 200+ calls)."""
        return (self.plane_rows, self.beta, self.sal_ptr, self.sal_idx, self.sal_val, self.sal_scale,
                self.short_rows, self.short_ptr, self.short_idx, self.short_val, self.long_rows)

    @cached_property
    def words(self) -> int:
        return n_words(self.shape[1])

    @property
    def nbytes(self) -> int:
        arrays = (self.planes, self.beta, self.values, self.sal_ptr, self.sal_idx, self.sal_val, self.sal_scale,
                  self.short_rows, self.short_ptr, self.short_idx, self.short_val, self.long_rows)
        return sum(int(a.nbytes) for a in arrays)


def walsh_beta(alpha: np.ndarray, nb: int) -> np.ndarray:
    """beta_A = (-1)^|A| 2^-NB sum_g alpha_g prod_{i in A} (2 bit_i(g) - 1); alpha of unused ids is 0."""
    a = np.zeros(1 << nb)
    a[: len(alpha)] = np.asarray(alpha, dtype=np.float64)
    g = np.arange(1 << nb)
    beta = np.empty(1 << nb)
    for s in range(1 << nb):
        chi = np.ones(1 << nb)
        for i in range(nb):
            if (s >> i) & 1:
                chi *= 2.0 * ((g >> i) & 1) - 1.0
        beta[s] = (-1) ** bin(s).count("1") * (a * chi).mean()
    return beta.astype(np.float32)


def group_short_rows(sal_ptr: np.ndarray, sal_idx: np.ndarray, sal_val: np.ndarray) -> tuple[np.ndarray, ...]:
    """(short_rows, short_ptr, short_idx, short_val, long_rows) of SageCPU from the CSR salient entries."""
    count = np.diff(sal_ptr.astype(np.int64))
    start = sal_ptr[:-1].astype(np.int64)
    groups = [np.flatnonzero(count == c) for c in range(1, SHORT_ROW + 1)]
    short_ptr = np.zeros(SHORT_ROW + 2, dtype=np.int64)
    short_ptr[2:] = np.cumsum([g.size for g in groups])
    entries = [(start[g][None, :] + np.arange(c)[:, None]).reshape(-1) for c, g in enumerate(groups, 1)]
    entries = np.concatenate(entries) if entries else np.zeros(0, dtype=np.int64)
    return (np.concatenate(groups).astype(np.int32), short_ptr, sal_idx[entries].astype(np.uint16),
            sal_val[entries].astype(np.int8), np.flatnonzero(count > SHORT_ROW).astype(np.int32))


def prepare(p: PackedSage) -> SageCPU:
    """Transpose the planes to the vertical layout (rows padded to 16) and precompute the Walsh weights."""
    if p.n_groups > MAX_GROUPS:
        raise ValueError(f"alpha: the CPU kernel takes up to {MAX_GROUPS} groups, this matrix has {p.n_groups}")
    out, _ = p.shape
    stacked = np.concatenate([p.sign[None], p.gid])
    n_bits, _, words = stacked.shape
    out16 = -(-out // ROWS) * ROWS
    planes = np.zeros((n_bits, words * out16 + ROWS), dtype=np.uint32)
    planes[:, : words * out16].reshape(n_bits, words, out16)[:, :, :out] = stacked.transpose(0, 2, 1)
    alpha = np.zeros(1 << (n_bits - 1), dtype=np.float32)
    alpha[: p.n_groups] = p.alpha
    short_rows, short_ptr, short_idx, short_val, long_rows = group_short_rows(p.sal_ptr, p.sal_idx, p.sal_val)
    return SageCPU(
        planes=planes,
        beta=walsh_beta(alpha, n_bits - 1),
        values=np.stack([-alpha, alpha], axis=1).reshape(-1),
        sal_ptr=p.sal_ptr,
        sal_idx=p.sal_idx,
        sal_val=p.sal_val,
        sal_scale=p.sal_scale.astype(np.float32),
        short_rows=short_rows,
        short_ptr=short_ptr,
        short_idx=short_idx,
        short_val=short_val,
        long_rows=long_rows,
        shape=p.shape,
        plane_rows=tuple(planes),
    )


@njit(cache=True, fastmath=FASTMATH)
def _fill_tables(x, tab):
    """Layout: tab[128k + 16j + m] = sum_{i<4} (+1 if bit i of m else -1) * x[32k + 4j + i], x zero-padded.
    Built by doubling: entry m + 2^i is entry m with x_i's sign flipped to +."""
    in_ = x.size
    for c in range(tab.size // 16):
        t = tab[16 * c : 16 * c + 16]
        t[0] = 0
        for i in range(4):
            if 4 * c + i < in_:
                t[0] -= x[4 * c + i]
        for i in range(4):
            two_x = 2 * x[4 * c + i] if 4 * c + i < in_ else np.float32(0)
            for m in range(1 << i):
                t[m + (1 << i)] = t[m] + two_x


@njit(cache=True, fastmath=FASTMATH)
def _salient_decode(x, y, part, n_par, sal_ptr, sal_idx, sal_val, sal_scale, short_rows, short_ptr, short_idx,
                    short_val, long_rows):
    """y[r] += sal_scale[r] * sum_j sal_val[j] * x[sal_idx[j]] over the salient entries of row r, for this
    part's share of each row group (parts touch disjoint rows). Layout: as SageCPU's short_* and CSR."""
    s = np.empty(ROWS, dtype=np.float32)
    offset = 0
    for c in range(1, short_ptr.size - 1):
        first, n = short_ptr[c], short_ptr[c + 1] - short_ptr[c]
        for i0 in range(n * part // n_par, n * (part + 1) // n_par, ROWS):
            m = min(ROWS, n * (part + 1) // n_par - i0)
            s[:] = 0
            for j in range(c):
                e = offset + j * n + i0
                for i in range(m):
                    s[i] += np.float32(short_val[e + i]) * x[short_idx[e + i]]
            for i in range(m):
                r = short_rows[first + i0 + i]
                y[r] += sal_scale[r] * s[i]
        offset += c * n
    n_long = long_rows.size
    for r in long_rows[n_long * part // n_par : n_long * (part + 1) // n_par]:
        cols, vals = sal_idx[sal_ptr[r] : sal_ptr[r + 1]], sal_val[sal_ptr[r] : sal_ptr[r + 1]]
        t = np.float32(0)
        for j in range(cols.size):
            t += np.float32(vals[j]) * x[cols[j]]
        y[r] += sal_scale[r] * t


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _lut_matmul(x, planes, beta, sal_ptr, sal_idx, sal_val, sal_scale, short_rows, short_ptr, short_idx, short_val,
                long_rows, y, words, n_par):
    """Layout: x (T, in) f32; planes a tuple of 1+NB u32 vertical planes and the salient arrays as in SageCPU;
    y (T, out) f32."""
    n_tok, in_ = x.shape
    out = y.shape[1]
    out16 = (planes[0].size - ROWS) // words
    n_blocks = out16 // ROWS
    step = -(-n_blocks // n_par)
    for t0 in range(0, n_tok, TOKEN_BATCH):
        tb = min(TOKEN_BATCH, n_tok - t0)
        tab = np.empty(tb * words * 128, dtype=np.float32)
        if tb == 1:  # decode: too little work to be worth a second parallel region
            _fill_tables(x[t0], tab)
        else:
            for t in prange(tb):
                _fill_tables(x[t0 + t], tab[t * words * 128 : (t + 1) * words * 128])
        xt = np.zeros((in_ if n_tok > 1 else 0, ROWS), dtype=np.float32)  # salient pass of T > 1: (in, tokens)
        if n_tok > 1:
            xt[:, :tb] = x[t0 : t0 + tb].T
        xt_flat = xt.reshape(-1)
        for part in prange(n_par):
            b0 = part * step
            b1 = min(n_blocks, b0 + step)
            if b0 >= b1:
                continue
            nrow = (b1 - b0) * ROWS
            acc = np.zeros(tb * nrow, dtype=np.float32)  # (tokens, this part's rows)
            for k in range(words):
                for b in range(b0, b1):
                    lut_planes(
                        acc, (b - b0) * ROWS, nrow, planes, k * out16 + b * ROWS, tab, k * 128, words * 128, tb, beta
                    )
            if n_tok == 1:
                y[t0, b0 * ROWS : min(out, b1 * ROWS)] = acc[: min(out, b1 * ROWS) - b0 * ROWS]
                continue
            sal = np.zeros(ROWS, dtype=np.float32)
            for r in range(b0 * ROWS, min(out, b1 * ROWS)):
                sal[:] = 0
                sparse_row16(sal, 0, xt_flat, sal_idx, sal_val, np.int64(sal_ptr[r]), np.int64(sal_ptr[r + 1]))
                for t in range(tb):
                    y[t0 + t, r] = acc[t * nrow + r - b0 * ROWS] + sal_scale[r] * sal[t]
        if n_tok == 1:
            for part in prange(n_par):
                _salient_decode(x[0], y[0], part, n_par, sal_ptr, sal_idx, sal_val, sal_scale, short_rows, short_ptr,
                                short_idx, short_val, long_rows)


# Small matrices (decode on narrow models) run serially: waking the thread pool costs more than their product.
_lut_matmul_serial = serial_twin(_lut_matmul)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _unpack_tile(planes, values, sal_ptr, sal_idx, sal_val, sal_scale, words, r0, tile):
    """Layout: planes as in SageCPU (2-D); tile (in, R) f32 = W_hat[r0 : r0+R].T, rows past `out` left as
    whatever the zero padding decodes to. Transposed so that each plane word fills a contiguous row run."""
    in_, n_rows = tile.shape
    out = sal_scale.size
    out16 = (planes.shape[1] - ROWS) // words
    for k in prange(words):
        code = np.empty(n_rows, dtype=np.uint32)
        for j in range(min(32, in_ - 32 * k)):
            code[:] = 0
            for i in range(planes.shape[0]):
                w = planes[i, k * out16 + r0 : k * out16 + r0 + n_rows]
                for r in range(n_rows):
                    code[r] |= ((w[r] >> j) & 1) << i
            for r in range(n_rows):
                tile[32 * k + j, r] = values[code[r]]
    for r in prange(min(n_rows, out - r0)):
        for j in range(sal_ptr[r0 + r], sal_ptr[r0 + r + 1]):
            tile[sal_idx[j], r] += np.float32(sal_val[j]) * sal_scale[r0 + r]


def _blas_matmul(x: np.ndarray, k: SageCPU, y: np.ndarray) -> None:
    """Prefill with many planes: unpack BLAS_TILE_ROWS rows at a time and let BLAS multiply them."""
    out, in_ = k.shape
    tile = np.empty((in_, BLAS_TILE_ROWS), dtype=np.float32)
    for r0 in range(0, out, BLAS_TILE_ROWS):
        r1 = min(out, r0 + BLAS_TILE_ROWS)
        _unpack_tile(k.planes, k.values, k.sal_ptr, k.sal_idx, k.sal_val, k.sal_scale, n_words(in_), r0, tile)
        np.matmul(x, tile[:, : r1 - r0], out=y[:, r0:r1])


def unpack_rows(k: SageCPU, rows: np.ndarray) -> np.ndarray:
    """float32 (len(rows), in): the given rows of W_hat, decoded from the kernel's planes (a packed
    embedding's lookup), so the layout need not be kept beside them."""
    in_ = k.shape[1]
    out = np.empty((len(rows), in_), dtype=np.float32)
    tile = np.empty((in_, 1), dtype=np.float32)
    for i, r in enumerate(np.asarray(rows).reshape(-1)):
        _unpack_tile(k.planes, k.values, k.sal_ptr, k.sal_idx, k.sal_val, k.sal_scale, n_words(in_), int(r), tile)
        out[i] = tile[:, 0]
    return out


def sage_matmul(x: np.ndarray, k: SageCPU | PackedSage) -> np.ndarray:
    """float32 (T, in) -> float32 (T, out). T == 1 is decode, T > 1 prefill: tokens go through the lookup
    kernel in batches, except long prefills of 4+ plane matrices, which take unpacked tiles through BLAS."""
    if isinstance(k, PackedSage):
        k = prepare(k)
    out, in_ = k.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != in_:
        raise ValueError(f"x: expected (T, {in_}), got {x.shape}")
    y = np.empty((x.shape[0], out), dtype=np.float32)
    if x.shape[0] >= BLAS_MIN_TOKENS and len(k.beta) >= 4:
        _blas_matmul(x, k, y)
        return y
    if k.planes.size * 32 * x.shape[0] < PARALLEL_MIN_BITS:
        _lut_matmul_serial(x, *k.kernel_args, y, k.words, 1)
    else:
        _lut_matmul(x, *k.kernel_args, y, k.words, numba.get_num_threads())
    return y

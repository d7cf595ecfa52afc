"""CPU matmul on byte-indexed codebooks (Numba): y = x @ W_hat.T where one byte of a row codes a run of D
consecutive weights as one of K <= 256 codewords of its matrix, times the row's scale.

It runs the layouts whose values are not a sign times a magnitude, so not the `sage` LUT kernel's:
  * `sage-vq`: its codes and codebook as stored (D = 2..8, one byte per run);
  * `sage-grid` with free levels: D = 8 // B codes of B bits joined into one byte (K = 2^(B D)), the
    codewords every D-tuple of levels. The model gives it 1-bit grids only (D = 8); 2- to 5-bit grids run
    on the level kernel (level_matmul.py), at their stored bits.
Method, decode (a few tokens): a table T[j, c] = codeword c . x[jD : jD + D] (runs x K float32, built once
per token), then y_r = scale_r * sum_j T[j, code of row r's run j], against D multiply-adds and 4 D bytes a
run for dense float32. With AVX-512 and 256 entries a run's table sits in 16 registers and 8 `vpermt2ps` and
a blend tree look 16 rows up (codebook_intrinsics.table_run_blocks); otherwise one gather serves 16 rows
(table_rows16), as it does for the large products that run on two threads. Prefill: rows
decoded into a float32 tile for BLAS (tiles.py), which beats a table read per run from a few tokens on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from sagekit.format.sage_grid import PackedGrid
from sagekit.format.sage_vq import PackedVQ
from sagekit.kernels import int8_gemm
from sagekit.kernels.codebook_intrinsics import table_rows16, table_run_blocks
from sagekit.kernels.fastmath import FASTMATH
from sagekit.kernels.llvm_intrinsics import AVX512, ROWS
from sagekit.kernels.serial_twin import serial_twin
from sagekit.kernels.tiles import padded, tiled_matmul

# Runs of 2 (vq D = 2) run here at 0.67-0.86x the FP16 runtime's speed on the demo's shapes (BENCHMARKS,
# session 10) but at a quarter of its bytes: the 2.03-bit allocation gives D = 2 to every v_proj, and as FP16
# copies they held its weights at 1.13x the file. Runs of 1 (grids of 6+ bits) stay FP16.
MIN_RUN = 2
TABLE_MAX_TOKENS = 3  # from 4 tokens on, decoding row tiles for BLAS costs less than a table read per run
CHUNK_BYTES = 1 << 18  # the runs of one pass over the rows: their tables (256 KiB) stay in L2
PARALLEL_MIN_WEIGHTS = 1 << 21  # smaller products run on the calling thread, as the LUT kernel's do
MAX_DIM = 8  # the longest run of weights a byte codes (vq's D, 8 // B for a B-bit grid)


@dataclass(frozen=True)
class CodebookCPU:
    """A codebook matrix re-laid once at load time for the kernel."""

    # uint8 (runs, blocks, 16) flat, blocks = ceil(out / 16): [(j * blocks + b) * 16 + i] = the code of row
    # 16 b + i's run j (rows past `out` hold code 0), so a pass over one run's rows reads its codes front to
    # back (block by block at a stride of `runs` x 16 bytes took 1.5x as long over 40 cold 1536x576 matrices)
    codes: np.ndarray
    # float32 (terms, K), C-contiguous: codeword c's weight i at [i, c]; terms = D rounded up to 2, 4 or 8,
    # with zero rows past D (what _tables reads)
    codewords_t: np.ndarray
    scale: np.ndarray  # float32 (out,)
    shape: tuple[int, int]  # (out, in); runs * D >= in, the padding weights multiply zero inputs
    dim: int  # D

    @property
    def blocks(self) -> int:
        """16-row blocks, the last one padded."""
        return -(-self.shape[0] // ROWS)

    @property
    def runs(self) -> int:
        return -(-self.shape[1] // self.dim)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.codewords_t.nbytes + self.scale.nbytes)


def _run_major(codes: np.ndarray) -> np.ndarray:
    """uint8 (out, runs) codes in CodebookCPU's layout."""
    out, runs = codes.shape
    blocks = -(-out // ROWS)
    padded = np.zeros((blocks * ROWS, runs), dtype=np.uint8)
    padded[:out] = codes
    return np.ascontiguousarray(padded.T).reshape(-1)


def run_length(p: PackedVQ | PackedGrid) -> int:
    """Weights per byte in the kernel's layout: vq's D, or as many B-bit grid codes as fit in a byte (8 // B)."""
    return p.dim if isinstance(p, PackedVQ) else max(1, 8 // p.bits)


def byte_codes(p: PackedVQ | PackedGrid) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 (out, runs), codewords float32 (K, D)): a `sage-vq` matrix's codes as stored, or a
    `sage-grid` one's D = 8 // B level indices joined into a byte (the first weight of a run in the low bits,
    a last partial run padded with index 0). Every codebook kernel, CPU or GPU, starts from these."""
    if isinstance(p, PackedVQ):
        return p.codes, p.codewords()
    out, in_ = p.shape
    d = run_length(p)
    idx = np.zeros((out, -(-in_ // d) * d), dtype=np.uint32)
    idx[:, :in_] = p.indices()
    joined = np.zeros((out, idx.shape[1] // d), dtype=np.uint32)
    for i in range(d):
        joined |= idx[:, i::d] << (p.bits * i)
    digits = (np.arange((1 << p.bits) ** d)[:, None] >> (p.bits * np.arange(d))[None, :]) & ((1 << p.bits) - 1)
    return joined.astype(np.uint8), p.levels.astype(np.float32)[digits]


def prepare_codebook(p: PackedVQ | PackedGrid) -> CodebookCPU:
    """The CPU kernel's layout of a `sage-vq` or `sage-grid` matrix (byte_codes, blocked 16 rows at a time)."""
    codes, words = byte_codes(p)
    d = words.shape[1]
    words_t = np.zeros((2 if d <= 2 else 4 if d <= 4 else MAX_DIM, len(words)), dtype=np.float32)
    words_t[:d] = words.T
    return CodebookCPU(_run_major(codes), words_t, p.scale.astype(np.float32), p.shape, d)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def table_run(x, b, codewords_t, d, row):
    """row[c] = codewords[c] . x[b : b + D] for every codeword c: one run's table. One pass over the K entries
    with all D terms at once, padded to 2, 4 or 8 (the rows past D weigh 0): a pass per term loads and stores
    the entries D times, and eight terms for every D cost D = 4 twice its multiply-adds."""
    k, zero = codewords_t.shape[1], np.float32(0)
    x0, x1 = x[b], x[b + 1] if d > 1 else zero
    if d <= 2:
        for c in range(k):
            row[c] = x0 * codewords_t[0, c] + x1 * codewords_t[1, c]
        return
    x2, x3 = x[b + 2], x[b + 3] if d > 3 else zero
    if d <= 4:
        for c in range(k):
            row[c] = x0 * codewords_t[0, c] + x1 * codewords_t[1, c] + x2 * codewords_t[2, c] + x3 * codewords_t[3, c]
        return
    x4, x5 = x[b + 4], x[b + 5] if d > 5 else zero
    x6, x7 = x[b + 6] if d > 6 else zero, x[b + 7] if d > 7 else zero
    for c in range(k):
        row[c] = (x0 * codewords_t[0, c] + x1 * codewords_t[1, c] + x2 * codewords_t[2, c]
                  + x3 * codewords_t[3, c] + x4 * codewords_t[4, c] + x5 * codewords_t[5, c]
                  + x6 * codewords_t[6, c] + x7 * codewords_t[7, c])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _tables(x: np.ndarray, codewords_t: np.ndarray, d: int) -> np.ndarray:
    """float32 (T, runs * K): [t, j K + c] = codewords[c] . x[t, jD : jD + D]; x (T, runs * D), codewords_t
    as CodebookCPU's."""
    k = codewords_t.shape[1]
    n_tok, runs = x.shape[0], x.shape[1] // d
    out = np.empty((n_tok, runs * k), dtype=np.float32)
    for tj in prange(n_tok * runs):
        t, j = tj // runs, tj % runs
        table_run(x[t], j * d, codewords_t, d, out[t, j * k:(j + 1) * k])
    return out


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _table_matmul(tables: np.ndarray, k: int, codes: np.ndarray, runs: int, chunk: int) -> np.ndarray:
    """float32 (T, blocks * 16): y[t, r] = sum_j tables[t, j k + code of row r's run j], runs in chunks."""
    n_tok = tables.shape[0]
    blocks = codes.size // (runs * ROWS)
    y = np.zeros(n_tok * blocks * ROWS, dtype=np.float32)
    flat = tables.reshape(-1)
    for j0 in range(0, runs, chunk):
        n = min(chunk, runs - j0)
        for b in prange(blocks):
            for t in range(n_tok):
                table_rows16(y, (t * blocks + b) * ROWS, flat, t * runs * k + j0 * k, k, codes,
                             (j0 * blocks + b) * ROWS, blocks * ROWS, n)
    return y.reshape(n_tok, blocks * ROWS)


@njit(cache=True, fastmath=FASTMATH)
def _permute_matmul(tables: np.ndarray, codes: np.ndarray, runs: int, blocks: int) -> np.ndarray:
    """_table_matmul for 256-entry tables on AVX-512: run by run, the run's table in registers, all rows."""
    n_tok = tables.shape[0]
    y = np.zeros(n_tok * blocks * ROWS, dtype=np.float32)
    flat = tables.reshape(-1)
    for t in range(n_tok):
        yt = y[t * blocks * ROWS:(t + 1) * blocks * ROWS]
        for j in range(runs):
            table_run_blocks(yt, flat, (t * runs + j) * 256, codes, j * blocks * ROWS, ROWS, blocks)
    return y.reshape(n_tok, blocks * ROWS)


_tables_serial = serial_twin(_tables)
_table_matmul_serial = serial_twin(_table_matmul)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _decode_tile(codes: np.ndarray, codewords_t: np.ndarray, d: int, scale: np.ndarray, runs: int, stride: int,
                 r0: int, r1: int, tile: np.ndarray) -> None:
    """tile[:r1 - r0, :runs * D] = rows r0..r1 of scale * codewords[codes]; run j's codes from j * stride, row r
    at r within them. Rows split over the threads: 1.0 against 1.75 ms for a 1536 x 576 tile on one."""
    for r in prange(r0, r1):
        s = scale[r]
        for j in range(runs):
            c = codes[r + j * stride]
            for i in range(d):
                tile[r - r0, j * d + i] = s * codewords_t[i, c]


@njit(cache=True, parallel=True)
def _decode_bytes(codes: np.ndarray, book: np.ndarray, d: int, runs: int, stride: int, r0: int, r1: int,
                  rows: np.ndarray) -> None:
    """rows[:r1 - r0, :runs * D] = the byte codewords (book uint8 (terms, K)) of rows r0..r1, 128 past them: the
    int8 GEMM's rows straight from the codes, as _decode_tile makes float32 ones."""
    if d == 4:  # a run is a word of the row: one load and store a run, not four (vq203 prefill: 0.050 -> 0.031 s)
        words, book4 = rows.view(np.uint32), np.ascontiguousarray(book.T).view(np.uint32)
        for r in prange(r0, r1):
            out = words[r - r0]
            for j in range(runs):
                out[j] = book4[codes[r + j * stride], 0]
            out[runs:] = 0x80808080
        return
    for r in prange(r0, r1):
        out = rows[r - r0]
        for j in range(runs):
            c = codes[r + j * stride]
            for i in range(d):
                out[j * d + i] = book[i, c]
        out[runs * d:] = 128


def codebook_matmul(x: np.ndarray, w: CodebookCPU, int8: bool = True) -> np.ndarray:
    """float32 (T, out) = x (T, in) @ W_hat.T, W_hat the scaled codewords of w (no rotation: the caller's);
    int8=False keeps a prefill's product off the int8 GEMM (tiles.tiled_matmul)."""
    out, runs, k = w.shape[0], w.runs, w.codewords_t.shape[1]
    xp = padded(x, runs * w.dim)
    if xp.shape[0] <= TABLE_MAX_TOKENS:
        small = xp.size * out < PARALLEL_MIN_WEIGHTS
        tables = (_tables_serial if small else _tables)(xp, w.codewords_t, w.dim)
        if AVX512 and k == 256 and small:
            y = _permute_matmul(tables, w.codes, runs, w.blocks)
        else:
            chunk = max(1, CHUNK_BYTES // (4 * k))
            y = (_table_matmul_serial if small else _table_matmul)(tables, k, w.codes, runs, chunk)
        return y[:, :out] * w.scale
    stride = w.blocks * ROWS

    book, s = int8_gemm.byte_table(w.codewords_t)

    def decode_bytes(r0: int, r1: int, rows: np.ndarray, scales: np.ndarray) -> None:
        _decode_bytes(w.codes, book, w.dim, runs, stride, r0, r1, rows)
        scales[: r1 - r0] = w.scale[r0:r1] * s

    return tiled_matmul(xp, out, runs * w.dim, lambda r0, r1, tile: _decode_tile(
        w.codes, w.codewords_t, w.dim, w.scale, runs, stride, r0, r1, tile), decode_bytes if int8 else None)


def decode_rows(w: CodebookCPU, rows: np.ndarray) -> np.ndarray:
    """float32 (len(rows), in): the scaled codewords of the given rows (an embedding lookup)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    j = np.arange(w.runs)
    at = rows[:, None] + j[None, :] * (w.blocks * ROWS)
    vals = w.codewords_t[: w.dim].T[w.codes[at]]  # (n, runs, D)
    return (w.scale[rows, None] * vals.reshape(len(rows), -1))[:, : w.shape[1]]

"""CPU matmul on free-level `sage-grid` weights held at their stored bits (Numba): y = x @ W_hat.T with
W_hat[r, c] = scale[r] * levels[code[r, c]], for B = 2 to 5 bit codes and any 2^B levels.

The `sage` LUT kernel needs levels mirrored about 0, and the codebook kernel holds a byte per run of 8 // B
weights (8 bits a weight at 5 bits); a 3- to 5-bit grid with free levels (the recipe's default, and the packed
lm_head) ran from an FP16 copy, 2 bytes a weight. Here each code stays B bits in memory, laid out so 16 rows sit
side by side in one vector: per column, one shift (a funnel shift where a 3- or 5-bit code straddles two words)
puts the 16 rows' codes in the low bits of 16 lanes, one `vpermps` (`vpermt2ps` for 32 levels) turns them into
level values, and one multiply-add by the broadcast x[c] accumulates them: 3 vector instructions per 16
weights at any B, no table to build per token. Prefill decodes rows into tiles for BLAS (tiles.py), as the
codebook kernel does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from sagekit.format.sage_grid import PackedGrid
from sagekit.kernels import int8_gemm
from sagekit.kernels.fastmath import FASTMATH
from sagekit.kernels.llvm_intrinsics import _F16, _I16, AVX512, ROWS, _Loop, _splat
from sagekit.kernels.serial_twin import serial_twin
from sagekit.kernels.tiles import padded, tiled_matmul

BITS = (2, 3, 4, 5)  # codes this kernel runs: 2^B levels fit the one or two registers a permute reads
CHUNK = 32  # columns per chunk: B words of 16 lanes hold a 16-row block's codes of 32 columns
TABLE_MAX_TOKENS = 3  # from 4 tokens on, decoding row tiles for BLAS costs less than a lookup per weight
PARALLEL_MIN_WEIGHTS = 1 << 21  # smaller products run on the calling thread, as the other kernels' do
PREPARE_ROWS = 1024  # rows re-laid at a time at load (a multiple of 16)
ACCUMULATORS = 4  # a zmm multiply-add's latency (4 cycles) over its issue interval (1 per cycle)


@dataclass(frozen=True)
class LevelCPU:
    """A free-level grid matrix re-laid once at load time for the kernel."""

    # uint32 flat (blocks, chunks, B, 16), blocks = ceil(out / 16), chunks = ceil(in / 32): for block b's
    # row 16 b + i and chunk k, word w is [((b * chunks + k) * B + w) * 16 + i]. The chunk's B words, read as one
    # little-endian string of 32 B bits, hold column 32 k + c's code at bits B c .. B c + B - 1 (at 3 and 5 bits
    # some codes straddle two words). Rows past `out` and columns past `in` hold code 0.
    codes: np.ndarray
    table: np.ndarray  # float32 (16,) or (32,): the levels, repeated so the permute may read junk high bits
    levels: np.ndarray  # float32 (2^B,)
    scale: np.ndarray  # float32 (out,)
    shape: tuple[int, int]  # (out, in)
    bits: int

    @property
    def chunks(self) -> int:
        return -(-self.shape[1] // CHUNK)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.table.nbytes + self.levels.nbytes + self.scale.nbytes)


def prepare_levels(p: PackedGrid) -> LevelCPU:
    """The kernel's layout of a `sage-grid` matrix with 2-5 bit codes (any levels), made PREPARE_ROWS rows at
    a time: the whole index matrix of a 49152-row head would be a 113 MB temporary at load."""
    if p.bits not in BITS:
        raise ValueError(f"level kernel: {p.bits}-bit codes, expected one of {BITS}")
    out, in_ = p.shape
    blocks, chunks = -(-out // ROWS), -(-in_ // CHUNK)
    words = np.zeros((blocks, chunks, p.bits, ROWS), dtype=np.uint32)
    for r0 in range(0, out, PREPARE_ROWS):
        part = _lane_words(p.indices(np.arange(r0, min(out, r0 + PREPARE_ROWS))), p.bits, chunks)
        words[r0 // ROWS: r0 // ROWS + len(part)] = part
    levels = p.levels.astype(np.float32)
    table = np.resize(levels, 32 if p.bits == 5 else 16)
    return LevelCPU(words.reshape(-1), table, levels, p.scale.astype(np.float32), p.shape, p.bits)


def _lane_words(indices: np.ndarray, bits: int, chunks: int) -> np.ndarray:
    """uint32 (blocks, chunks, B, 16) of LevelCPU's layout for uint8 (rows, in) level indices."""
    blocks = -(-indices.shape[0] // ROWS)
    idx = np.zeros((blocks * ROWS, chunks * CHUNK), dtype=np.uint32)
    idx[: indices.shape[0], : indices.shape[1]] = indices
    idx = idx.reshape(blocks, ROWS, chunks, CHUNK).transpose(0, 2, 1, 3)  # (blocks, chunks, 16, 32)
    words = np.zeros((blocks, chunks, bits, ROWS), dtype=np.uint32)
    for c in range(CHUNK):
        w, shift = divmod(bits * c, 32)
        words[:, :, w] |= idx[..., c] << shift  # bits past 32 fall off here, and the next word takes them
        if shift + bits > 32:
            words[:, :, w + 1] |= idx[..., c] >> (32 - shift)
    return words


@intrinsic
def level_block16(typingctx, acc, a0, codes, c0, chunks, table, x, x0, bits):
    """acc[a0 : a0+16] += sum_c levels[code[row, c]] * x[x0 + c] for the 16 rows of one block.

    Layout: codes as LevelCPU.codes, the block's words from c0, `chunks` chunks of B words of 16 lanes;
    table float32 (16,) or (32,) as LevelCPU.table; x float32 flat, the token's inputs from x0, zero past
    `in`; bits 2..5 picks one of four bodies, each unrolled over a chunk's 32 columns. ACCUMULATORS take the
    columns in turn, so a multiply-add waits on none of the 3 before it. AVX-512 only."""
    if not (AVX512 and all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (acc, table, x))
            and isinstance(codes, types.Array) and codes.dtype == types.uint32
            and all(t == types.int64 for t in (a0, c0, chunks, x0, bits))):
        return None

    def codegen(context, builder, sig, args):
        _, a0_v, _, c0_v, chunks_v, _, _, x0_v, bits_v = args
        # data pointers by argument position: 0 acc, 2 codes, 5 table, 6 x
        data = {i: context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 2, 5, 6)}
        for n_bits in BITS:
            with builder.if_then(builder.icmp_signed("==", bits_v, ir.Constant(bits_v.type, n_bits))):
                total = _level_body(builder, data, c0_v, chunks_v, x0_v, n_bits)
                pa = builder.bitcast(builder.gep(data[0], [a0_v]), _F16.as_pointer())
                builder.store(builder.fadd(builder.load(pa, align=4), total), pa, align=4)

    return types.void(acc, a0, codes, c0, chunks, table, x, x0, bits), codegen


def _level_body(builder, data, c0_v, chunks_v, x0_v, n_bits):
    """IR of level_block16 for B = n_bits: the loop over chunks; returns the 16 sums."""
    i64 = ir.IntType(64)
    tab = [builder.load(builder.bitcast(builder.gep(data[5], [ir.Constant(i64, 16 * h)]), _F16.as_pointer()),
                        align=4) for h in range(2 if n_bits == 5 else 1)]
    module = builder.module
    if n_bits == 5:  # vpermt2ps: 5 index bits over two registers
        perm = cgutils.get_or_insert_function(module, ir.FunctionType(_F16, [_F16, _I16, _F16]),
                                              "llvm.x86.avx512.vpermi2var.ps.512")
        lookup = lambda idx: builder.call(perm, [tab[0], idx, tab[1]])
    else:  # vpermps: the low 4 index bits; the table repeats the levels, so the next code's bits do not matter
        perm = cgutils.get_or_insert_function(module, ir.FunctionType(_F16, [_F16, _I16]),
                                              "llvm.x86.avx512.permvar.sf.512")
        lookup = lambda idx: builder.call(perm, [tab[0], idx])
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(_F16, [_F16] * 3), "llvm.fmuladd.v16f32")
    fshr = cgutils.get_or_insert_function(module, ir.FunctionType(_I16, [_I16] * 3), "llvm.fshr.v16i32")
    splat_i = lambda v: ir.Constant(_I16, [v] * ROWS)
    loop = _Loop(builder, ir.Constant(i64, 0), chunks_v, carried=ACCUMULATORS, name=f"levels{n_bits}")
    k, accs = loop.i, list(loop.values)
    base = builder.add(c0_v, builder.mul(k, ir.Constant(i64, n_bits * ROWS)))
    xk = builder.add(x0_v, builder.mul(k, ir.Constant(i64, CHUNK)))
    words = [builder.load(builder.bitcast(builder.gep(data[2], [builder.add(base, ir.Constant(i64, w * ROWS))]),
                                          _I16.as_pointer()), align=4) for w in range(n_bits)]
    for c in range(CHUNK):
        w, shift = divmod(n_bits * c, 32)
        if shift + n_bits > 32:  # the code straddles words w and w + 1: one funnel shift of the pair
            idx = builder.call(fshr, [words[w + 1], words[w], splat_i(shift)])
        else:
            idx = builder.lshr(words[w], splat_i(shift)) if shift else words[w]
        xc = builder.load(builder.gep(data[6], [builder.add(xk, ir.Constant(i64, c))]))
        a = c % ACCUMULATORS
        accs[a] = builder.call(fma, [lookup(idx), _splat(builder, xc), accs[a]])
    loop.end(accs)
    sums = loop.values
    while len(sums) > 1:  # pairwise, in a fixed order
        sums = [builder.fadd(sums[i], sums[i + 1]) for i in range(0, len(sums), 2)]
    return sums[0]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _level_matmul(x, codes, table, chunks, bits):
    """float32 (T, blocks * 16) of the unscaled product; x float32 (T, chunks * 32) zero-padded."""
    n_tok = x.shape[0]
    blocks = codes.size // (chunks * bits * ROWS)
    y = np.zeros(n_tok * blocks * ROWS, dtype=np.float32)
    flat = x.reshape(-1)
    for b in prange(blocks):
        for t in range(n_tok):
            level_block16(y, (t * blocks + b) * ROWS, codes, b * chunks * bits * ROWS, chunks, table, flat,
                          t * chunks * CHUNK, bits)
    return y.reshape(n_tok, blocks * ROWS)


_level_matmul_serial = serial_twin(_level_matmul)


@njit(cache=True, parallel=True)
def _decode_words(codes, levels, scale, chunks, bits, rows, tile):
    """tile[i, :chunks * 32] = row rows[i] of scale * levels[code] (the padding columns too), rows split over the
    threads (a prefill's tiles), for 2 and 4 bits: word w holds whole codes, column w (32 // B) + j at bits B j.
    Nested loops reach each without a division per weight, which made a 1536 x 576 tile 9 times as slow on one
    thread (BENCHMARKS, session 13)."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    for i in prange(rows.size):
        r, out = rows[i], tile[i]  # a row's view: indexing the 2-D tile in the inner loop took twice as long
        b, lane, s = r // ROWS, r % ROWS, scale[r]
        for k in range(chunks):
            base = (b * chunks + k) * bits * ROWS + lane
            for w in range(bits):
                word, c0 = codes[base + w * ROWS], k * CHUNK + w * per_word
                for j in range(per_word):
                    out[c0 + j] = s * levels[(word >> (bits * j)) & mask]


@njit(cache=True, parallel=True)
def _decode_string(codes, levels, scale, chunks, bits, rows, tile):
    """_decode_words for 3 and 5 bits: column c's code starts at bit B c of the chunk's words, and straddles two
    words where it crosses a multiple of 32. The words stream through a 64-bit buffer, refilled when it holds
    fewer than B bits, instead of locating each code's word and shift."""
    mask = (1 << bits) - 1
    for i in prange(rows.size):
        r = rows[i]  # indexing the 2-D tile here ran faster than a row's view, the other way round from above
        b, lane, s = r // ROWS, r % ROWS, scale[r]
        for k in range(chunks):
            at = (b * chunks + k) * bits * ROWS + lane
            buf, held = np.int64(0), 0
            for c in range(CHUNK):
                if held < bits:
                    buf |= np.int64(codes[at]) << held
                    at += ROWS
                    held += 32
                tile[i, k * CHUNK + c] = s * levels[buf & mask]
                buf >>= bits
                held -= bits


_SERIAL = {_decode_words: serial_twin(_decode_words), _decode_string: serial_twin(_decode_string)}


def _decode(w: LevelCPU, rows: np.ndarray, tile: np.ndarray, serial: bool = False) -> None:
    """tile[i] = the scaled levels of row rows[i] of w (the padding columns too): on all threads, or serial
    (the embedding's few rows)."""
    kernel = _decode_words if 32 % w.bits == 0 else _decode_string
    (_SERIAL[kernel] if serial else kernel)(w.codes, w.levels, w.scale, w.chunks, w.bits, rows, tile)


def _byte_decoder(w: LevelCPU) -> Callable[[int, int, np.ndarray, np.ndarray], None]:
    """tiles.tiled_matmul's decode_bytes for w: rows r0..r1 as the int8 GEMM's bytes, and their scales. The same
    decoders, given the levels as bytes (int8_gemm.byte_table) and unit scales, write q + 128 where they write
    scale * level."""
    levels, s = int8_gemm.byte_table(w.levels)
    kernel = _decode_words if 32 % w.bits == 0 else _decode_string
    unit = np.ones(w.shape[0], dtype=np.uint8)

    def decode_bytes(r0: int, r1: int, rows: np.ndarray, scales: np.ndarray) -> None:
        kernel(w.codes, levels, unit, w.chunks, w.bits, np.arange(r0, r1), rows)
        scales[: r1 - r0] = w.scale[r0:r1] * s

    return decode_bytes


def level_matmul(x: np.ndarray, w: LevelCPU, int8: bool = True) -> np.ndarray:
    """float32 (T, out) = x (T, in) @ W_hat.T (no rotation: the caller's); int8=False keeps a prefill's
    product off the int8 GEMM (tiles.tiled_matmul)."""
    out, width = w.shape[0], w.chunks * CHUNK
    xp = padded(x, width)
    if xp.shape[0] <= TABLE_MAX_TOKENS and AVX512:
        small = xp.shape[0] * w.shape[0] * w.shape[1] < PARALLEL_MIN_WEIGHTS
        y = (_level_matmul_serial if small else _level_matmul)(xp, w.codes, w.table, w.chunks, w.bits)
        return y[:, :out] * w.scale
    return tiled_matmul(xp, out, width, lambda r0, r1, tile: _decode(w, np.arange(r0, r1), tile),
                        _byte_decoder(w) if int8 else None)


def level_rows(w: LevelCPU, rows: np.ndarray) -> np.ndarray:
    """float32 (len(rows), in): the scaled levels of the given rows (an embedding lookup)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    tile = np.empty((rows.size, w.chunks * CHUNK), dtype=np.float32)
    _decode(w, rows, tile, serial=True)
    return tile[:, : w.shape[1]]

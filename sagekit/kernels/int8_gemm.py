"""Prefill GEMM at int8 (AVX-512 VNNI, Numba): y = x @ W.T with each token of x rounded to int8 at its own
scale, as llama.cpp rounds its activations to Q8_0, and W's rows as int8 bytes at a scale per row, which the
codebook and level kernels decode straight from their codes (byte_table: a `sage-vq` codebook is int8 already).

Why: a 512-token prefill spent 0.58 of its 0.86 s in float32 BLAS, which OpenBLAS already runs at 87% of
the CPU's float32 peak (200 of 231 GFLOP/s, two Zen 4 cores). One `vpdpbusd` does 64 multiply-adds where an
FMA does 16: 918 GOP/s in a register-only loop (BENCHMARKS, session 20). The cost is the rounding of x to
8 bits, which the rotation ahead of every codebook matmul makes gentle (no outlier sets the scale of a token).

The byte products are unsigned weight times signed input, what `vpdpbusd` multiplies: a weight is stored as
q + 128 (q in -127..127), so sum (q + 128) x = sum q x + 128 sum x, and the second term, one number per
token, is taken off before scaling.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from sagekit.kernels import scratch
from sagekit.kernels.fastmath import FASTMATH
from sagekit.kernels.llvm_intrinsics import AVX512, ROWS, _has, _Loop, _splat

VNNI = AVX512 and _has("avx512vnni")
TOKENS = 12  # tokens per micro-kernel step: 2 x 12 accumulators, 2 weight vectors and a spare of 32 zmm
PANEL = 2  # 16-row blocks per micro-kernel step
PANEL_ROWS = PANEL * ROWS
_I32x16 = ir.VectorType(ir.IntType(32), ROWS)
_F32x16 = ir.VectorType(ir.FloatType(), ROWS)
# LLVM 22 retyped the VNNI intrinsics' byte operands from <16 x i32> to <64 x i8> (llvm-project #155194)
_BYTES = ir.VectorType(ir.IntType(8), 64) if llvm_binding.llvm_version_info >= (22,) else _I32x16


def _sums(builder, k4, wq, w0, xq, x0, dot) -> list:
    """The PANEL x TOKENS int32 sum vectors of one micro-kernel step, carried through K as loop phis."""
    i64 = ir.IntType(64)
    loop = _Loop(builder, ir.Constant(i64, 0), k4, carried=PANEL * TOKENS, name="vnni", vector=_I32x16)
    w_at = builder.add(w0, builder.mul(loop.i, ir.Constant(i64, PANEL_ROWS * 4)))
    weights = []
    for j in range(PANEL):
        p = builder.gep(wq, [builder.add(w_at, ir.Constant(i64, ROWS * 4 * j))])
        weights.append(builder.load(builder.bitcast(p, _BYTES.as_pointer()), align=1))
    x_at = builder.add(x0, builder.mul(loop.i, ir.Constant(i64, TOKENS)))
    following = []
    for t in range(TOKENS):
        four = builder.load(builder.gep(xq, [builder.add(x_at, ir.Constant(i64, t))]))
        xb = builder.bitcast(_splat(builder, four, _I32x16), _BYTES)
        following += [builder.call(dot, [loop.values[t * PANEL + j], weights[j], xb]) for j in range(PANEL)]
    loop.end(following)
    return loop.values


@intrinsic
def _panel(typingctx, y, y0, ystride, xq, x0, k4, wq, w0, sx, corr, sw, s0, tokens):
    """One micro-kernel step: PANEL x 16 rows by TOKENS tokens, the sums held in registers through K, then
    y = sx[t] sw[r] (sum - corr[t]).

    Layout: wq uint8 flat, from w0: (k4, PANEL, 16, 4), row i of block j's bytes 4k..4k+3 at
    ((k PANEL + j) 16 + i) 4, stored q + 128; xq int32 flat, from x0: (k4, TOKENS), each int32 four int8
    inputs of one token; y float32 flat, token t's 32 rows at y0 + t ystride, written for t < tokens;
    sx, corr (TOKENS,) from the token group's start, sw (PANEL 16,) from s0."""
    if not (all(isinstance(a, types.Array) for a in (y, xq, wq, sx, corr, sw))
            and all(t == types.int64 for t in (y0, ystride, x0, k4, w0, s0, tokens))):
        return None

    def codegen(context, builder, sig, args):
        y_v, y0_v, ys_v, xq_v, x0_v, k4_v, wq_v, w0_v, sx_v, corr_v, sw_v, s0_v, n_v = args
        i64 = ir.IntType(64)
        y_d, xq_d, wq_d, sx_d, corr_d, sw_d = (context.make_array(ty)(context, builder, v).data
                                               for ty, v in zip(sig.args, args) if isinstance(ty, types.Array))
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32x16, [_I32x16, _BYTES, _BYTES]),
                                             "llvm.x86.avx512.vpdpbusd.512")
        sums = _sums(builder, k4_v, wq_d, w0_v, xq_d, x0_v, dot)
        scales = [builder.load(builder.bitcast(builder.gep(sw_d, [builder.add(s0_v, ir.Constant(i64, ROWS * j))]),
                                               _F32x16.as_pointer()), align=4) for j in range(PANEL)]
        for t in range(TOKENS):
            tc = ir.Constant(i64, t)
            with builder.if_then(builder.icmp_signed("<", tc, n_v)):
                c = _splat(builder, builder.load(builder.gep(corr_d, [tc])), _I32x16)
                s = _splat(builder, builder.load(builder.gep(sx_d, [tc])))
                row0 = builder.add(y0_v, builder.mul(tc, ys_v))
                for j in range(PANEL):
                    v = builder.sitofp(builder.sub(sums[t * PANEL + j], c), _F32x16)
                    p = builder.gep(y_d, [builder.add(row0, ir.Constant(i64, ROWS * j))])
                    builder.store(builder.fmul(builder.fmul(v, s), scales[j]),
                                  builder.bitcast(p, _F32x16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(y, y0, ystride, xq, x0, k4, wq, w0, sx, corr, sw, s0, tokens), codegen


@intrinsic
def _as_float(typingctx, bits):
    """The float32 whose bits are the int32 `bits`."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _round_token(src: np.ndarray, dst: np.ndarray) -> np.float32:
    """dst = round(src / s) (int8, zeros past src.size) at the scale s = max |src| / 127; returns s (0 for a
    zero token). The max runs on the float bits with the sign cleared, whose integer order is the floats': an
    integer max vectorises, a float one without reassociation does not (3.6x)."""
    bits = src.view(np.int32)
    top_bits = np.int32(0)
    for c in range(bits.size):
        top_bits = max(top_bits, bits[c] & np.int32(0x7FFFFFFF))
    top = _as_float(np.int32(top_bits))
    inv = np.float32(127.0) / top if top > 0 else np.float32(0.0)
    for c in range(src.size):
        dst[c] = np.int8(np.rint(src[c] * inv))
    dst[src.size:] = 0
    return top / np.float32(127.0)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def quantize_tokens(x: np.ndarray, rows: np.ndarray, xq: np.ndarray, sx: np.ndarray, corr: np.ndarray) -> None:
    """x float32 (T, K) into xq int32 (groups, k4, TOKENS) flat, four int8 inputs a word, sx float32 the
    token scales and corr int32 = 128 sum_k q[t, k] (groups = ceil(T / TOKENS); tokens past T are zero).
    rows: int8 (groups TOKENS, 4 k4) scratch, the rounded tokens before their interleaving."""
    n = x.shape[0]
    for t in prange(sx.size):
        if t < n:
            sx[t] = _round_token(x[t], rows[t])
            total = 0
            for c in range(x.shape[1]):
                total += rows[t, c]
            corr[t] = 128 * total
        else:
            rows[t, :] = 0
            sx[t], corr[t] = 0.0, 0
    interleave(rows, xq, TOKENS)


@njit(cache=True, parallel=True)
def interleave(rows: np.ndarray, out: np.ndarray, group: int) -> None:
    """Byte rows (groups x group, 4 k4) into the GEMM's layout, out int32 (groups, k4, group) flat, each word a
    row's four bytes 4k..4k+3: tokens in groups of TOKENS, weight rows in panels of PANEL_ROWS."""
    k4 = rows.shape[1] // 4
    words = rows.view(np.int32)
    for g in prange(rows.shape[0] // group):
        for k in range(k4):
            for i in range(group):
                out[(g * k4 + k) * group + i] = words[g * group + i, k]


@njit(cache=True, parallel=True)
def gemm(y: np.ndarray, col0: int, n_tok: int, xq: np.ndarray, k4: int, sx: np.ndarray, corr: np.ndarray,
         wq: np.ndarray, sw: np.ndarray) -> None:
    """y[:n_tok, col0 : col0 + rows] = (x @ W.T) from quantize_tokens' and interleave's arrays (rows =
    sw.size, a multiple of PANEL_ROWS; y float32 (n_tok, >= col0 + rows) C-contiguous)."""
    ystride = y.shape[1]
    yf = y.reshape(-1)
    groups = -(-n_tok // TOKENS)
    for p in prange(sw.size // PANEL_ROWS):
        for g in range(groups):
            t0 = g * TOKENS
            _panel(yf, t0 * ystride + col0 + p * PANEL_ROWS, ystride, xq, g * k4 * TOKENS, k4,
                   wq, p * k4 * PANEL_ROWS * 4, sx[t0:], corr[t0:], sw, p * PANEL_ROWS, min(TOKENS, n_tok - t0))


def byte_table(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """A matrix's few distinct weights before its row scales (a codebook, a grid's levels) rounded to int8 at
    one scale s = max |value| / 127 and stored q + 128, and s: a row's int8 scale is its own scale times s, so
    its bytes come straight from the codes. A `sage-vq` codebook is stored as int8 at that very scale, so its
    bytes are exact: vq203's products erred 0.73-0.81% (the tokens' rounding alone) against 0.95-0.99% with each
    decoded row rounded at its own max."""
    top = np.float32(np.abs(values).max()) if values.size else np.float32(0.0)
    s = top / np.float32(127.0) if top > 0 else np.float32(1.0)
    return (np.rint(values / s) + 128).astype(np.uint8), s


class RoundedTokens:
    """x (T, K) rounded to int8 once, for the row tiles of one matrix to be multiplied by in turn."""

    def __init__(self, x: np.ndarray):
        self.n_tok, width = x.shape
        self.k4 = k4 = -(-width // 4)
        slots = -(-self.n_tok // TOKENS) * TOKENS
        rows = scratch.buffer("xrows", slots * 4 * k4, np.int8).reshape(slots, 4 * k4)
        self.xq = scratch.buffer("xq", slots * k4, np.int32)
        self.sx, self.corr = scratch.buffer("sx", slots, np.float32), scratch.buffer("corr", slots, np.int32)
        quantize_tokens(x, rows, self.xq, self.sx, self.corr)

    def row_buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Scratch for n weight rows rounded to int8: (uint8 (n rounded up to PANEL_ROWS, 4 k4), their float32
        scales), for multiply_rows; rows past n are made zero there."""
        padded = -(-n // PANEL_ROWS) * PANEL_ROWS
        rows = scratch.buffer("wrows", padded * 4 * self.k4, np.uint8).reshape(padded, 4 * self.k4)
        return rows, scratch.buffer("sw", padded, np.float32)

    def multiply_rows(self, n: int, rows: np.ndarray, sw: np.ndarray, y: np.ndarray, col0: int) -> None:
        """y[:, col0 : col0 + n] = x @ W.T for the first n rows of row_buffers' arrays (q + 128 bytes, 128 past
        the weight's width, and their scales); y float32 (T, >= col0 + n rounded up to PANEL_ROWS),
        C-contiguous."""
        rows[n:], sw[n:] = 128, 0.0
        wq = scratch.buffer("wq", rows.shape[0] * self.k4, np.int32)
        interleave(rows, wq, PANEL_ROWS)
        gemm(y, col0, self.n_tok, self.xq, self.k4, self.sx, self.corr, wq.view(np.uint8), sw)

"""LLVM IR of the codebook matmul's lookups (codebook_matmul.py): a 16-row table gather per run, and with
AVX-512 a run's 256-entry table held in registers; for the fused decode step (decode_step.py), the table made
in registers as bfloat16 byte planes and looked up with byte permutes (AVX-512 BF16 and VBMI). Built on
llvm_intrinsics' helpers; the same cache caveat holds: after editing here, clear Numba's cache.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from sagekit.kernels.llvm_intrinsics import (
    _F16,
    _I8P,
    _I16,
    AVX512,
    AVX512_BF16,
    AVX512_VBMI,
    ROWS,
    _Loop,
    _vector_ptr,
)


def _gather16(builder, base, idx):
    """16 lanes of base[idx] for a float32 base pointer: one AVX-512 `vgatherdps`, else 16 scalar loads."""
    if AVX512:
        i1x16 = ir.VectorType(ir.IntType(1), ROWS)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_F16, [_F16, _I8P, _I16, i1x16, ir.IntType(32)]),
            "llvm.x86.avx512.mask.gather.dps.512")
        return builder.call(fn, [ir.Constant(_F16, None), builder.bitcast(base, _I8P), idx,
                                 ir.Constant(i1x16, [1] * ROWS), ir.Constant(ir.IntType(32), 4)])
    out = ir.Constant(_F16, None)
    for lane in range(ROWS):
        i = builder.extract_element(idx, ir.Constant(ir.IntType(32), lane))
        out = builder.insert_element(out, builder.load(builder.gep(base, [i])), ir.Constant(ir.IntType(32), lane))
    return out


@intrinsic
def table_rows16(typingctx, acc, a0, tab, t0, k, codes, c0, stride, runs):
    """acc[a0:a0+16] += sum_{j < runs} tab[t0 + k j + codes[c0 + stride j + i]] in lane i: sixteen rows of
    the codebook matmul (codebook_matmul.py), one gather per run of D weights.

    Layout: codes uint8 flat, [c0 + stride j + i] = row i's code of run j (16 codes side by side per run);
    tab float32 flat, one token's table from t0, k entries per run. Two accumulators take alternate runs so
    an add does not wait on the one before it."""
    if not (all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (acc, tab))
            and isinstance(codes, types.Array) and codes.dtype == types.uint8
            and all(t == types.int64 for t in (a0, t0, k, c0, stride, runs))):
        return None

    def codegen(context, builder, sig, args):
        acc_v, a0_v, tab_v, t0_v, k_v, codes_v, c0_v, stride_v, runs_v = args
        i64, i32 = ir.IntType(64), ir.IntType(32)
        tab_data = context.make_array(sig.args[2])(context, builder, tab_v).data
        codes_data = context.make_array(sig.args[5])(context, builder, codes_v).data
        base = builder.gep(tab_data, [t0_v])
        loop = _Loop(builder, ir.Constant(i64, 0), runs_v, carried=2, name="table16")
        j, accs = loop.i, loop.values
        ptr = builder.gep(codes_data, [builder.add(c0_v, builder.mul(j, stride_v))])
        code = builder.zext(builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), ROWS).as_pointer()),
                                         align=1), _I16)
        first = builder.insert_element(ir.Constant(_I16, None), builder.trunc(builder.mul(j, k_v), i32),
                                       ir.Constant(i32, 0))
        offset = builder.shuffle_vector(first, ir.Constant(_I16, None), ir.Constant(_I16, [0] * ROWS))
        loop.end([accs[1], builder.fadd(accs[0], _gather16(builder, base, builder.add(code, offset)))])
        pa = _vector_ptr(context, builder, sig.args[0], acc_v, a0_v, _F16)
        builder.store(builder.fadd(builder.load(pa, align=4), builder.fadd(accs[0], accs[1])), pa, align=4)

    return types.void(acc, a0, tab, t0, k, codes, c0, stride, runs), codegen


@intrinsic
def table_run_blocks(typingctx, acc, tab, t0, codes, c0, stride, blocks):
    """acc[16 b + i] += tab[t0 + codes[c0 + stride b + i]] for every 16-row block b < blocks: one run of the
    codebook matmul for all rows, its 256-entry table held in 16 registers (AVX-512 only).

    Each lane picks its entry with eight 32-entry `vpermt2ps` lookups (the low 5 code bits) and a 3-level
    blend tree on code bits 5, 6 and 7, which on this core beats one `vgatherdps` per 16 rows.
    Layout: codes uint8 flat, block b's 16 codes of the run at c0 + stride b; acc float32 (16 blocks,)."""
    if not (AVX512 and all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (acc, tab))
            and isinstance(codes, types.Array) and codes.dtype == types.uint8
            and all(t == types.int64 for t in (t0, c0, stride, blocks))):
        return None

    def codegen(context, builder, sig, args):
        acc_v, tab_v, t0_v, codes_v, c0_v, stride_v, blocks_v = args
        i64 = ir.IntType(64)
        acc_data = context.make_array(sig.args[0])(context, builder, acc_v).data
        tab_data = context.make_array(sig.args[1])(context, builder, tab_v).data
        codes_data = context.make_array(sig.args[3])(context, builder, codes_v).data
        regs = [builder.load(builder.bitcast(builder.gep(tab_data, [builder.add(t0_v, ir.Constant(i64, 16 * m))]),
                                             _F16.as_pointer()), align=4) for m in range(16)]
        perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F16, [_F16, _I16, _F16]),
                                              "llvm.x86.avx512.vpermi2var.ps.512")
        loop = _Loop(builder, ir.Constant(i64, 0), blocks_v, name="run16")
        b = loop.i
        ptr = builder.gep(codes_data, [builder.add(c0_v, builder.mul(b, stride_v))])
        idx = builder.zext(builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), ROWS).as_pointer()),
                                        align=1), _I16)
        picks = [builder.call(perm, [regs[2 * m], idx, regs[2 * m + 1]]) for m in range(8)]
        for bit in (32, 64, 128):
            high = builder.icmp_unsigned("!=", builder.and_(idx, ir.Constant(_I16, [bit] * ROWS)),
                                         ir.Constant(_I16, [0] * ROWS))
            picks = [builder.select(high, hi, lo) for lo, hi in zip(picks[0::2], picks[1::2])]
        pa = builder.bitcast(builder.gep(acc_data, [builder.mul(b, ir.Constant(i64, ROWS))]), _F16.as_pointer())
        builder.store(builder.fadd(builder.load(pa, align=4), picks[0]), pa, align=4)
        loop.end()

    return types.void(acc, tab, t0, codes, c0, stride, blocks), codegen


class _BFloat(ir.Type):
    """LLVM's bfloat, which llvmlite's IR builder has no class for: the type AVX-512 BF16's conversion returns."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash("bfloat")


def _byte_slot(i: int) -> int:
    """Where table_run_bytes adds row i of a 64-row group: its byte unpacking leaves row 16 k + 8 h + 2 j + o
    (k, j < 4; h, o < 2) in slot 16 (2 h + o) + 4 k + j."""
    k, rest = i // 16, i % 16
    return 16 * (2 * (rest // 8) + rest % 2) + 4 * k + (rest % 8) // 2


BYTE_SLOTS = np.array([_byte_slot(i) for i in range(64)], dtype=np.int64)  # row i of a group -> its slot


_I32 = ir.IntType(32)
_B64 = ir.VectorType(ir.IntType(8), 64)


def _table_registers(builder, cw_data, x_data, b, d):
    """T[c] = sum_{t < d} x[b + t] cw[t, c] as 16 float32 vectors (entries 16 m ..), from zero, one
    multiply-add per term in term order. cw's rows are 256 floats."""
    i64 = ir.IntType(64)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F16, [_F16] * 3), "llvm.fma.v16f32")
    terms = _Loop(builder, ir.Constant(i64, 0), d, carried=16, name="terms")
    xt = builder.load(builder.gep(x_data, [builder.add(b, terms.i)]))
    splat = builder.shuffle_vector(builder.insert_element(ir.Constant(_F16, None), xt, ir.Constant(_I32, 0)),
                                   ir.Constant(_F16, None), ir.Constant(_I16, [0] * ROWS))
    row = builder.gep(cw_data, [builder.mul(terms.i, ir.Constant(i64, 256))])
    vectors = [builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, ROWS * m)]), _F16.as_pointer()),
                            align=4) for m in range(16)]
    terms.end([builder.call(fma, [splat, v, f]) for v, f in zip(vectors, terms.values)])
    return terms.values


def _byte_planes(builder, floats):
    """The 256 entries rounded to bfloat16 and split: (high, low), 4 vectors each, byte p of plane n the high
    (low) byte of entry 64 n + p."""
    bf32 = ir.VectorType(_BFloat(), 2 * ROWS)
    to_bf16 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bf32, [_F16, _F16]),
                                             "llvm.x86.avx512bf16.cvtne2ps2bf16.512")
    # the conversion puts its second operand's 16 values in the low lanes: word p of words[m] is entry 32 m + p
    words = [builder.bitcast(builder.call(to_bf16, [floats[2 * m + 1], floats[2 * m]]), _B64) for m in range(8)]
    odd, even = (ir.Constant(ir.VectorType(_I32, 64), [2 * p + o for p in range(64)]) for o in (1, 0))
    return ([builder.shuffle_vector(words[2 * n], words[2 * n + 1], odd) for n in range(4)],
            [builder.shuffle_vector(words[2 * n], words[2 * n + 1], even) for n in range(4)])


def _add_group(builder, planes, idx, acc):
    """acc[BYTE_SLOTS[i]] += entry idx[i] for the 64 codes idx: per plane two 128-entry byte lookups and a
    blend on code bit 7, the planes interleaved into bfloat16 words, each dword's two words made float32."""
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_B64, [_B64] * 3),
                                          "llvm.x86.avx512.vpermi2var.qi.512")
    bit7 = builder.icmp_signed("<", idx, ir.Constant(_B64, [0] * 64))
    hi, lo = (builder.select(bit7, builder.call(perm, [p[2], idx, p[3]]), builder.call(perm, [p[0], idx, p[1]]))
              for p in planes)
    for h in (0, 1):  # vpunpck[lh]bw: word w of 128-bit lane k is row 16 k + 8 h + w
        order = [16 * k + w + 64 * side + 8 * h for k in range(4) for w in range(8) for side in (0, 1)]
        pairs = builder.bitcast(builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 64), order)), _I16)
        halves = (builder.shl(pairs, ir.Constant(_I16, [16] * ROWS)),
                  builder.and_(pairs, ir.Constant(_I16, [0xFFFF0000] * ROWS)))
        for o, f in enumerate(halves):
            pa = builder.bitcast(builder.gep(acc, [ir.Constant(ir.IntType(64), ROWS * (2 * h + o))]), _F16.as_pointer())
            builder.store(builder.fadd(builder.load(pa, align=4), builder.bitcast(f, _F16)), pa, align=4)


def _prefetch(builder, start, n):
    """Ask for the n bytes from `start` into L1 (`prefetcht0` a line at a time); past an array's end is harmless."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]),
                                        "llvm.prefetch.p0i8")
    lines = _Loop(builder, ir.Constant(n.type, 0), n, step=64, name="ahead")
    builder.call(fn, [builder.gep(start, [lines.i]), *(ir.Constant(_I32, v) for v in (0, 3, 1))])  # read, L1
    lines.end()


@intrinsic
def table_run_bytes(typingctx, acc, cw, x, b, d, codes, c0, blocks):
    """acc[64 g + BYTE_SLOTS[i]] += bf16(T[codes[c0 + 64 g + i]]) for every row 64 g + i < 16 blocks, where
    T[c] = sum_{t < d} x[b + t] cw[t, c]: one run of the codebook matmul for all rows.

    The run's table is made in 16 registers, rounded to bfloat16 (to nearest even, `vcvtne2ps2bf16`) and split
    into a high-byte and a low-byte plane of 4 registers each. It never goes through memory: stored and read
    back, it cost more than its lookups. Then 64 rows at a time: per plane two 128-entry `vpermi2b` lookups
    and a blend on code bit 7, the planes' bytes interleaved into bfloat16 words (`vpunpck[lh]bw`), and each
    dword's two words made float32 by a shift and a mask. A byte permute is one micro-op where a word permute is
    three. The rows leave the unpacking permuted within each group (BYTE_SLOTS); readers undo that once per
    product. While the table is made, the next run's codes are prefetched (6% of a decode step).

    Layout: cw float32 (terms, 256) C-contiguous, codeword c's term t at [t, c]; codes uint8 flat, the run's
    codes of rows 0, 1, ... at c0 and the next run's after them (a partial last group is read with a mask);
    acc float32, 64 ceil(blocks / 4) slots. Needs AVX-512 VBMI and BF16."""
    arrays = (acc, cw, x, codes)
    if not (AVX512_VBMI and AVX512_BF16 and all(isinstance(a, types.Array) for a in arrays)
            and [a.dtype for a in arrays] == [types.float32] * 3 + [types.uint8]
            and cw.ndim == 2 and cw.layout == "C" and all(t == types.int64 for t in (b, d, c0, blocks))):
        return None

    def codegen(context, builder, sig, args):
        acc_data, cw_data, x_data, codes_data = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                                 for i in (0, 1, 2, 5))
        b_v, d_v, c0_v, blocks_v = args[3], args[4], args[6], args[7]
        i64 = ir.IntType(64)
        rows = builder.mul(blocks_v, ir.Constant(i64, ROWS))
        _prefetch(builder, builder.gep(codes_data, [builder.add(c0_v, rows)]), rows)
        planes = _byte_planes(builder, _table_registers(builder, cw_data, x_data, b_v, d_v))

        def group(g, idx):
            _add_group(builder, planes, idx, builder.gep(acc_data, [builder.mul(g, ir.Constant(i64, 64))]))

        def codes_ptr(g):
            at = builder.gep(codes_data, [builder.add(c0_v, builder.mul(g, ir.Constant(i64, 64)))])
            return builder.bitcast(at, _B64.as_pointer())

        full = builder.sdiv(blocks_v, ir.Constant(i64, 4))
        loop = _Loop(builder, ir.Constant(i64, 0), full, name="byterun")
        group(loop.i, builder.load(codes_ptr(loop.i), align=1))
        loop.end()
        rest = builder.sub(rows, builder.mul(full, ir.Constant(i64, 64)))
        with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(i64, 0))):  # 16, 32 or 48 rows left
            mask = builder.bitcast(builder.sub(builder.shl(ir.Constant(i64, 1), rest), ir.Constant(i64, 1)),
                                   ir.VectorType(ir.IntType(1), 64))
            masked = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_B64, [_B64.as_pointer(), _I32, mask.type, _B64]),
                "llvm.masked.load.v64i8.p0v64i8")
            zeros = ir.Constant(_B64, [0] * 64)
            group(full, builder.call(masked, [codes_ptr(full), ir.Constant(_I32, 1), mask, zeros]))

    return types.void(acc, cw, x, b, d, codes, c0, blocks), codegen

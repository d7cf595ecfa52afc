"""LLVM IR of the codebook matmul's lookups (codebook_matmul.py): a 16-row table gather per run, and with
AVX-512 a run's 256-entry table held in registers. Built on llvm_intrinsics' helpers; the same cache caveat
holds: after editing here, clear Numba's cache.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from sagekit.kernels.llvm_intrinsics import _F16, _I8P, _I16, AVX512, AVX512_BF16, ROWS, _Loop, _vector_ptr


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


@intrinsic
def table_run_blocks_bf16(typingctx, acc, tab, codes, c0, blocks):
    """acc[16 b + i] += bf16(tab[codes[c0 + 16 b + i]]) for every 16-row block b < blocks: the run's 256 float32
    entries rounded to bfloat16 (to nearest even, 8 `vcvtne2ps2bf16`) and held in 8 registers, then 32 rows at a
    time: four 64-entry `vpermi2w` lookups, a 2-level blend tree on code bits 6 and 7, and each half widened to
    float32 (a 16-bit shift) and added to its block. Half the permutes of table_run_blocks' float32 table
    (AVX-512 BW and BF16). Layout: codes uint8 flat, the run's codes of block b at c0 + 16 b; acc float32."""
    if not (AVX512_BF16 and all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (acc, tab))
            and isinstance(codes, types.Array) and codes.dtype == types.uint8
            and all(t == types.int64 for t in (c0, blocks))):
        return None

    def codegen(context, builder, sig, args):
        acc_v, tab_v, codes_v, c0_v, blocks_v = args
        i64, i32 = ir.IntType(64), ir.IntType(32)
        w32 = ir.VectorType(ir.IntType(16), 2 * ROWS)
        acc_data = context.make_array(sig.args[0])(context, builder, acc_v).data
        tab_data = context.make_array(sig.args[1])(context, builder, tab_v).data
        codes_data = context.make_array(sig.args[2])(context, builder, codes_v).data
        floats = [builder.load(builder.bitcast(builder.gep(tab_data, [ir.Constant(i64, ROWS * m)]),
                                               _F16.as_pointer()), align=4) for m in range(16)]
        bf32 = ir.VectorType(_BFloat(), 2 * ROWS)
        to_bf16 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bf32, [_F16, _F16]),
                                                 "llvm.x86.avx512bf16.cvtne2ps2bf16.512")
        # the intrinsic puts its second operand's 16 values in the low lanes
        regs = [builder.bitcast(builder.call(to_bf16, [floats[2 * m + 1], floats[2 * m]]), w32) for m in range(8)]
        perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(w32, [w32, w32, w32]),
                                              "llvm.x86.avx512.vpermi2var.hi.512")
        low, high = ir.Constant(_I16, list(range(ROWS))), ir.Constant(_I16, list(range(ROWS, 2 * ROWS)))

        def lookup(idx):
            picks = [builder.call(perm, [regs[2 * m], idx, regs[2 * m + 1]]) for m in range(4)]
            for bit in (64, 128):
                on = builder.icmp_unsigned("!=", builder.and_(idx, ir.Constant(w32, [bit] * 2 * ROWS)),
                                           ir.Constant(w32, [0] * 2 * ROWS))
                picks = [builder.select(on, hi, lo) for lo, hi in zip(picks[0::2], picks[1::2])]
            return picks[0]

        def add(b, bits16, lanes):
            half = builder.shuffle_vector(bits16, bits16, lanes)
            wide = builder.shl(builder.zext(half, _I16), ir.Constant(_I16, [16] * ROWS))
            pa = builder.bitcast(builder.gep(acc_data, [builder.mul(b, ir.Constant(i64, ROWS))]), _F16.as_pointer())
            builder.store(builder.fadd(builder.load(pa, align=4), builder.bitcast(wide, _F16)), pa, align=4)

        def codes_at(b, n):
            ptr = builder.gep(codes_data, [builder.add(c0_v, builder.mul(b, ir.Constant(i64, ROWS)))])
            return builder.zext(builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), n).as_pointer()),
                                             align=1), ir.VectorType(ir.IntType(16), n))

        pairs = builder.sdiv(blocks_v, ir.Constant(i64, 2))
        loop = _Loop(builder, ir.Constant(i64, 0), pairs, name="bf16run")
        b = builder.mul(loop.i, ir.Constant(i64, 2))
        picked = lookup(codes_at(b, 2 * ROWS))
        add(b, picked, low)
        add(builder.add(b, ir.Constant(i64, 1)), picked, high)
        loop.end()
        odd = builder.icmp_signed("!=", builder.mul(pairs, ir.Constant(i64, 2)), blocks_v)
        with builder.if_then(odd):  # the last block alone: its 16 codes, the upper lanes unused
            last = builder.sub(blocks_v, ir.Constant(i64, 1))
            c16 = codes_at(last, ROWS)
            idx = builder.shuffle_vector(c16, c16, ir.Constant(ir.VectorType(i32, 2 * ROWS), list(range(ROWS)) * 2))
            add(last, lookup(idx), low)

    return types.void(acc, tab, codes, c0, blocks), codegen

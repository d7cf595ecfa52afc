"""LLVM IR emitted by hand for the CPU kernels: Numba intrinsics and the helpers that build them.

The hot inner loops need vector code that Numba's loops do not yield: the 16-lane table lookup (one AVX-512
`vpermps`) and the 16-token salient gather of the packed LUT matmul (lut_matmul.py), and attention's dot
products reduced across lanes together and exp's 2^n from exponent bits (transformer_ops.py), and the
fixed-order sums that fast math without reassociation leaves to us (dot32, fastmath.py); the codebook
matmul's lookups build on these helpers in codebook_intrinsics.py. Numba's on-disk cache checks only the
source file of the @njit kernel it caches, not this one: after editing here, clear the cache (the __pycache__
folders or NUMBA_CACHE_DIR), or the kernels keep their old builds.
"""
from __future__ import annotations

import os

import numba
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

ROWS = 16  # lanes per vector: 16 rows' plane words / accumulators, or 16 tokens in the salient pass


def _has(feature: str) -> bool:
    """Whether the kernels are built for a CPU with this LLVM feature: the host's, or, where Numba targets a
    named CPU, only the features given with it."""
    if numba.config.CPU_NAME:
        return f"+{feature}" in (numba.config.CPU_FEATURES or "")
    return f"+{feature}" in llvm_binding.get_host_cpu_features().flatten()


def _use_avx512() -> bool:
    """Whether the compiled kernels may use AVX-512. SAGEKIT_NO_AVX512=1 forces the portable lookup; set
    it with a fresh NUMBA_CACHE_DIR, since Numba's cache does not know about it."""
    return not os.environ.get("SAGEKIT_NO_AVX512") and _has("avx512f")


AVX512 = _use_avx512()
# bfloat16 conversion and byte permutes (the fused decode step's codebook tables, codebook_intrinsics.table_run_bytes)
AVX512_BF16 = AVX512 and _has("avx512bf16")
AVX512_VBMI = AVX512 and _has("avx512vbmi")
_F16 = ir.VectorType(ir.FloatType(), ROWS)
_I16 = ir.VectorType(ir.IntType(32), ROWS)
_I8P = ir.IntType(8).as_pointer()


def _vector_ptr(context, builder, aryty, ary, offset, vty):
    """A pointer to a `vty` vector starting at ary[offset]."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [offset]), vty.as_pointer())


def _lookup16(builder, table_ptr, idx):
    """16 lanes of table[idx & 15] for a 16-float table in memory."""
    table = builder.load(builder.bitcast(table_ptr, _F16.as_pointer()), align=4)
    if AVX512:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_F16, [_F16, _I16]), "llvm.x86.avx512.permvar.sf.512"
        )
        return builder.call(fn, [table, idx])  # vpermps: uses the low 4 bits of each index
    idx = builder.and_(idx, ir.Constant(_I16, [15] * ROWS))
    out = ir.Constant(_F16, None)
    for lane in range(ROWS):
        i = builder.extract_element(idx, ir.Constant(ir.IntType(32), lane))
        out = builder.insert_element(out, builder.extract_element(table, i), ir.Constant(ir.IntType(32), lane))
    return out


@intrinsic
def lut_planes(typingctx, acc, a0, acc_stride, planes, w0, tab, t0, tab_stride, n_tok, beta):
    """For each token t < n_tok: acc[a0 + t*acc_stride :][:16] += sum_A beta[A] * sum_{j<8}
    tab[t0 + t*tab_stride + 16j + ((P_A >> 4j) & 15)], over the 2^NB Walsh planes
    P_A = sign ^ (XOR of the id planes i in A), formed in registers from the stored planes.

    Layout: planes is a tuple (sign, id bit 0, ..., id bit NB-1) of flat uint32 arrays where [w0 + r] is
    the word (32 columns) of row r < 16, with slack after the last row (loads may start 3 bytes past w0);
    a token's tab[t0:t0+128] holds the eight 16-entry nibble tables of those 32 columns; acc holds 16
    rows' float32 accumulators per token. NB comes from the tuple's type, so everything but the token
    loop unrolls at compile time."""
    if not (
        isinstance(acc, types.Array)
        and acc.dtype == types.float32
        and isinstance(planes, types.UniTuple)
        and planes.dtype.dtype == types.uint32
        and isinstance(tab, types.Array)
        and tab.dtype == types.float32
        and isinstance(beta, types.Array)
        and beta.dtype == types.float32
        and all(t == types.int64 for t in (a0, acc_stride, w0, t0, tab_stride, n_tok))
    ):
        return None
    n_bits = planes.count - 1

    def codegen(context, builder, sig, args):
        acc_v, a0_v, astride_v, planes_v, w0_v, tab_v, t0_v, tstride_v, ntok_v, beta_v = args
        acc_data = context.make_array(sig.args[0])(context, builder, acc_v).data
        tab_data = context.make_array(sig.args[5])(context, builder, tab_v).data
        beta_data = context.make_array(sig.args[9])(context, builder, beta_v).data

        def load_planes(byte_offset):
            """The 1+NB stored plane vectors of the 16 rows, read `byte_offset` bytes into the words."""
            vectors = []
            for i in range(1 + n_bits):
                data = context.make_array(planes.dtype)(context, builder, builder.extract_value(planes_v, i)).data
                byte0 = builder.bitcast(builder.gep(data, [w0_v]), _I8P)
                p = builder.gep(byte0, [ir.Constant(ir.IntType(64), byte_offset)])
                vectors.append(builder.load(builder.bitcast(p, _I16.as_pointer()), align=1))
            return vectors

        def walsh(bits, a):
            w = bits[0]
            for i in range(n_bits):
                if (a >> i) & 1:
                    w = builder.xor(w, bits[1 + i])
            return w

        def nibbles_by_shift():
            """[A][j]: nibble j of Walsh plane A in the low 4 bits of each lane (vpermps reads no more)."""
            bits = load_planes(0)
            shifts = [ir.Constant(_I16, [4 * j] * ROWS) for j in range(8)]
            return [[builder.lshr(walsh(bits, a), s) for s in shifts] for a in range(1 << n_bits)]

        def nibbles_by_offset():
            """The same, with even nibbles straight from loads 0..3 bytes into the words and odd ones one shift
            away: 16 shifts instead of 28 for four planes, which relieves the pipes vpermps runs on."""
            loads = [load_planes(o) for o in range(4)]
            index = []
            for a in range(1 << n_bits):
                row = []
                for o in range(4):
                    w = walsh(loads[o], a)
                    row += [w, builder.lshr(w, ir.Constant(_I16, [4] * ROWS))]
                index.append(row)
            return index

        betas = [
            _splat(builder, builder.load(builder.gep(beta_data, [ir.Constant(ir.IntType(64), a)])))
            for a in range(1 << n_bits)
        ]

        def accumulate(t, index):
            acc_t = builder.gep(acc_data, [builder.add(a0_v, builder.mul(t, astride_v))])
            pa = builder.bitcast(acc_t, _F16.as_pointer())
            tab_t = builder.add(t0_v, builder.mul(t, tstride_v))
            tables = [builder.gep(tab_data, [builder.add(tab_t, ir.Constant(tab_t.type, 16 * j))]) for j in range(8)]
            total = builder.load(pa, align=4)
            for a in range(1 << n_bits):
                terms = [_lookup16(builder, tables[j], index[a][j]) for j in range(8)]
                while len(terms) > 1:  # a tree, not a chain: independent adds keep the pipes full
                    terms = [builder.fadd(terms[i], terms[i + 1]) for i in range(0, len(terms), 2)]
                total = builder.fadd(total, builder.fmul(betas[a], terms[0]))
            builder.store(total, pa, align=4)

        if n_bits <= 1:  # up to 16 index vectors: formed once, kept in registers for all tokens
            index = nibbles_by_shift()
            loop = _Loop(builder, ir.Constant(ntok_v.type, 0), ntok_v)
            accumulate(loop.i, index)
            loop.end()
            return
        # More would spill: decode forms them by offset loads; a batch of tokens rebuilds them per token
        # (loaded inside the loop, where the acc stores keep them from being hoisted and spilled).
        with builder.if_else(builder.icmp_signed("==", ntok_v, ir.Constant(ntok_v.type, 1))) as (one, many):
            with one:
                accumulate(ir.Constant(ntok_v.type, 0), nibbles_by_offset())
            with many:
                loop = _Loop(builder, ir.Constant(ntok_v.type, 0), ntok_v)
                accumulate(loop.i, nibbles_by_shift())
                loop.end()

    return types.void(acc, a0, acc_stride, planes, w0, tab, t0, tab_stride, n_tok, beta), codegen


class _Loop:
    """for i in range(start, stop, step) in LLVM IR, carrying `carried` vectors of type `vector` (zero on entry)
    from one iteration to the next. The body is what is emitted between the constructor and end(next values),
    which leaves the builder after the loop; `values` then holds the vectors' final state."""

    def __init__(self, builder, start, stop, step: int = 1, carried: int = 0, name: str = "loop", vector=_F16):
        pre = builder.block
        self.builder, self.step = builder, step
        self.head = builder.append_basic_block(f"{name}.head")
        body = builder.append_basic_block(f"{name}.body")
        self.done = builder.append_basic_block(f"{name}.done")
        builder.branch(self.head)
        builder.position_at_end(self.head)
        self.i = builder.phi(start.type)
        self.i.add_incoming(start, pre)
        self.values = [builder.phi(vector) for _ in range(carried)]
        for v in self.values:
            v.add_incoming(ir.Constant(vector, None), pre)
        builder.cbranch(builder.icmp_signed("<", self.i, stop), body, self.done)
        builder.position_at_end(body)

    def end(self, following=()) -> None:
        b = self.builder
        for v, nxt in zip(self.values, following, strict=True):
            v.add_incoming(nxt, b.block)
        self.i.add_incoming(b.add(self.i, ir.Constant(self.i.type, self.step)), b.block)
        b.branch(self.head)
        b.position_at_end(self.done)


@intrinsic
def pow2(typingctx, n):
    """2^n as float32 for an int32 n in -126..127, made from its exponent bits ((n + 127) << 23): no table,
    so a loop around it vectorises (exp's, in transformer_ops)."""
    if n != types.int32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(n), codegen


def _splat(builder, value, vector=_F16):
    """`value` in every lane of a 16-lane vector."""
    one = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector, None), ir.Constant(_I16, [0] * ROWS))


@intrinsic
def sparse_row16(typingctx, acc, a0, xt, idx, val, j0, j1):
    """acc[a0:a0+16] += sum_{j0 <= j < j1} val[j] * xt[16*idx[j] : 16*idx[j]+16]: one row of salient
    corrections for 16 tokens at once. Layout: xt is x transposed, (in, 16) flat, so a column's 16 tokens
    are one vector. Four accumulators rotate through the loop so the adds do not wait on each other."""
    if not (isinstance(acc, types.Array) and isinstance(xt, types.Array) and j0 == types.int64 and j1 == types.int64):
        return None

    def codegen(context, builder, sig, args):
        acc_v, a0_v, xt_v, idx_v, val_v, j0_v, j1_v = args
        pa = _vector_ptr(context, builder, sig.args[0], acc_v, a0_v, _F16)
        xt_data = context.make_array(sig.args[2])(context, builder, xt_v).data
        idx_data = context.make_array(sig.args[3])(context, builder, idx_v).data
        val_data = context.make_array(sig.args[4])(context, builder, val_v).data
        loop = _Loop(builder, j0_v, j1_v, carried=4, name="sal")
        j, accs = loop.i, loop.values
        col = builder.zext(builder.load(builder.gep(idx_data, [j])), j.type)
        q = builder.sitofp(builder.load(builder.gep(val_data, [j])), ir.FloatType())
        qv = _splat(builder, q)
        off = builder.mul(col, ir.Constant(col.type, ROWS))
        xv = builder.load(builder.bitcast(builder.gep(xt_data, [off]), _F16.as_pointer()), align=4)
        loop.end(accs[1:] + [builder.fadd(accs[0], builder.fmul(qv, xv))])
        total = builder.fadd(builder.fadd(accs[0], accs[1]), builder.fadd(accs[2], accs[3]))
        builder.store(builder.fadd(builder.load(pa, align=4), total), pa, align=4)

    return types.void(acc, a0, xt, idx, val, j0, j1), codegen


@intrinsic
def scores16(typingctx, p, p0, k, j0, q, h):
    """p[p0 : p0+16] = k[j0 + i] . q[h] for i < 16: sixteen dot products of length D (a multiple of 16).

    Layout: k (S, D) and q (H, D) f32, C-contiguous. Each position's partial sums stay a 16-lane vector
    through the loop over D; the sixteen vectors are then summed across lanes all at once, by halving them
    pairwise (4 levels of two shuffles and an add) instead of reducing each one on its own."""
    if not (all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (p, k, q))
            and k.layout == "C" and q.layout == "C" and k.ndim == 2 and q.ndim == 2
            and all(t == types.int64 for t in (p0, j0, h))):
        return None

    def codegen(context, builder, sig, args):
        p_v, p0_v, k_v, j0_v, q_v, h_v = args
        i64 = ir.IntType(64)
        k_arr = context.make_array(sig.args[2])(context, builder, k_v)
        q_arr = context.make_array(sig.args[4])(context, builder, q_v)
        d = builder.extract_value(k_arr.shape, 1)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F16, [_F16] * 3), "llvm.fmuladd.v16f32")
        loop = _Loop(builder, ir.Constant(i64, 0), d, ROWS, carried=ROWS, name="scores16")
        c = loop.i

        def load(data, offset):
            return builder.load(builder.bitcast(builder.gep(data, [offset]), _F16.as_pointer()), align=4)

        qv = load(q_arr.data, builder.add(builder.mul(h_v, d), c))
        row0 = builder.mul(j0_v, d)
        following = []
        for i, a in enumerate(loop.values):
            kv = load(k_arr.data, builder.add(builder.add(row0, builder.mul(ir.Constant(i64, i), d)), c))
            following.append(builder.call(fma, [qv, kv, a]))
        loop.end(following)
        # each vector holds groups of `width` lanes, one group per position, that sum to its score
        vectors, width = [(a, [i]) for i, a in enumerate(loop.values)], ROWS
        while width > 1:
            half, merged = width // 2, []
            for (a, ga), (b, gb) in zip(vectors[0::2], vectors[1::2]):
                lo = [g * width + x for g in range(len(ga)) for x in range(half)]
                lo += [ROWS + g * width + x for g in range(len(gb)) for x in range(half)]
                hi = [i + half for i in lo]
                pick = lambda idx: builder.shuffle_vector(a, b, ir.Constant(_I16, idx))  # noqa: E731
                merged.append((builder.fadd(pick(lo), pick(hi)), ga + gb))
            vectors, width = merged, half
        total, order = vectors[0]
        total = builder.shuffle_vector(total, total, ir.Constant(_I16, [order.index(i) for i in range(ROWS)]))
        builder.store(total, _vector_ptr(context, builder, sig.args[0], p_v, p0_v, _F16), align=4)

    return types.void(p, p0, k, j0, q, h), codegen


@intrinsic
def weighted_rows64(typingctx, o, o0, v, c0, p, length):
    """o[o0 : o0+64] = sum_{j < length} p[j] * v[j, c0 : c0+64], the 64 sums held in registers (two sets of
    four vectors, taking alternate rows, so the multiply-adds do not wait on each other).

    Layout: v (S, D) f32 C-contiguous, c0 + 64 <= D; p (>= length,) f32; o flat f32."""
    if not (all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (o, v, p))
            and v.layout == "C" and v.ndim == 2 and all(t == types.int64 for t in (o0, c0, length))):
        return None

    def codegen(context, builder, sig, args):
        o_v, o0_v, v_v, c0_v, p_v, n_v = args
        i64 = ir.IntType(64)
        v_arr = context.make_array(sig.args[2])(context, builder, v_v)
        p_data = context.make_array(sig.args[4])(context, builder, p_v).data
        d = builder.extract_value(v_arr.shape, 1)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F16, [_F16] * 3), "llvm.fmuladd.v16f32")
        loop = _Loop(builder, ir.Constant(i64, 0), n_v, 2, carried=8, name="rows64")
        j, following = loop.i, []
        for r in range(2):  # rows j and j + 1 into accumulators 4r..4r+3; past the end, weight 0 on row j
            jr = builder.add(j, ir.Constant(i64, r))
            inside = builder.icmp_signed("<", jr, n_v)
            row = builder.select(inside, jr, j)
            w = builder.load(builder.gep(p_data, [row]))
            w = _splat(builder, builder.select(inside, w, ir.Constant(ir.FloatType(), 0.0)))
            base = builder.add(builder.mul(row, d), c0_v)
            for c in range(4):
                ptr = builder.gep(v_arr.data, [builder.add(base, ir.Constant(i64, 16 * c))])
                x = builder.load(builder.bitcast(ptr, _F16.as_pointer()), align=4)
                following.append(builder.call(fma, [w, x, loop.values[4 * r + c]]))
        loop.end(following)
        for c in range(4):
            total = builder.fadd(loop.values[c], loop.values[4 + c])
            offset = builder.add(o0_v, ir.Constant(i64, 16 * c))
            builder.store(total, _vector_ptr(context, builder, sig.args[0], o_v, offset, _F16), align=4)

    return types.void(o, o0, v, c0, p, length), codegen


@intrinsic
def dot32(typingctx, a, b, n):
    """sum_{j < n} a[j] * b[j] for n a multiple of 32 (b None: sum a[j]), in a fixed order whatever the
    compiler does: two 16-lane running sums take alternate 16-float halves, then one halving tree across the
    lanes. Numba's loops vectorise a sum only with reassociation, which the kernels leave off (fastmath.py).
    Layout: a, b (>= n,) f32, C-contiguous."""
    arrays = (a,) if b == types.none else (a, b)
    if not (all(isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C" and x.ndim == 1
                for x in arrays) and n == types.int64):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        data = [context.make_array(sig.args[i])(context, builder, args[i]).data for i in range(len(arrays))]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F16, [_F16] * 3), "llvm.fmuladd.v16f32")
        loop = _Loop(builder, ir.Constant(i64, 0), args[2], 2 * ROWS, carried=2, name="dot32")
        following = []
        for h, acc in enumerate(loop.values):
            j = builder.add(loop.i, ir.Constant(i64, h * ROWS))
            x = [builder.load(builder.bitcast(builder.gep(d, [j]), _F16.as_pointer()), align=4) for d in data]
            following.append(builder.fadd(acc, x[0]) if len(x) == 1 else builder.call(fma, [x[0], x[1], acc]))
        loop.end(following)
        v, width = builder.fadd(loop.values[0], loop.values[1]), ROWS
        while width > 1:
            width //= 2
            hi = builder.shuffle_vector(v, v, ir.Constant(_I16, [(i + width) % ROWS for i in range(ROWS)]))
            v = builder.fadd(v, hi)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(a, b, n), codegen

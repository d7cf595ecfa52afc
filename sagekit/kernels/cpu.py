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
Without AVX-512 the same lookup is emitted as a 16-lane table read that LLVM lowers for the target.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from types import FunctionType

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from sagekit.quant.pack import PackedSage, n_words

ROWS = 16  # lanes per vector: 16 rows' plane words / accumulators, or 16 tokens in the salient pass
TOKEN_BATCH = ROWS  # tokens sharing one pass over the planes; the salient pass holds them in one vector
BLAS_MIN_TOKENS = 64  # prefill with 4+ Walsh planes: unpacked row tiles through BLAS beat 4+ lookups a weight
BLAS_TILE_ROWS = 128  # rows unpacked at a time: the only dense float32 scratch, (in, 128)
PARALLEL_MIN_BITS = 1 << 22  # smaller matrices run on the calling thread: waking others costs more than it saves
SHORT_ROW = 16  # decode's salient pass: rows with up to this many corrections go 16 rows to a gather
MAX_GROUPS = 16  # 2^NB Walsh planes cost one G = 1 matrix each; past 16 a lookup per code would be the way


def _use_avx512() -> bool:
    """Whether the compiled kernels may use AVX-512. SAGEKIT_NO_AVX512=1 forces the portable lookup; set
    it with a fresh NUMBA_CACHE_DIR, since Numba's cache does not know about it."""
    if os.environ.get("SAGEKIT_NO_AVX512"):
        return False
    if numba.config.CPU_NAME:  # Numba targets a named CPU: trust only features given with it
        return "+avx512f" in (numba.config.CPU_FEATURES or "")
    return "+avx512f" in llvm_binding.get_host_cpu_features().flatten()


AVX512 = _use_avx512()
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
def _lut_planes(typingctx, acc, a0, acc_stride, planes, w0, tab, t0, tab_stride, n_tok, beta):
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
    """for i in range(start, stop, step) in LLVM IR, carrying `carried` float vectors (zero on entry) from one
    iteration to the next. The body is what is emitted between the constructor and end(next values), which
    leaves the builder after the loop; `values` then holds the vectors' final state."""

    def __init__(self, builder, start, stop, step: int = 1, carried: int = 0, name: str = "loop"):
        pre = builder.block
        self.builder, self.step = builder, step
        self.head = builder.append_basic_block(f"{name}.head")
        body = builder.append_basic_block(f"{name}.body")
        self.done = builder.append_basic_block(f"{name}.done")
        builder.branch(self.head)
        builder.position_at_end(self.head)
        self.i = builder.phi(start.type)
        self.i.add_incoming(start, pre)
        self.values = [builder.phi(_F16) for _ in range(carried)]
        for v in self.values:
            v.add_incoming(ir.Constant(_F16, None), pre)
        builder.cbranch(builder.icmp_signed("<", self.i, stop), body, self.done)
        builder.position_at_end(body)

    def end(self, following=()) -> None:
        b = self.builder
        for v, nxt in zip(self.values, following, strict=True):
            v.add_incoming(nxt, b.block)
        self.i.add_incoming(b.add(self.i, ir.Constant(self.i.type, self.step)), b.block)
        b.branch(self.head)
        b.position_at_end(self.done)


def _splat(builder, value):
    one = builder.insert_element(ir.Constant(_F16, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(_F16, None), ir.Constant(_I16, [0] * ROWS))


@intrinsic
def _sparse_row16(typingctx, acc, a0, xt, idx, val, j0, j1):
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


@njit(cache=True, fastmath=True)
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


@njit(cache=True, fastmath=True)
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


@njit(cache=True, parallel=True, fastmath=True)
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
                    _lut_planes(
                        acc, (b - b0) * ROWS, nrow, planes, k * out16 + b * ROWS, tab, k * 128, words * 128, tb, beta
                    )
            if n_tok == 1:
                y[t0, b0 * ROWS : min(out, b1 * ROWS)] = acc[: min(out, b1 * ROWS) - b0 * ROWS]
                continue
            sal = np.zeros(ROWS, dtype=np.float32)
            for r in range(b0 * ROWS, min(out, b1 * ROWS)):
                sal[:] = 0
                _sparse_row16(sal, 0, xt_flat, sal_idx, sal_val, np.int64(sal_ptr[r]), np.int64(sal_ptr[r + 1]))
                for t in range(tb):
                    y[t0 + t, r] = acc[t * nrow + r - b0 * ROWS] + sal_scale[r] * sal[t]
        if n_tok == 1:
            for part in prange(n_par):
                _salient_decode(x[0], y[0], part, n_par, sal_ptr, sal_idx, sal_val, sal_scale, short_rows, short_ptr,
                                short_idx, short_val, long_rows)


def _serial_twin(kernel):
    """The kernel's source compiled without a parallel region, under a name of its own: Numba's cache keys
    entries by function name and argument types only, so a twin sharing the name would load (or overwrite)
    the parallel build and pay the thread pool's wake-up on every call."""
    f = kernel.py_func
    twin = FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    return njit(cache=True, fastmath=True)(twin)


# Small matrices (decode on narrow models) run serially: waking the thread pool costs more than their product.
_lut_matmul_serial = _serial_twin(_lut_matmul)


@njit(cache=True, parallel=True, fastmath=True)
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


HALF_BLOCK_ROWS = 64  # rows converted into one scratch row at a time per thread
HALF_BLAS_MIN_TOKENS = 16  # from here on, converting row tiles for BLAS beats the per-row dot products
HALF_TO_F32 = np.float32(2.0 ** 112)  # moves a half's exponent bias (15) to a float's (127)
# A decode step's lm_head (49152 x 576 on the demo, 2.4 ms on one core of the 2-core VM, 1.7 ms on two)
# is worth one wake-up of the thread pool; an embedding-sized row block is not.
HALF_PARALLEL_MIN_BITS = 1 << 24


@njit(cache=True, parallel=True, fastmath=True)
def _half_matmul(x, w, y):
    """Layout: x (T, in) f32; w (out, in) uint16 holding IEEE half bits, row-major; y (T, out) f32.

    A half h becomes the float with bits (sign << 16) | (exponent, mantissa) << 13, times 2^112: exact
    for normal and subnormal halves (weights are finite: the loader refuses Inf and NaN)."""
    n_tok, in_ = x.shape
    out = w.shape[0]
    for b in prange(-(-out // HALF_BLOCK_ROWS)):
        bits = np.empty(in_, dtype=np.uint32)
        row = bits.view(np.float32)
        for r in range(b * HALF_BLOCK_ROWS, min(out, (b + 1) * HALF_BLOCK_ROWS)):
            for j in range(in_):
                h = np.uint32(w[r, j])
                bits[j] = ((h & 0x8000) << 16) | ((h & 0x7FFF) << 13)
            for t in range(n_tok):
                s = np.float32(0)
                for j in range(in_):
                    s += row[j] * x[t, j]
                y[t, r] = s * HALF_TO_F32


_half_matmul_serial = _serial_twin(_half_matmul)


def half_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32 (T, in) @ float16 (out, in).T -> float32 (T, out), reading the half weights directly:
    half the bytes of a float32 matvec for decode; long prompts convert row tiles for BLAS instead."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out, in_ = w.shape
    if x.ndim != 2 or x.shape[1] != in_:
        raise ValueError(f"x: expected (T, {in_}), got {x.shape}")
    y = np.empty((x.shape[0], out), dtype=np.float32)
    if x.shape[0] >= HALF_BLAS_MIN_TOKENS:
        for r0 in range(0, out, 4096):
            np.matmul(x, w[r0:r0 + 4096].astype(np.float32).T, out=y[:, r0:r0 + 4096])
        return y
    if w.size * 16 * x.shape[0] < HALF_PARALLEL_MIN_BITS:
        _half_matmul_serial(x, w.view(np.uint16), y)
    else:
        _half_matmul(x, w.view(np.uint16), y)
    return y


POW2 = np.ldexp(np.float32(1), np.arange(-126, 1)).astype(np.float32)  # 2^n for n = -126..0
EXP_TAYLOR = tuple(np.float32(np.log(2.0) ** k / math.factorial(k)) for k in range(8))


@njit(cache=True, fastmath=True, inline="always")
def _exp_nonpositive(x):
    """exp(x) for x <= 0 without a libm call, so the loop around it vectorises: 2^n from a table times
    2^f by its degree-7 Taylor series on |f| <= 1/2. Absolute error < 1.2e-7 (results are <= 1: about
    one float32 ulp), which is what softmax weights need; the relative error grows to ~3e-6 near x = -87
    with float32's rounding of x log2(e)."""
    t = max(x, np.float32(-87.0)) * np.float32(1.4426950408889634)
    n = np.floor(t + np.float32(0.5))
    f = t - n
    c = EXP_TAYLOR
    p = c[0] + f * (c[1] + f * (c[2] + f * (c[3] + f * (c[4] + f * (c[5] + f * (c[6] + f * c[7]))))))
    return p * POW2[np.int64(n) + 126]


@intrinsic
def _scores16(typingctx, p, p0, k, j0, q, h):
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
def _weighted_rows64(typingctx, o, o0, v, c0, p, length):
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


@njit(cache=True, fastmath=True)
def decode_attention(q, keys, values, length, out):
    """One query position over the cache: softmax(q k^T) v per head, grouped-query heads sharing a KV head.

    Layout: q (H, D) f32, already scaled by 1/sqrt(D); keys and values (KV, S_max, D) f32, one layer of the
    cache, positions < length valid; out (H, D) f32. Both loops run along D in unit stride; at 3 queries x
    64 dims per KV head a BLAS call would cost ~10 us of overhead each (measured: 36 us for the whole
    layer here against 97 us through NumPy at 544 positions)."""
    n_heads, d = q.shape
    rep = n_heads // keys.shape[0]
    p = np.empty(length, dtype=np.float32)
    blocked = length // ROWS * ROWS if d % ROWS == 0 else 0  # 16 positions at a time, their sums reduced together
    for h in range(n_heads):
        k, v = keys[h // rep], values[h // rep]
        for j0 in range(0, blocked, ROWS):
            _scores16(p, np.int64(j0), k, np.int64(j0), q, np.int64(h))
        for j in range(blocked, length):
            s = np.float32(0)
            for e in range(d):
                s += q[h, e] * k[j, e]
            p[j] = s
        top = -np.inf
        for j in range(length):
            top = max(top, p[j])
        total = np.float32(0)
        for j in range(length):
            p[j] = _exp_nonpositive(p[j] - top)
            total += p[j]
        o = out[h]
        if d % 64 == 0:
            for c0 in range(0, d, 64):
                _weighted_rows64(o, np.int64(c0), v, np.int64(c0), p, np.int64(length))
        else:
            o[:] = 0
            for j in range(length):
                for e in range(d):
                    o[e] += p[j] * v[j, e]
        o *= np.float32(1) / total


@njit(cache=True, fastmath=True)
def rmsnorm(x, weight, eps):
    """x / rms(x) * weight per row, in one pass over each row. Layout: x (T, dim) f32, weight (dim,) f32.
    NumPy needs seven calls for this, ~8 us at one token: a decode step makes 61 of them."""
    t, dim = x.shape
    out = np.empty_like(x)
    for i in range(t):
        ss = np.float32(0)
        for j in range(dim):
            ss += x[i, j] * x[i, j]
        r = np.float32(1) / np.sqrt(ss / np.float32(dim) + np.float32(eps))
        for j in range(dim):
            out[i, j] = x[i, j] * r * weight[j]
    return out


@njit(cache=True, fastmath=True)
def rope(x, cos, sin):
    """Rotary embedding in the HF layout (dim j paired with j + D/2). Layout: x (T, H, D) f32; cos and sin
    (T, D) f32, the rows of x's positions."""
    t, heads, d = x.shape
    half = d // 2
    out = np.empty_like(x)
    for i in range(t):
        for h in range(heads):
            for j in range(half):
                a, b = x[i, h, j], x[i, h, j + half]
                out[i, h, j] = a * cos[i, j] - b * sin[i, j]
                out[i, h, j + half] = b * cos[i, j + half] + a * sin[i, j + half]
    return out


@njit(cache=True, fastmath=True)
def silu_mul(g, u):
    """silu(g) * u = g * sigmoid(g) * u elementwise, with sigmoid from exp of -|g| only (no overflow, no libm
    call, so the loop vectorises). Layout: g, u (T, hidden) f32."""
    out = np.empty_like(g)
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            x = g[i, j]
            e = _exp_nonpositive(-abs(x))
            s = np.float32(1) / (np.float32(1) + e)
            out[i, j] = x * (s if x >= 0 else e * s) * u[i, j]
    return out

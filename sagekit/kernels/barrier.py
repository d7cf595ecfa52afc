"""A spinning barrier for the threads of one Numba parallel region (the fused decode step, decode_step.py).

Why: a decode step of the demo model is about 200 products of well under 2M weights each. Forking Numba's
passive OpenMP pool for each costs as much as the product (25-54 us, docs/BENCHMARKS.md, session 12), so they
ran on one thread. One region per step, with the threads meeting at a barrier between the products, pays one
fork a step and a few hundred nanoseconds a meeting. Numba has no atomics, so the two operations it needs are
written in LLVM IR here.

The threads spin (with `pause`) only while they wait for each other inside the region; between steps the pool
sleeps as sagekit's OMP_WAIT_POLICY=passive asks, so BLAS keeps both cores during prefill.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


def _counter_args(counter, i, value) -> bool:
    """Whether an intrinsic's arguments are an int64 array, an int64 index and an int64 value."""
    return (isinstance(counter, types.Array) and counter.dtype == types.int64 and i == types.int64
            and value == types.int64)


def _slot(context, builder, sig, args):
    """A pointer to counter[i]."""
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    return builder.gep(data, [args[1]])


@intrinsic
def atomic_add(typingctx, counter, i, value):
    """counter[i] += value as one atomic read-modify-write; returns the value before. counter: int64 array."""
    if not _counter_args(counter, i, value):
        return None

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), args[2], "seq_cst")

    return types.int64(counter, i, value), codegen


@intrinsic
def spin_until(typingctx, counter, i, target):
    """Wait, spinning with `pause`, until the atomic load of counter[i] reaches target."""
    if not _counter_args(counter, i, target):
        return None

    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig, args)
        pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                               "llvm.x86.sse2.pause")
        spin, done = builder.append_basic_block("spin"), builder.append_basic_block("spun")
        builder.branch(spin)
        builder.position_at_end(spin)
        value = builder.load_atomic(ptr, "acquire", 8)
        builder.call(pause, [])
        builder.cbranch(builder.icmp_signed(">=", value, args[2]), done, spin)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.void(counter, i, target), codegen


@njit(inline="always")
def meet(counter, n_threads, phase):
    """Barrier number `phase` (1, 2, ...) of n_threads threads on counter[0], which was 0 when the region
    began: each arrival adds one, and barrier p is passed once all n p arrivals are in. Returns phase + 1."""
    atomic_add(counter, 0, 1)
    spin_until(counter, 0, n_threads * phase)
    return phase + 1

"""GPU matmul on packed `sage` weights: CuPy RawKernels whose CUDA C lives in sage_gemv.cu / sage_decode.cu.

Decode (one token) is the GEMV kernel; longer inputs decode the matrix to an FP16 scratch for cuBLAS.

CuPy is imported only when a GPU function runs, so this module imports (and its CPU-side code is
testable) on machines without it. Kernels are compiled once per process per number of id planes, and
CuPy keeps the compiled modules in its on-disk cache across processes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagekit.format.sage import PackedSage, n_id_bits

KERNEL_DIR = Path(__file__).resolve().parent
GEMV_WARPS = 8  # rows per GEMV block, one warp each
DECODE_THREADS = 256


def cupy_module():
    """CuPy, imported on first use so that the kernel modules import on machines without it."""
    import cupy

    return cupy


@dataclass(frozen=True)
class SageGPU:
    """A PackedSage on the device, arrays unchanged (FORMAT.md layout is what the kernels read)."""

    sign: Any
    gid: Any
    alpha: Any
    sal_ptr: Any
    sal_idx: Any
    sal_val: Any
    sal_scale: Any
    shape: tuple[int, int]

    @property
    def n_groups(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def nbytes(self) -> int:
        arrays = (self.sign, self.gid, self.alpha, self.sal_ptr, self.sal_idx, self.sal_val, self.sal_scale)
        return sum(int(a.nbytes) for a in arrays)


def to_device(p: PackedSage) -> SageGPU:
    cp = cupy_module()
    return SageGPU(**{name: cp.asarray(a) for name, a in p.arrays().items()}, shape=p.shape)


@functools.cache
def _kernels(nb: int) -> tuple[Any, Any, Any, Any]:
    """(gemv for words % 4 == 0, gemv for any words, decode, salient) for NB id planes."""
    names = [f"sage_gemv<{nb}, true>", f"sage_gemv<{nb}, false>", f"sage_decode<{nb}>", "sage_salient"]
    module = cupy_module().RawModule(
        code=(KERNEL_DIR / "sage_decode.cu").read_text(),  # includes sage_gemv.cu
        options=("--std=c++17", f"-I{KERNEL_DIR}"),
        name_expressions=names,
    )
    return tuple(module.get_function(n) for n in names)


def decode(dev: SageGPU) -> Any:
    """float16 (out, in): W_hat decoded on the device, salient corrections included."""
    cp = cupy_module()
    out, in_ = dev.shape
    words = int(dev.sign.shape[1])
    _, _, planes, salient = _kernels(n_id_bits(dev.n_groups))
    w = cp.empty((out, in_), dtype=cp.float16)
    planes((-(-out * words // DECODE_THREADS),), (DECODE_THREADS,),
           (dev.sign, dev.gid, dev.alpha, cp.int32(dev.n_groups), w, cp.int32(out), cp.int32(in_), cp.int32(words)))
    salient((-(-out // DECODE_THREADS),), (DECODE_THREADS,),
            (dev.sal_ptr, dev.sal_idx, dev.sal_val, dev.sal_scale, w, cp.int32(out), cp.int32(in_)))
    return w


def sage_matmul_gpu(x: Any, dev: SageGPU) -> Any:
    """float16 x of shape (in,) or (T, in) -> float16 (out,) or (T, out); one row is the decode GEMV."""
    cp = cupy_module()
    out, in_ = dev.shape
    x = cp.ascontiguousarray(x, dtype=cp.float16)
    if x.ndim not in (1, 2) or x.shape[-1] != in_:
        raise ValueError(f"x: expected (in,) or (T, {in_}) with in = {in_}, got {x.shape}")
    if x.ndim == 2 and x.shape[0] > 1:
        return x @ decode(dev).T
    gemv_vec4, gemv_any, _, _ = _kernels(n_id_bits(dev.n_groups))
    words = int(dev.sign.shape[1])
    y = cp.empty((out,) if x.ndim == 1 else (1, out), dtype=cp.float16)
    gemv = gemv_vec4 if words % 4 == 0 else gemv_any
    gemv((-(-out // GEMV_WARPS),), (32 * GEMV_WARPS,),
         (dev.sign, dev.gid, dev.alpha, cp.int32(dev.n_groups), dev.sal_ptr, dev.sal_idx, dev.sal_val, dev.sal_scale,
          x, y, cp.int32(out), cp.int32(in_), cp.int32(words)))
    return y

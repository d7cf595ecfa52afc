"""FP16 dense GEMV on the GPU (dense_gemv.cu): one token through a dense matrix without cuBLAS, so that a decode
step through dense matrices (an FP16 model, the dense twin `sagekit bench` compares with, an FP16 lm_head) can be
captured in a CUDA graph (sagekit.model.decode_graph). CuPy is imported only when it runs."""

from __future__ import annotations

import functools
from typing import Any

from sagekit.kernels.cuda import KERNEL_DIR, cupy_module

WARPS = 8  # rows per block, one warp each


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """(dense_gemv<true>, dense_gemv<false>): 16-byte loads, and one half at a time."""
    names = ["dense_gemv<true>", "dense_gemv<false>"]
    module = cupy_module().RawModule(code=(KERNEL_DIR / "dense_gemv.cu").read_text(), options=("--std=c++17",),
                                     name_expressions=names)
    return tuple(module.get_function(n) for n in names)


def gemv(w: Any, x: Any) -> Any:
    """float16 y (out,) = w (out, in) float16 C-contiguous @ x (in,)."""
    cp = cupy_module()
    out, in_ = w.shape
    x = cp.ascontiguousarray(x, dtype=cp.float16)
    if x.shape != (in_,) or w.dtype != cp.float16 or not w.flags.c_contiguous:
        raise ValueError(f"dense GEMV: expected C-contiguous float16 w (out, in) and x ({in_},), got {w.shape} {x.shape}")
    vec = in_ % 8 == 0 and w.data.ptr % 16 == 0 and x.data.ptr % 16 == 0
    y = cp.empty(out, dtype=cp.float16)
    _kernels()[0 if vec else 1]((-(-out // WARPS),), (32 * WARPS,), (w, x, y, cp.int32(out), cp.int32(in_)))
    return y

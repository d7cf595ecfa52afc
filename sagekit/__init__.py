"""sagekit: SAGE-PTQ ultra-low-bit compression and inference for Llama models, without PyTorch.

`sagekit.load`, `sagekit.compress`, `Model` and `Reply` come from sagekit.api, imported on first use so that
`import sagekit` stays cheap (the command line starts without NumPy, Numba or the tokenizer loaded).
"""

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Model", "Reply", "__version__", "compress", "load"]

# Numba's OpenMP threads and OpenBLAS's threads both spin after their parallel regions; where the packed
# kernels and BLAS alternate (prefill, evaluation) they take each other's cores. On the 2-core machine a
# 512-token prefill of the compressed demo model took 3.7 s spinning and 1.0 s with this (docs/BENCHMARKS.md).
# Set before Numba first loads OpenMP; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# OpenBLAS's idle threads spin for 2^28 cycles (a tenth of a second) after each call: a parallel kernel started
# in that time ran on one core, the 3-bit 4096x11008 GEMV at 4.4-4.8 ms right after a float32 GEMM against
# 2.0-2.9 ms (docs/BENCHMARKS.md, session 12). 2^16 cycles keeps them warm between back-to-back calls only.
# OpenBLAS reads it when NumPy loads it, so it holds where sagekit is imported before NumPy (the command line).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

if TYPE_CHECKING:
    from sagekit.api import Model, Reply, compress, load


def __getattr__(name: str) -> Any:
    if name in ("Model", "Reply", "compress", "load"):
        from sagekit import api

        return getattr(api, name)
    raise AttributeError(f"module 'sagekit' has no attribute {name!r}")

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

if TYPE_CHECKING:
    from sagekit.api import Model, Reply, compress, load


def __getattr__(name: str) -> Any:
    if name in ("Model", "Reply", "compress", "load"):
        from sagekit import api

        return getattr(api, name)
    raise AttributeError(f"module 'sagekit' has no attribute {name!r}")

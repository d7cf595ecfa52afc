"""sagekit: SAGE-PTQ ultra-low-bit compression and inference for Llama models, without PyTorch."""

import os

__version__ = "0.1.0"

# Numba's OpenMP threads and OpenBLAS's threads both spin after their parallel regions; where the packed
# kernels and BLAS alternate (prefill, evaluation) they take each other's cores. On the 2-core machine a
# 512-token prefill of the compressed demo model took 3.7 s spinning and 1.0 s with this (docs/BENCHMARKS.md).
# Set before Numba first loads OpenMP; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

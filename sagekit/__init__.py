"""sagekit: SAGE-PTQ ultra-low-bit compression and inference for Llama models, without PyTorch."""

import os

__version__ = "0.1.0"

# Numba's OpenMP threads otherwise spin after each parallel region, taking the cores that the next serial
# kernel and NumPy need: on the 2-core machine that made decode 4x slower. Set before Numba loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

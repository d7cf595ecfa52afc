"""The CPU (Numba) kernels' public names in one namespace, for the model, the loader and the tools.

The kernels live by job: lut_matmul.py (packed `sage` weights), level_matmul.py (2- to 5-bit free-level
`sage-grid` weights), codebook_matmul.py (`sage-vq` and the other free-level grids), half_matmul.py (FP16
weights), transformer_ops.py (attention, RMSNorm, RoPE) and llvm_intrinsics.py (the hand-written IR).
"""

from __future__ import annotations

from sagekit.kernels.codebook_matmul import (
    MIN_RUN,
    CodebookCPU,
    codebook_matmul,
    decode_rows,
    prepare_codebook,
    run_length,
)
from sagekit.kernels.half_matmul import half_matmul
from sagekit.kernels.level_matmul import BITS as LEVEL_BITS
from sagekit.kernels.level_matmul import (
    LevelCPU,
    level_matmul,
    level_rows,
    prepare_levels,
)
from sagekit.kernels.llvm_intrinsics import AVX512
from sagekit.kernels.lut_matmul import (
    MAX_GROUPS,
    SHORT_ROW,
    SageCPU,
    prepare,
    sage_matmul,
    unpack_rows,
    walsh_beta,
)
from sagekit.kernels.transformer_ops import causal_softmax, decode_attention, rmsnorm, rope, swiglu

__all__ = [
    "AVX512",
    "LEVEL_BITS",
    "MAX_GROUPS",
    "MIN_RUN",
    "SHORT_ROW",
    "CodebookCPU",
    "LevelCPU",
    "SageCPU",
    "causal_softmax",
    "codebook_matmul",
    "decode_attention",
    "decode_rows",
    "half_matmul",
    "level_matmul",
    "level_rows",
    "prepare",
    "prepare_codebook",
    "prepare_levels",
    "rmsnorm",
    "rope",
    "run_length",
    "sage_matmul",
    "swiglu",
    "unpack_rows",
    "walsh_beta",
]

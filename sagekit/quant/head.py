"""The token embedding and lm_head at `--head-bits` (issue 14): the grid recipe, data-free or, with
calibration, rounded by LDLQ under the Hessian of the lm_head's inputs (the final norm's outputs).

A tied embedding is the largest tensor of a small model (SmolLM2-135M: 28.3M of its 134.5M weights, 56.6 MB of
a 73 MB 1.2-bit folder in FP16). It is stored with the `sage-grid` layout (one FP16 scale per vocabulary row,
2^bits Lloyd levels, input-side rotation), the same bytes the decoder linears use; the model looks rows up
through it and runs the lm_head GEMV on it. A tied matrix is rounded for its lm_head use: the logits are
what the perplexity reads, and an embedding row's error reaches them only through the decoder.
"""

from __future__ import annotations

import numpy as np

from sagekit.format.architecture import EMBED, HEAD
from sagekit.format.config import LlamaConfig
from sagekit.format.stats import MatrixStats
from sagekit.quant import sage_grid

LAYOUT = "sage-grid"
FP16 = 16  # --head-bits 16 keeps the head as it was
# measured on the demo model, FP16 linears, first 16 windows of wiki.test.txt (FP16 20.71; docs/RESULTS.md):
# 5 bits cost 1.9% in perplexity data-free and 0.56% calibrated, 4 bits calibrated 2.1%; the budget is 1%
CALIBRATED_BITS = 5


def default_bits(calibrated: bool) -> int:
    """--head-bits of a sage recipe when not given: the fewest bits measured within 1% perplexity, so 5 with
    calibration (the lm_head rounded under its inputs' Hessian) and FP16 without."""
    return CALIBRATED_BITS if calibrated else FP16


def head_names(config: LlamaConfig) -> list[str]:
    """The tensors --head-bits packs: the embedding, and lm_head when it is not tied to it."""
    return [EMBED] if config.tie_embeddings else [EMBED, HEAD]


def lm_head_name(config: LlamaConfig) -> str:
    """The tensor that computes the logits: the embedding when tied, else lm_head (the one a Hessian fits)."""
    return EMBED if config.tie_embeddings else HEAD


def quantize_head(w: np.ndarray, name: str, bits: int, seed: int, h: np.ndarray | None = None,
                  levels: str = "lloyd") -> tuple[dict[str, np.ndarray], MatrixStats]:
    """(stored arrays, stats) of one head tensor (vocab, dim) at `bits`; h: the lm_head inputs' Hessian, if any."""
    packed, stats = sage_grid.quantize(w, h, name, bits=bits, seed=seed, levels=levels, act_order=h is not None)
    return packed.arrays(), stats

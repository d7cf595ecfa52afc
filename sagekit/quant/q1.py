"""Baseline `q1` (sage-ptq.md section 4, llama.cpp Q1_0 style): sign x one FP16 scale per block of the row.

Blocks of 128 weights (fixed, as in Q1_0) run along the input dimension; each block's scale is its mean |w|,
the scale that minimises the block's squared error for fixed signs. Stored: `sign` uint32 (out, ceil(in/32))
in FORMAT.md bit order and `scale` float16 (out, ceil(in/128)). True bits = 1 + 16/128 = 1.125 when in is a
multiple of 128 (a short last block pays a whole scale). Paper-style bits count the same: nothing is left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sagekit.quant.pack import n_words, pack_bits, unpack_bits
from sagekit.quant.rtn import check_arrays, check_finite, check_padding, check_shape, matrix_stats, plus_minus
from sagekit.quant.stats import MatrixStats

BLOCK = 128


def n_blocks(in_: int) -> int:
    return (in_ + BLOCK - 1) // BLOCK


@dataclass
class PackedQ1:
    sign: np.ndarray  # uint32 (out, WORDS)
    scale: np.ndarray  # float16 (out, NB)
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {"sign": self.sign, "scale": self.scale}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedQ1:
        out, in_ = check_shape(shape)
        a = check_arrays(arrays, {"sign": (np.uint32, (out, n_words(in_))),
                                  "scale": (np.float16, (out, n_blocks(in_)))})
        check_padding("sign", a["sign"], in_)
        check_finite("scale", a["scale"], nonnegative=True)
        return cls(**a, shape=(out, in_))

    def unpack(self) -> np.ndarray:
        in_ = self.shape[1]
        per_column = np.repeat(self.scale.astype(np.float32), BLOCK, axis=1)[:, :in_]
        return plus_minus(unpack_bits(self.sign, in_)) * per_column


def fit(w: np.ndarray, h: np.ndarray | None = None) -> tuple[PackedQ1, np.ndarray]:
    """(packed, the quantiser's own W_hat): sign and block mean |w|; h is ignored (weights only)."""
    w = np.asarray(w, dtype=np.float32)
    out, in_ = w.shape
    nb = n_blocks(in_)
    padded = np.zeros((out, nb * BLOCK), dtype=np.float32)
    padded[:, :in_] = np.abs(w)
    counts = np.minimum(BLOCK, in_ - BLOCK * np.arange(nb)).astype(np.float32)
    scale = (padded.reshape(out, nb, BLOCK).sum(axis=2) / counts).astype(np.float16)
    per_column = scale.astype(np.float32)[:, np.arange(in_) // BLOCK]
    w_hat = np.where(w >= 0, np.float32(1), np.float32(-1)) * per_column
    return PackedQ1.from_arrays({"sign": pack_bits(w >= 0), "scale": scale}, w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "") -> tuple[PackedQ1, MatrixStats]:
    """Paper-style bits: weight bits 1, scale bits 16 per block (llama.cpp's 1.125 at whole blocks)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h)
    nb = n_blocks(w.shape[1])
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0, 16.0 * nb / w.shape[1], t0, groups=nb)

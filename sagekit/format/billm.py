"""The `billm` layout (BiLLM, Huang et al., ICML 2024): per block of BLOCK input columns, salient columns
binarised to order 2 and the rest split into two groups of order 1, every stored byte counted.

Stored (NB = ceil(in/128), S = salient columns of the matrix, W(x) = ceil(x/32)):
  sal_cols  uint32 (W(in),)          column flags, 1 for a salient column (FORMAT.md bit order)
  sign      uint32 (out, W(in))      s1 of every weight (1 when w - mean >= 0)
  sign2     uint32 (out, W(S))       s2 of the salient columns, in column order
  group     uint32 (out, W(in - S))  1 for the large-|w| group, over the non-salient columns in column order
  sal_mean  float16 (out, NB)        m1 + m2 (the decoder needs only the sum)
  sal_scale float16 (out, NB, 2)     a1, a2
  mean      float16 (out, NB, 2)     per group (small, large) of the non-salient entries
  scale     float16 (out, NB, 2)
so true bits sit near 1 + 1 + 7 x 16/128 = 2.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagekit.format.bits import n_words, plus_minus, unpack_bits
from sagekit.format.checks import check_arrays, check_finite, check_padding, check_shape

BLOCK = 128
FIELDS = ("sal_cols", "sign", "sign2", "group", "sal_mean", "sal_scale", "mean", "scale")


def n_blocks(in_: int) -> int:
    return (in_ + BLOCK - 1) // BLOCK


def decode_block(s1: np.ndarray, s2: np.ndarray, large: np.ndarray, sal: np.ndarray, sal_mean: np.ndarray,
                 sal_scale: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W_hat of one block from its bits and float32 parameters; the quantiser (sagekit.quant.billm) and unpack
    both use it, so the weights the compensation sees are bit for bit the ones a reader gets."""
    pm1 = plus_minus(s1)
    w_sal = sal_mean[:, None] + sal_scale[:, 0:1] * pm1 + sal_scale[:, 1:2] * plus_minus(s2)
    w_non = np.where(large, mean[:, 1:2], mean[:, 0:1]) + np.where(large, scale[:, 1:2], scale[:, 0:1]) * pm1
    return np.where(sal[None, :], w_sal, w_non)


@dataclass
class PackedBiLLM:
    sal_cols: np.ndarray
    sign: np.ndarray
    sign2: np.ndarray
    group: np.ndarray
    sal_mean: np.ndarray
    sal_scale: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}

    @property
    def salient_columns(self) -> np.ndarray:
        return unpack_bits(self.sal_cols[None, :], self.shape[1])[0]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedBiLLM:
        out, in_ = check_shape(shape)
        cols = np.ascontiguousarray(arrays.get("sal_cols", np.zeros(0)))
        if cols.dtype != np.uint32 or cols.shape != (n_words(in_),):
            raise ValueError(f"sal_cols: expected uint32 ({n_words(in_)},), got {cols.dtype} {cols.shape}")
        check_padding("sal_cols", cols, in_)
        s = int(unpack_bits(cols[None, :], in_).sum())
        nb = n_blocks(in_)
        a = check_arrays(arrays, {
            "sal_cols": (np.uint32, (n_words(in_),)), "sign": (np.uint32, (out, n_words(in_))),
            "sign2": (np.uint32, (out, n_words(s))), "group": (np.uint32, (out, n_words(in_ - s))),
            "sal_mean": (np.float16, (out, nb)), "sal_scale": (np.float16, (out, nb, 2)),
            "mean": (np.float16, (out, nb, 2)), "scale": (np.float16, (out, nb, 2))})
        check_padding("sign", a["sign"], in_)
        check_padding("sign2", a["sign2"], s)
        check_padding("group", a["group"], in_ - s)
        check_finite("sal_mean", a["sal_mean"])
        check_finite("sal_scale", a["sal_scale"], nonnegative=True)
        check_finite("mean", a["mean"])
        check_finite("scale", a["scale"], nonnegative=True)
        return cls(**a, shape=(out, in_))

    def unpack(self) -> np.ndarray:
        out, in_ = self.shape
        sal = self.salient_columns
        s = int(sal.sum())
        s1 = unpack_bits(self.sign, in_)
        s2 = np.zeros((out, in_), dtype=bool)
        large = np.zeros((out, in_), dtype=bool)
        if s:
            s2[:, sal] = unpack_bits(self.sign2, s)
        if in_ - s:
            large[:, ~sal] = unpack_bits(self.group, in_ - s)
        f32 = lambda a: a.astype(np.float32)  # noqa: E731
        w = np.empty((out, in_), dtype=np.float32)
        for b, st in enumerate(range(0, in_, BLOCK)):
            c = slice(st, min(st + BLOCK, in_))
            w[:, c] = decode_block(s1[:, c], s2[:, c], large[:, c], sal[c], f32(self.sal_mean[:, b]),
                                    f32(self.sal_scale[:, b]), f32(self.mean[:, b]), f32(self.scale[:, b]))
        return w

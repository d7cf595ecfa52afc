"""The baselines' sign-and-scale layouts: one sign bit per weight and FP16 scales.

`rtn` stores `sign` uint32 (out, ceil(in/32)), bit b of word k set when W[r, 32k+b] >= 0 (FORMAT.md bit
order, padding bits 0), and `scale` float16 (out,): one scale per row, 1 + 16/in bits per weight.
`q1` (llama.cpp Q1_0 style) stores the same sign plane and `scale` float16 (out, ceil(in/128)): one scale per
block of Q1_BLOCK weights along the row, 1 + 16/128 = 1.125 bits when in is a multiple of 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagekit.format.bits import n_words, plus_minus, unpack_bits
from sagekit.format.checks import check_arrays, check_finite, check_padding, check_shape

Q1_BLOCK = 128  # fixed, as in Q1_0


def q1_blocks(in_: int) -> int:
    return (in_ + Q1_BLOCK - 1) // Q1_BLOCK


@dataclass
class PackedSignScale:
    """A sign plane and FP16 scales (rtn: one per row; q1: one per block): storage and validation."""

    sign: np.ndarray  # uint32 (out, WORDS)
    scale: np.ndarray  # float16, of scale_shape(out, in)
    shape: tuple[int, int]

    @staticmethod
    def scale_shape(out: int, in_: int) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {"sign": self.sign, "scale": self.scale}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedSignScale:
        out, in_ = check_shape(shape)
        a = check_arrays(arrays, {"sign": (np.uint32, (out, n_words(in_))),
                                  "scale": (np.float16, cls.scale_shape(out, in_))})
        check_padding("sign", a["sign"], in_)
        check_finite("scale", a["scale"], nonnegative=True)
        return cls(**a, shape=(out, in_))


class PackedRTN(PackedSignScale):
    @staticmethod
    def scale_shape(out: int, in_: int) -> tuple[int, ...]:
        return (out,)

    def unpack(self) -> np.ndarray:
        return plus_minus(unpack_bits(self.sign, self.shape[1])) * self.scale.astype(np.float32)[:, None]


class PackedQ1(PackedSignScale):
    @staticmethod
    def scale_shape(out: int, in_: int) -> tuple[int, ...]:
        return (out, q1_blocks(in_))

    def unpack(self) -> np.ndarray:
        in_ = self.shape[1]
        per_column = np.repeat(self.scale.astype(np.float32), Q1_BLOCK, axis=1)[:, :in_]
        return plus_minus(unpack_bits(self.sign, in_)) * per_column

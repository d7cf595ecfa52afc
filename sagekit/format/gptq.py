"""Layout `gptq` (sagekit/quant/gptq.py quantises into it): integer codes with per-group scale and zero point.

Stored (B = bits, NG = ceil(in / group), W(x) = ceil(x / 32)), all in act-order column order:
  codes  uint32 (B, out, W(in))  integer code q of every weight as B bit planes (FORMAT.md bit order)
  scale  float16 (out, NG)       w_hat = scale * (q - zero)
  zero   uint8 (out, NG)
  perm   uint16 (in,)            the act-order: stored column j is original column perm[j]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagekit.format.bits import n_words, unpack_bits
from sagekit.format.checks import check_arrays, check_finite, check_padding, check_shape
from sagekit.format.stored import StoredArrays

MAX_IN = 1 << 16  # uint16 perm


@dataclass
class PackedGPTQ(StoredArrays):
    codes: np.ndarray  # uint32 (B, out, W(in))
    scale: np.ndarray  # float16 (out, NG)
    zero: np.ndarray  # uint8 (out, NG)
    perm: np.ndarray  # uint16 (in,)
    shape: tuple[int, int]


    def unpack(self) -> np.ndarray:
        out, in_ = self.shape
        q = np.zeros((out, in_), dtype=np.float32)
        for k in range(self.codes.shape[0]):
            q += unpack_bits(self.codes[k], in_).astype(np.float32) * (1 << k)
        group = -(-in_ // self.scale.shape[1])
        cols = np.arange(in_) // group
        permuted = self.scale.astype(np.float32)[:, cols] * (q - self.zero.astype(np.float32)[:, cols])
        w_hat = np.empty_like(permuted)
        w_hat[:, self.perm.astype(np.int64)] = permuted
        return w_hat

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedGPTQ:
        out, in_ = check_shape(shape)
        codes = np.asarray(arrays.get("codes", np.zeros((0,), np.uint32)))
        bits = codes.shape[0] if codes.ndim == 3 else 0
        scale = np.asarray(arrays.get("scale", np.zeros((0, 0), np.float16)))
        ng = scale.shape[1] if scale.ndim == 2 else 0
        if not (1 <= bits <= 8 and 1 <= ng <= in_):
            raise ValueError(f"codes/scale: expected (B, {out}, {n_words(in_)}) and ({out}, NG), got "
                             f"{codes.shape} and {scale.shape}")
        a = check_arrays(arrays, {"codes": (np.uint32, (bits, out, n_words(in_))), "scale": (np.float16, (out, ng)),
                                  "zero": (np.uint8, (out, ng)), "perm": (np.uint16, (in_,))})
        check_padding("codes", a["codes"], in_)
        check_finite("scale", a["scale"])
        if (a["zero"] >= 1 << bits).any():
            raise ValueError(f"zero: points must be below 2^{bits}")
        if not np.array_equal(np.sort(a["perm"].astype(np.int64)), np.arange(in_)):
            raise ValueError("perm: not a permutation of the columns")
        return cls(**a, shape=(out, in_))

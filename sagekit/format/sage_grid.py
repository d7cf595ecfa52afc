"""The `sage-grid` layout (docs/FORMAT.md): each weight one of 2^B levels of its matrix, times its row's FP16
scale, on input-side rotated weights.

Stored (W(x) = ceil(x / 32), B = bits):
  codes   uint32 (B, out, W(in))  level index of every weight as B bit planes, plane k = bit k (FORMAT.md order)
  scale   float16 (out,)          per-row scale
  levels  float16 (2^B,)          the matrix's levels, ascending
  rot     uint32 (1,)             seed of the input-side rotation R (sagekit.format.rotation); the stored grid
                                  is W R^T (absent: no rotation, R = I, the `--no-rotate` ablation)
W_hat = (scale[r] * levels[code[r, c]]) R, i.e. y = W_hat x = (scale * levels[codes]) (R x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagekit.format import rotation
from sagekit.format.bits import n_words, pack_bits, unpack_bits
from sagekit.format.sage import PackedSage
from sagekit.format.checks import check_arrays, check_finite, check_padding, check_shape
from sagekit.format.stored import StoredArrays

MAX_BITS = 8


@dataclass
class PackedGrid(StoredArrays):
    codes: np.ndarray  # uint32 (B, out, W(in))
    scale: np.ndarray  # float16 (out,)
    levels: np.ndarray  # float16 (2^B,)
    shape: tuple[int, int]
    rot: np.ndarray | None = None  # uint32 (1,)

    @property
    def bits(self) -> int:
        return int(self.codes.shape[0])


    def indices(self, rows: np.ndarray | None = None) -> np.ndarray:
        """uint8 (out, in) level index of every weight (of the given rows only, if any)."""
        codes = self.codes if rows is None else self.codes[:, rows]
        idx = np.zeros((codes.shape[1], self.shape[1]), dtype=np.uint8)
        for k in range(self.bits):
            idx |= unpack_bits(codes[k], self.shape[1]).astype(np.uint8) << k
        return idx

    def rotated(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 (out, in): the stored grid W R^T (of the given rows only, if any), before the rotation is
        undone."""
        scale = self.scale if rows is None else self.scale[rows]
        return scale.astype(np.float32)[:, None] * self.levels.astype(np.float32)[self.indices(rows)]

    def unpack(self) -> np.ndarray:
        grid = self.rotated()
        return grid if self.rot is None else rotation.unrotate(grid, int(self.rot[0]))

    def as_sage(self) -> PackedSage | None:
        """The codes as a `sage` matrix with no salient entries, when the levels are mirrored about 0 (the
        `symmetric` levels): sign plane = the top code bit, group id = the magnitude index, alpha = the
        positive levels, so levels[code] = (2 sign - 1) alpha[id] and the `sage` LUT kernel runs the product.
        The row scales and the rotation stay outside it. None for levels of any other shape."""
        b, half = self.bits, 1 << (self.bits - 1)
        lv = self.levels
        if not (np.array_equal(lv[half:], -lv[:half][::-1]) and np.all(lv[half:] > 0)):
            return None
        out, in_ = self.shape
        top = self.codes[b - 1]
        valid = np.full(top.shape[1], 0xFFFFFFFF, dtype=np.uint32)
        if in_ % 32:
            valid[-1] = (1 << (in_ % 32)) - 1
        negative = ~top & valid  # a negative code's magnitude id is its low bits inverted
        gid = self.codes[: b - 1] ^ negative[None]
        arrays = {"sign": top, "gid": gid, "alpha": lv[half:].copy(), "sal_ptr": np.zeros(out + 1, np.int32),
                  "sal_idx": np.zeros(0, np.uint16), "sal_val": np.zeros(0, np.int8),
                  "sal_scale": np.zeros(out, np.float16)}
        return PackedSage.from_arrays(arrays, self.shape)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedGrid:
        out, in_ = check_shape(shape)
        n_levels = np.shape(arrays.get("levels", ()))[0] if np.ndim(arrays.get("levels", ())) == 1 else 0
        bits = (n_levels - 1).bit_length()
        if not (1 <= bits <= MAX_BITS and n_levels == 1 << bits):
            raise ValueError(f"levels: expected 2^B entries, B = 1 to {MAX_BITS}, got shape "
                             f"{np.shape(arrays.get('levels', ()))}")
        expect = {"codes": (np.uint32, (bits, out, n_words(in_))), "scale": (np.float16, (out,)),
                  "levels": (np.float16, (1 << bits,))}
        if "rot" in arrays:
            expect["rot"] = (np.uint32, (1,))
        a = check_arrays(arrays, expect)
        check_padding("codes", a["codes"], in_)
        check_finite("scale", a["scale"])
        check_finite("levels", a["levels"])
        return cls(**a, shape=(out, in_))


def pack_grid(idx: np.ndarray, scale: np.ndarray, levels: np.ndarray, rot_seed: int | None) -> PackedGrid:
    """Pack the quantiser's uint8 level indices (out, in) into B bit planes, with scales, levels and seed."""
    bits = (len(levels) - 1).bit_length()
    arrays = {"codes": np.stack([pack_bits(((idx >> k) & 1).astype(bool)) for k in range(bits)]),
              "scale": scale.astype(np.float16), "levels": levels.astype(np.float16)}
    if rot_seed is not None:
        arrays["rot"] = np.array([rot_seed], np.uint32)
    return PackedGrid.from_arrays(arrays, idx.shape)


def grid_nbytes(out: int, in_: int, bits: int, rotate: bool = True) -> int:
    """What pack_grid() stores for a matrix of this shape at this many bits."""
    return 4 * bits * out * n_words(in_) + 2 * out + 2 * (1 << bits) + 4 * rotate

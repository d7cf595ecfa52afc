"""The `sage-vq` layout (docs/FORMAT.md): each run of D consecutive weights of a row is one of the 256
codewords of its matrix, times the row's FP16 scale, on input-side rotated weights.

Stored (D = dim, in a multiple of D):
  codes     uint8 (out, in / D)   codeword index of every run of D weights, row-major
  scale     float16 (out,)        per-row scale
  codebook  int8 (256, D)         the matrix's codewords in units of book_scale
  book_scale float16 (1,)         the codebook's step (its largest |entry| / 127)
  rot       uint32 (1,)           seed of the input-side rotation R (sagekit.format.rotation); the stored
                                  matrix is W R^T (absent: no rotation)
W_hat = (scale[r] * book_scale * codebook[codes[r]].reshape(in)) R. One byte codes D weights: 8 / D bits per
weight (D = 4: 2 bits, D = 3: 2.67, D = 8: 1) plus 16 / in for the scale and 2 KiB / (out x in) for the
codebook. An 8-bit codebook halves the fp16 one's cost (0.016 bits per weight over the demo model, not 0.032)
and its rounding step is 1/254 of its range, far below the 2-bit coding error it describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagekit.format import rotation
from sagekit.format.checks import check_arrays, check_finite, check_shape
from sagekit.format.stored import StoredArrays

ENTRIES = 256
DIMS = (2, 3, 4, 6, 8)


@dataclass
class PackedVQ(StoredArrays):
    codes: np.ndarray  # uint8 (out, in / D)
    scale: np.ndarray  # float16 (out,)
    codebook: np.ndarray  # int8 (256, D)
    book_scale: np.ndarray  # float16 (1,)
    shape: tuple[int, int]
    rot: np.ndarray | None = None  # uint32 (1,)

    @property
    def dim(self) -> int:
        return int(self.codebook.shape[1])

    def codewords(self) -> np.ndarray:
        """float32 (256, D): the codebook's values."""
        return self.codebook.astype(np.float32) * np.float32(self.book_scale[0])

    def rotated(self) -> np.ndarray:
        """float32 (out, in): the stored W R^T, before the rotation is undone."""
        runs = self.codewords()[self.codes].reshape(self.shape)
        return self.scale.astype(np.float32)[:, None] * runs

    def unpack(self) -> np.ndarray:
        w = self.rotated()
        return w if self.rot is None else rotation.unrotate(w, int(self.rot[0]))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedVQ:
        out, in_ = check_shape(shape)
        book_shape = np.shape(arrays.get("codebook", ()))
        dim = book_shape[1] if len(book_shape) == 2 else 0
        if dim not in DIMS or book_shape[0] != ENTRIES or in_ % dim:
            raise ValueError(f"codebook: expected ({ENTRIES}, D) with D in {DIMS} dividing {in_}, got {book_shape}")
        expect = {"codes": (np.uint8, (out, in_ // dim)), "scale": (np.float16, (out,)),
                  "codebook": (np.int8, (ENTRIES, dim)), "book_scale": (np.float16, (1,))}
        if "rot" in arrays:
            expect["rot"] = (np.uint32, (1,))
        a = check_arrays(arrays, expect)
        check_finite("scale", a["scale"])
        check_finite("book_scale", a["book_scale"])
        return cls(**a, shape=(out, in_))


def book_step(codebook: np.ndarray) -> np.float16:
    """The FP16 step that maps the codebook onto int8: its largest |entry| / 127."""
    top = float(np.max(np.abs(codebook)))
    return np.float16(top / 127.0 if top > 0 else 1.0)


def book_ints(codebook: np.ndarray, step: np.float16) -> np.ndarray:
    """int8 (256, D): the codebook in units of step."""
    return np.clip(np.rint(np.asarray(codebook, np.float64) / float(step)), -127, 127).astype(np.int8)


def pack_vq(codes: np.ndarray, scale: np.ndarray, codebook: np.ndarray, rot_seed: int | None) -> PackedVQ:
    """The quantiser's uint8 codes (out, in / D), scales and codebook (float, already on the int8 grid of
    book_step) as the stored layout."""
    step = book_step(codebook)
    arrays = {"codes": codes.astype(np.uint8), "scale": scale.astype(np.float16),
              "codebook": book_ints(codebook, step), "book_scale": np.array([step], np.float16)}
    if rot_seed is not None:
        arrays["rot"] = np.array([rot_seed], np.uint32)
    return PackedVQ.from_arrays(arrays, (codes.shape[0], codes.shape[1] * codebook.shape[1]))


def vq_nbytes(out: int, in_: int, dim: int, rotate: bool = True) -> int:
    """What pack_vq() stores for a matrix of this shape with runs of `dim` weights."""
    return out * (in_ // dim) + 2 * out + ENTRIES * dim + 2 + 4 * rotate

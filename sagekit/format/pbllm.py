"""The `pbllm` layout (PB-LLM, Shang et al., ICLR 2024): a salient fraction of the weights as 8-bit
per-row asymmetric integers, the rest binarised with a per-row mean and scale.

Stored (nnz salient entries, n_bin = out x in - nnz, W(x) = ceil(x/32)):
  sign       uint32 (W(n_bin),)   signs of the binarised entries, row-major, bit order of FORMAT.md
  sal_mask   uint32 (out, W(in))  salient positions as a bitmap            } whichever of the two is smaller
  sal_ptr    int32 (out + 1,)     or as CSR row pointers and column ids     } is stored (bitmap from ~6% up)
  sal_idx    uint16 (nnz,)
  sal_val    uint8 (nnz,)         row-major, w_hat = sal_scale[r] * (q - sal_zero[r])
  sal_scale  float16 (out,)
  sal_zero   uint8 (out,)
  mean       float16 (out,)       binarised w_hat = mean[r] + scale[r] * (+1 / -1)
  scale      float16 (out,)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagekit.format.bits import n_words, pack_bits, plus_minus, unpack_bits
from sagekit.format.checks import (
    check_arrays,
    check_csr,
    check_finite,
    check_padding,
    check_shape,
)
from sagekit.format.stored import StoredArrays

MAX_IDX_IN = 1 << 16  # uint16 column ids


def decode(salient: np.ndarray, qint: np.ndarray, sign: np.ndarray, sal_scale: np.ndarray, sal_zero: np.ndarray,
           mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W_hat from dense codes; parameters broadcast against the codes (per row). The quantiser
    (sagekit.quant.pbllm) and unpack share it."""
    high = sal_scale * (qint.astype(np.float32) - sal_zero.astype(np.float32))
    return np.where(salient, high, mean + scale * plus_minus(sign))


@dataclass
class PackedPBLLM(StoredArrays):
    sign: np.ndarray  # uint32 (W(n_bin),)
    sal_val: np.ndarray  # uint8 (nnz,)
    sal_scale: np.ndarray  # float16 (out,)
    sal_zero: np.ndarray  # uint8 (out,)
    mean: np.ndarray  # float16 (out,)
    scale: np.ndarray  # float16 (out,)
    shape: tuple[int, int]
    sal_mask: np.ndarray | None = None  # uint32 (out, W(in)), or else the CSR pair below
    sal_ptr: np.ndarray | None = None  # int32 (out + 1,)
    sal_idx: np.ndarray | None = None  # uint16 (nnz,)


    def salient(self) -> np.ndarray:
        """bool (out, in): the salient positions, from whichever store the matrix uses."""
        out, in_ = self.shape
        if self.sal_mask is not None:
            return unpack_bits(self.sal_mask, in_)
        mask = np.zeros((out, in_), dtype=bool)
        mask[np.repeat(np.arange(out), np.diff(self.sal_ptr)), self.sal_idx] = True
        return mask

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedPBLLM:
        out, in_ = check_shape(shape)
        val = np.asarray(arrays.get("sal_val", np.zeros((0, 0))))
        if val.dtype != np.uint8 or val.ndim != 1 or val.shape[0] > out * in_:
            raise ValueError(f"sal_val: expected uint8 (nnz,) with nnz <= out x in, got {val.dtype} {val.shape}")
        nnz = val.shape[0]
        expect = {"sign": (np.uint32, (n_words(out * in_ - nnz),)), "sal_val": (np.uint8, (nnz,)),
                  "sal_scale": (np.float16, (out,)), "sal_zero": (np.uint8, (out,)), "mean": (np.float16, (out,)),
                  "scale": (np.float16, (out,))}
        if "sal_mask" in arrays:
            expect["sal_mask"] = (np.uint32, (out, n_words(in_)))
        else:
            expect |= {"sal_ptr": (np.int32, (out + 1,)), "sal_idx": (np.uint16, (nnz,))}
        a = check_arrays(arrays, expect)
        check_padding("sign", a["sign"], out * in_ - nnz)
        if "sal_mask" in a:
            check_padding("sal_mask", a["sal_mask"], in_)
            if int(unpack_bits(a["sal_mask"], in_).sum()) != nnz:
                raise ValueError(f"sal_mask: number of set bits differs from the {nnz} values in sal_val")
        else:
            check_csr(a["sal_ptr"], a["sal_idx"], in_)
        check_finite("sal_scale", a["sal_scale"], nonnegative=True)
        check_finite("mean", a["mean"])
        check_finite("scale", a["scale"], nonnegative=True)
        return cls(**a, shape=(out, in_))

    def unpack(self) -> np.ndarray:
        out, in_ = self.shape
        salient = self.salient()
        qint = np.zeros((out, in_), dtype=np.uint8)
        qint[salient] = self.sal_val
        sign = np.zeros((out, in_), dtype=bool)
        sign[~salient] = unpack_bits(self.sign[None, :], out * in_ - self.sal_val.shape[0])[0]
        col = lambda a: a.astype(np.float32)[:, None]  # noqa: E731
        return decode(salient, qint, sign, col(self.sal_scale), self.sal_zero[:, None], col(self.mean),
                      col(self.scale))


def position_arrays(salient: np.ndarray) -> dict[str, np.ndarray]:
    """The cheaper store of the salient positions: a bitmap (1 bit per weight) or CSR (16 bits per entry)."""
    out, in_ = salient.shape
    nnz = int(salient.sum())
    if in_ > MAX_IDX_IN or 4 * out * n_words(in_) <= 4 * (out + 1) + 2 * nnz:
        return {"sal_mask": pack_bits(salient)}
    rows, cols = np.nonzero(salient)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=out))]).astype(np.int32)
    return {"sal_ptr": ptr, "sal_idx": cols.astype(np.uint16)}

"""Baseline `pbllm` (PB-LLM, Shang et al., ICLR 2024): partial binarisation with GPTQ, every stored byte counted.

As PB-LLM's GPTQ variant does: the salient set is the top `fraction` (default 10%) of all entries by OBS
saliency w^2 / U_jj^2, fixed up front on the original weights; salient entries are stored as 8-bit
per-channel asymmetric integers (scale and zero point from the row's min/max, as GPTQ's quantiser); the rest
are binarised as mean + scale * sign with a per-row mean and scale (mean |w - mean|) over the row's
non-salient entries. Columns are then quantised one at a time, left to right, each column's error spread
over the later columns through U (full GPTQ: hessian.gptq_columns inside blocks, hessian.compensate across).

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
Paper-style bits are PB-LLM's own count, 1 + fraction x (8 - 1) (1.7 at 10%), with no scale bits: it leaves out
the positions of the salient entries and the per-row parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np

from sagekit.quant.hessian import compensate, gptq_columns, inverse_hessian_factor, saliency
from sagekit.quant.pack import check_csr, n_words, pack_bits, unpack_bits
from sagekit.quant.rtn import check_arrays, check_finite, check_padding, check_shape, matrix_stats, plus_minus
from sagekit.quant.stats import MatrixStats

BLOCK = 128
BITS = 8
MAXQ = (1 << BITS) - 1
FRACTION = 0.1
MAX_IDX_IN = 1 << 16  # uint16 column ids


def _decode(salient: np.ndarray, qint: np.ndarray, sign: np.ndarray, sal_scale: np.ndarray, sal_zero: np.ndarray,
            mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W_hat from dense codes; parameters broadcast against the codes (per row). Quantiser and unpack share it."""
    high = sal_scale * (qint.astype(np.float32) - sal_zero.astype(np.float32))
    return np.where(salient, high, mean + scale * plus_minus(sign))


@dataclass
class PackedPBLLM:
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

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "shape" and getattr(self, f.name) is not None}

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
        return _decode(salient, qint, sign, col(self.sal_scale), self.sal_zero[:, None], col(self.mean),
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


def _row_params(w: np.ndarray, salient: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sal_scale, sal_zero, mean, scale) per row, rounded to what is stored (float16, uint8)."""
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    flat = (lo == 0) & (hi == 0)
    lo, hi = np.where(flat, -1.0, lo), np.where(flat, 1.0, hi)
    sal_scale = ((hi - lo) / MAXQ).astype(np.float16)
    sal_zero = np.clip(np.round(-lo / sal_scale.astype(np.float32)), 0, MAXQ).astype(np.uint8)
    binary = ~salient
    count = np.maximum(binary.sum(axis=1), 1)
    mean = np.where(binary, w, 0.0).sum(axis=1) / count
    scale = np.where(binary, np.abs(w - mean[:, None]), 0.0).sum(axis=1) / count
    return sal_scale, sal_zero, mean.astype(np.float16), scale.astype(np.float16)


def fit(w: np.ndarray, h: np.ndarray | None, fraction: float = FRACTION, damp: float = 0.01,
        propagate: bool = True) -> tuple[PackedPBLLM, np.ndarray]:
    """(packed, the quantiser's own W_hat) for weight w (out, in) and layer-input Hessian h (in, in).

    propagate=False quantises every column of the original weights (no GPTQ updates): the ablation.
    """
    if h is None:
        raise ValueError("pbllm needs the calibration Hessian of the layer's inputs")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: {fraction} is outside [0, 1]")
    w = np.asarray(w, dtype=np.float32)
    u, dead = inverse_hessian_factor(h, damp)
    work = w.copy()
    work[:, dead] = 0.0
    nnz = int(round(fraction * w.size))
    salient = np.zeros(w.size, dtype=bool)
    if nnz:
        salient[np.argpartition(-saliency(work, u).ravel(), nnz - 1)[:nnz]] = True
    salient = salient.reshape(w.shape)
    sal_scale, sal_zero, mean, scale = _row_params(work, salient)
    ss, sz, m, s = (a.astype(np.float32) for a in (sal_scale, sal_zero, mean, scale))
    qint = np.zeros(w.shape, dtype=np.uint8)
    sign = np.zeros(w.shape, dtype=bool)

    def column(j: int, x: np.ndarray) -> np.ndarray:
        qint[:, j] = np.clip(np.round(x / ss) + sz, 0, MAXQ)
        sign[:, j] = x - m >= 0
        return _decode(salient[:, j], qint[:, j], sign[:, j], ss, sal_zero, m, s)

    def block(wb: np.ndarray, st: int) -> np.ndarray:
        ub = u[st:st + wb.shape[1], st:st + wb.shape[1]]
        return gptq_columns(wb, ub, lambda i, x: column(st + i, x), propagate)

    w_hat = compensate(work, u, block, BLOCK, propagate)
    arrays = {"sign": pack_bits(sign[~salient][None, :])[0], **position_arrays(salient),
              "sal_val": qint[salient], "sal_scale": sal_scale, "sal_zero": sal_zero, "mean": mean, "scale": scale}
    return PackedPBLLM.from_arrays(arrays, w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None, name: str = "", fraction: float = FRACTION, damp: float = 0.01,
             propagate: bool = True) -> tuple[PackedPBLLM, MatrixStats]:
    """fit() plus the report row; paper-style bits 1 + 7 x fraction, PB-LLM's count (see the module docstring)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h, fraction, damp, propagate)
    r = packed.sal_val.shape[0] / w.size
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0 + r * (BITS - 1), 0.0, t0, salient_fraction=r)

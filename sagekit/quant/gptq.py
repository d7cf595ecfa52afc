"""Baseline `gptq` (Frantar et al., ICLR 2023): the standard calibrated peer of the grid recipe.

Plain GPTQ as its reference code runs it: columns in act-order (descending Hessian diagonal), groups of
`group` (64) consecutive columns in that order, each with an asymmetric min-max grid of 2^bits levels per
row (FP16 scale, integer zero point), set when the quantiser reaches the group's first column (so it sees
the error already pushed onto the group); each column's rounding error moves onto the later columns
through U, the upper Cholesky factor of H^-1, with lazy updates between blocks of 128 columns.

Stored (B = bits, NG = ceil(in / group), W(x) = ceil(x / 32)), all in act-order column order:
  codes  uint32 (B, out, W(in))  integer code q of every weight as B bit planes (FORMAT.md bit order)
  scale  float16 (out, NG)       w_hat = scale * (q - zero)
  zero   uint8 (out, NG)
  perm   uint16 (in,)            the act-order: stored column j is original column perm[j]
True bits = B + 24/group + 16/out (+ padding): 2.375 at B = 2, group 64, before the perm's share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np

from sagekit.quant.hessian import inverse_hessian_factor
from sagekit.quant.pack import n_words, pack_bits, unpack_bits
from sagekit.quant.rtn import check_arrays, check_finite, check_padding, check_shape, matrix_stats
from sagekit.quant.stats import MatrixStats

GROUP = 64
BLOCK = 128
MAX_IN = 1 << 16  # uint16 perm


@dataclass
class PackedGPTQ:
    codes: np.ndarray  # uint32 (B, out, W(in))
    scale: np.ndarray  # float16 (out, NG)
    zero: np.ndarray  # uint8 (out, NG)
    perm: np.ndarray  # uint16 (in,)
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shape"}

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


def _group_grid(wg: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row FP16 scale and integer zero of the min-max grid over a group's current weights."""
    lo, hi = np.minimum(wg.min(axis=1), 0), np.maximum(wg.max(axis=1), 0)
    scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1))
    zero = np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def fit(w: np.ndarray, h: np.ndarray, bits: int = 4, group: int = GROUP,
        damp: float = 0.01) -> tuple[PackedGPTQ, np.ndarray]:
    """(packed, its W_hat); GPTQ's column loop in act-order with per-group grids set as they are reached."""
    out, in_ = w.shape
    if in_ > MAX_IN:
        raise ValueError(f"in = {in_} columns exceed the uint16 act-order permutation")
    maxq = (1 << bits) - 1
    perm = np.argsort(-np.diag(h), kind="stable")
    u, dead = inverse_hessian_factor(np.asarray(h)[np.ix_(perm, perm)], damp)
    wp = np.array(w, dtype=np.float32)[:, perm]
    wp[:, dead] = 0
    ng = -(-in_ // group)
    scale, zero = np.zeros((out, ng), np.float32), np.zeros((out, ng), np.float32)
    q = np.zeros((out, in_), np.int64)
    for st in range(0, in_, BLOCK):
        ed = min(st + BLOCK, in_)
        err = np.zeros((out, ed - st), np.float32)
        for j in range(st, ed):
            if j % group == 0:
                g = j // group
                scale[:, g], zero[:, g] = _group_grid(wp[:, j:min(j + group, in_)], maxq)
            g = j // group
            q[:, j] = np.clip(np.round(wp[:, j] / scale[:, g] + zero[:, g]), 0, maxq)
            err[:, j - st] = (wp[:, j] - scale[:, g] * (q[:, j] - zero[:, g])) / u[j, j]
            wp[:, j + 1:ed] -= np.outer(err[:, j - st], u[j, j + 1:ed])
        wp[:, ed:] -= err @ u[st:ed, ed:]
    codes = np.stack([pack_bits(((q >> k) & 1).astype(bool)) for k in range(bits)])
    packed = PackedGPTQ.from_arrays({"codes": codes, "scale": scale.astype(np.float16),
                                     "zero": zero.astype(np.uint8), "perm": perm.astype(np.uint16)}, (out, in_))
    return packed, packed.unpack()


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "", bits: int = 4, group: int = GROUP,
             damp: float = 0.01) -> tuple[PackedGPTQ, MatrixStats]:
    """Paper-style bits: GPTQ's own count, bits + 16/group for the scale (the zero point and act-order left out)."""
    if h is None:
        raise ValueError("gptq needs a calibration Hessian")
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h, bits, group, damp)
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, float(bits), 16.0 / group, t0)

"""Baseline `rtn` (sage-ptq.md section 4): w_hat = sign(w) * mean|w| of its row, the plainest 1-bit scheme.

Stored per matrix: `sign` uint32 (out, ceil(in/32)), bit b of word k set when W[r, 32k+b] >= 0 (FORMAT.md bit
order, padding bits 0), and `scale` float16 (out,). True bits = 1 + 16/in when in is a multiple of 32.
Paper-style bits count the same two things (weight bits 1, scale bits 16/in): nothing is left out.

This module also holds what every baseline layout shares: field checks for files that may be corrupt, the
sign-plane decoding, and the per-matrix stats in the report's format (sagekit.quant.sage.MatrixStats).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sagekit.quant.pack import n_words, pack_bits, unpack_bits
from sagekit.quant.stats import MatrixStats


def check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    out, in_ = (int(d) for d in shape)
    if out < 1 or in_ < 1:
        raise ValueError(f"shape: {shape} must be positive")
    return out, in_


def check_arrays(arrays: dict[str, np.ndarray],
                 expect: dict[str, tuple[type, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Exactly the fields of `expect`, each with its dtype and shape; returns contiguous copies-or-views."""
    for name in arrays:
        if name not in expect:
            raise ValueError(f"{name}: not a field of this layout")
    out = {}
    for name, (dtype, shape) in expect.items():
        if name not in arrays:
            raise ValueError(f"{name}: missing")
        a = np.ascontiguousarray(arrays[name])
        if a.dtype != dtype or a.shape != tuple(shape):
            raise ValueError(f"{name}: expected {np.dtype(dtype).name} {tuple(shape)}, got {a.dtype} {a.shape}")
        out[name] = a
    return out


def check_padding(name: str, words: np.ndarray, n_bits: int) -> None:
    """Bits at positions >= n_bits of the last word of every row (of a 2-D plane) must be 0."""
    tail = n_bits % 32
    if words.size and tail and (words[..., -1] & np.uint32(~((1 << tail) - 1) & 0xFFFFFFFF)).any():
        raise ValueError(f"{name}: padding bits are not 0")


def check_finite(name: str, a: np.ndarray, nonnegative: bool = False) -> None:
    f = a.astype(np.float32)
    if not np.isfinite(f).all() or (nonnegative and (f < 0).any()):
        raise ValueError(f"{name}: must be finite{' and non-negative' if nonnegative else ''}")


def plus_minus(bits: np.ndarray) -> np.ndarray:
    """bool -> float32 +1 / -1."""
    return np.where(bits, np.float32(1), np.float32(-1))


def matrix_stats(name: str, w: np.ndarray, w_hat: np.ndarray, nbytes: int, paper_bits: float, paper_scale_bits: float,
                 t0: float, salient_fraction: float = 0.0, groups: int = 1) -> MatrixStats:
    """The report row of one matrix; relative error is against the original weight."""
    n = w.size
    err = float(np.sum((w.astype(np.float64) - w_hat) ** 2) / max(np.sum(w.astype(np.float64) ** 2), 1e-30))
    return MatrixStats(name=name, shape=(int(w.shape[0]), int(w.shape[1])), salient_fraction=salient_fraction,
                       groups=groups, silhouette_groups=0, paper_bits=paper_bits, paper_scale_bits=paper_scale_bits,
                       true_bits=8.0 * nbytes / n, rel_error=err, seconds=time.perf_counter() - t0, nbytes=nbytes)


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


def fit(w: np.ndarray, h: np.ndarray | None = None) -> tuple[PackedRTN, np.ndarray]:
    """(packed, the quantiser's own W_hat): sign and row mean |w|; h is ignored (RTN uses the weights only)."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).mean(axis=1).astype(np.float16)
    w_hat = np.where(w >= 0, np.float32(1), np.float32(-1)) * scale.astype(np.float32)[:, None]
    return PackedRTN.from_arrays({"sign": pack_bits(w >= 0), "scale": scale}, w.shape), w_hat


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "") -> tuple[PackedRTN, MatrixStats]:
    """Paper-style bits: weight bits 1, scale bits 16/in (the one FP16 scale per row)."""
    t0 = time.perf_counter()
    packed, w_hat = fit(w, h)
    return packed, matrix_stats(name, w, w_hat, packed.nbytes, 1.0, 16.0 / w.shape[1], t0)

"""Method `sage-grid`, the `grid` recipe of `sagekit compress` (issue 13): SAGE's minimal-scale idea made to
keep a small model working.

Per matrix: rotate the input side with a seeded Kronecker rotation (sagekit.quant.rotation), give every
row one FP16 scale (the paper's "scaling bits", one per output channel), and code each weight as one of
2^bits levels fitted to the matrix (Lloyd-Max, sagekit.quant.grid). With a calibration Hessian the codes
are rounded by LDLQ (error feedback) and the levels are fitted under the Hessian's diagonal weighting.
The bits of each matrix come from the recipe, or from the allocation that `--target-bpw` solves.

Stored (W(x) = ceil(x / 32), B = bits):
  codes   uint32 (B, out, W(in))  level index of every weight as B bit planes, plane k = bit k (FORMAT.md order)
  scale   float16 (out,)          per-row scale
  levels  float16 (2^B,)          the matrix's levels, ascending
  rot     uint32 (1,)             seed of the input-side rotation R; the stored grid is W R^T (absent: no
                                  rotation, R = I, the `--no-rotate` ablation)
W_hat = (scale[r] * levels[code[r, c]]) R, i.e. y = W_hat x = (scale * levels[codes]) (R x).
Each part is a knob of quantize(), so the ablation can take it away: rotate, row_scale, lloyd levels
(else a uniform grid), error_feedback (LDLQ; needs a Hessian).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, fields

import numpy as np

from sagekit.quant import rotation
from sagekit.quant.pack import n_words, pack_bits, unpack_bits
from sagekit.quant.rtn import check_arrays, check_finite, check_padding, check_shape, matrix_stats
from sagekit.quant.stats import MatrixStats

MAX_BITS = 8
# linears that read the same activation share its rotation, so the run time rotates each input once
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def rotation_seed(seed: int, name: str) -> int:
    """One rotation per (layer, input): q/k/v share one, gate/up share one."""
    prefix, _, proj = name.rpartition(".")
    return zlib.crc32(f"{seed}:{prefix}:{SHARED_INPUT.get(proj, proj)}".encode())


@dataclass
class PackedGrid:
    codes: np.ndarray  # uint32 (B, out, W(in))
    scale: np.ndarray  # float16 (out,)
    levels: np.ndarray  # float16 (2^B,)
    shape: tuple[int, int]
    rot: np.ndarray | None = None  # uint32 (1,)

    @property
    def bits(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "shape" and getattr(self, f.name) is not None}

    def indices(self) -> np.ndarray:
        """uint8 (out, in) level index of every weight."""
        idx = np.zeros(self.shape, dtype=np.uint8)
        for k in range(self.bits):
            idx |= unpack_bits(self.codes[k], self.shape[1]).astype(np.uint8) << k
        return idx

    def rotated(self) -> np.ndarray:
        """float32 (out, in): the stored grid W R^T, before the rotation is undone."""
        return self.scale.astype(np.float32)[:, None] * self.levels.astype(np.float32)[self.indices()]

    def unpack(self) -> np.ndarray:
        grid = self.rotated()
        return grid if self.rot is None else rotation.unrotate(grid, int(self.rot[0]))

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


def pack(idx: np.ndarray, scale: np.ndarray, levels: np.ndarray, rot_seed: int | None) -> PackedGrid:
    bits = (len(levels) - 1).bit_length()
    arrays = {"codes": np.stack([pack_bits(((idx >> k) & 1).astype(bool)) for k in range(bits)]),
              "scale": scale.astype(np.float16), "levels": levels.astype(np.float16)}
    if rot_seed is not None:
        arrays["rot"] = np.array([rot_seed], np.uint32)
    return PackedGrid.from_arrays(arrays, idx.shape)


def grid_nbytes(out: int, in_: int, bits: int, rotate: bool = True) -> int:
    """What pack() stores for a matrix of this shape at this many bits."""
    return 4 * bits * out * n_words(in_) + 2 * out + 2 * (1 << bits) + 4 * rotate


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "", bits: int = 4, seed: int = 0,
             rotate: bool = True, row_scale: bool = True, levels: str = "lloyd",
             error_feedback: bool = True) -> tuple[PackedGrid, MatrixStats]:
    """Rotate, fit scales and levels, round (LDLQ when a Hessian is given and error_feedback), pack."""
    from sagekit.quant import grid

    t0 = time.perf_counter()
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be 1 to {MAX_BITS}, not {bits}")
    if levels not in ("lloyd", "uniform"):
        raise ValueError(f"levels must be lloyd or uniform, not {levels!r}")
    rot = rotation_seed(seed, name) if rotate else None
    wr = np.asarray(w, dtype=np.float64)
    hr = None if h is None else np.asarray(h, dtype=np.float64)
    if rot is not None:
        wr = rotation.rotate(wr, rot)
        if hr is not None:
            r = rotation.matrix(w.shape[1], rot)
            hr = r @ hr @ r.T
    scales, grid_levels = grid.fit(wr, bits, None if hr is None else np.diag(hr).copy(), levels == "lloyd", row_scale)
    if hr is not None and error_feedback:
        idx, scales = grid.ldlq(wr, hr, scales, grid_levels)
    else:
        idx = grid.round_codes(wr, scales, grid_levels)
    packed = pack(idx, scales, grid_levels, rot)
    w_hat = packed.unpack()
    return packed, matrix_stats(name, np.asarray(w, np.float32), w_hat, packed.nbytes, float(bits),
                                16.0 / w.shape[1], t0, groups=1 << bits)


def sensitivity(sizes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """The allocation's weight of each matrix's relative error: 1 each, so the objective counts matrices,
    not weights, and a small matrix's error costs as much as a large one's (small ones are upgraded first)."""
    return dict.fromkeys(sizes, 1.0)

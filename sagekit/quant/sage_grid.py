"""Method `sage-grid`, the `grid` recipe of `sagekit compress` (issue 13): SAGE's minimal-scale idea made to
keep a small model working.

Per matrix: rotate the input side with a seeded Kronecker rotation (sagekit.format.rotation), give every
row one FP16 scale (the paper's "scaling bits", one per output channel), and code each weight as one of
2^bits levels fitted to the matrix (Lloyd-Max, sagekit.quant.grid). With a calibration Hessian the codes
are rounded by LDLQ (error feedback) and the levels are fitted under the Hessian's diagonal weighting.
The bits of each matrix come from the recipe, or from the allocation that `--target-bpw` solves.

The stored layout is sagekit.format.sage_grid.PackedGrid (codes, row scales, levels, the rotation's seed).
Each part is a knob of quantize(), so the ablation can take it away: rotate, row_scale, lloyd levels
(else a uniform grid), error_feedback (LDLQ; needs a Hessian).
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from sagekit.format import rotation
from sagekit.format.architecture import input_of_name
from sagekit.format.sage_grid import MAX_BITS, PackedGrid, grid_nbytes, pack_grid
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant import grid
from sagekit.quant.allocation import allocate
from sagekit.quant.hessian import inverse_hessian_factor
from sagekit.quant.registry import Method, PlanJob

# data-free, 5 bits keep the demo model's ppl within 1.12x of FP16 and 4 bits do not (1.45x; docs/RESULTS.md);
# with --calib, error feedback makes 3-4 bits usable
DEFAULT_BITS = 5


@dataclass(frozen=True)
class GridKnobs:
    """The grid recipe's options; every part but the bits can be switched off for the ablation."""

    bits: int = DEFAULT_BITS
    rotate: bool = True
    row_scale: bool = True
    levels: str = "lloyd"
    error_feedback: bool = True
    act_order: bool = True  # measured: 2 bits, wiki.valid, 4 windows: KL 1.064 -> 0.994 (ppl 41.5 -> 37.2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.levels not in grid.LEVEL_FITS:
            raise ValueError(f"--levels must be {', '.join(grid.LEVEL_FITS)}, not '{self.levels}'")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"--bits must be 1 to {MAX_BITS}, not {self.bits}")

def rotation_seed(seed: int, name: str) -> int:
    """One rotation per (layer, input): linears that read one activation share its rotation (q/k/v, gate/up:
    the architecture's shared inputs), so the run time rotates each input once."""
    prefix = name.rpartition(".")[0]
    return zlib.crc32(f"{seed}:{prefix}:{input_of_name(name)}".encode())


_last_hessian: dict[tuple, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}


def rotated_hessian(h: np.ndarray, rot: int | None, factor: bool,
                     act_order: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(R H R^T, the inverse factor of it in LDLQ's column order, that order or None for the natural one).

    q/k/v and gate/up share H and R, so the last result is kept for them. act_order: columns by descending
    Hessian diagonal, GPTQ's order (the largest-energy inputs are rounded first, while the most columns are
    left to absorb their error)."""
    h = np.asarray(h, dtype=np.float64)
    key = (rot, factor, act_order, h.shape, hashlib.blake2b(h.tobytes(), digest_size=16).digest())
    if key not in _last_hessian:
        hr = h
        if rot is not None:
            r = rotation.matrix(h.shape[0], rot)
            hr = r @ h @ r.T
        perm = np.argsort(-np.diag(hr), kind="stable") if act_order else None
        u = None
        if factor:
            u = inverse_hessian_factor(hr if perm is None else hr[np.ix_(perm, perm)])[0]
        _last_hessian.clear()
        _last_hessian[key] = (hr, u, perm)
    return _last_hessian[key]


def rotated_problem(w: np.ndarray, h: np.ndarray | None, name: str, seed: int, rotate: bool, factor: bool,
                    act_order: bool) -> tuple[int | None, np.ndarray, tuple]:
    """(rotation seed or None, W R^T in float64, rotated_hessian(...) or three Nones without a Hessian):
    the problem every rotated recipe (sage-grid, sage-vq) quantises."""
    rot = rotation_seed(seed, name) if rotate else None
    wr = np.asarray(w, dtype=np.float64)
    if rot is not None:
        wr = rotation.rotate(wr, rot)
    return rot, wr, (None, None, None) if h is None else rotated_hessian(h, rot, factor, act_order)


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "", bits: int = 4, seed: int = 0,
             rotate: bool = True, row_scale: bool = True, levels: str = "lloyd",
             error_feedback: bool = True, act_order: bool = False) -> tuple[PackedGrid, MatrixStats]:
    """Rotate, fit scales and levels, round (LDLQ when a Hessian is given and error_feedback), pack."""
    t0 = time.perf_counter()
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be 1 to {MAX_BITS}, not {bits}")
    if levels not in grid.LEVEL_FITS:
        raise ValueError(f"levels must be {', '.join(grid.LEVEL_FITS)}, not {levels!r}")
    rot, wr, (hr, u, perm) = rotated_problem(w, h, name, seed, rotate, error_feedback, act_order)
    scales, grid_levels = grid.fit(wr, bits, None if hr is None else np.diag(hr).copy(), levels, row_scale)
    if hr is not None and error_feedback:
        order = np.arange(wr.shape[1]) if perm is None else perm
        codes, scales = grid.ldlq(wr[:, order], hr[np.ix_(order, order)], scales, grid_levels, u=u)
        idx = np.empty_like(codes)
        idx[:, order] = codes
    else:
        idx = grid.round_codes(wr, scales, grid_levels)
    packed = pack_grid(idx, scales, grid_levels, rot)
    w_hat = packed.unpack()
    return packed, matrix_stats(name, np.asarray(w, np.float32), w_hat, packed.nbytes, float(bits),
                                16.0 / w.shape[1], t0, groups=1 << bits)


# KL(FP16 || model) per token when only the linears of one class are quantised, at 2 bits with error
# feedback: a measured output-error proxy (demo model, wiki.valid.tokens, 4 windows of 2048; `python
# tools/quality_lab.py --text wiki.valid.tokens --windows 4 --recipe only=N,bits=2,ldlq=1`, docs/RESULTS.md).
# Every class has one matrix per layer, so each matrix's sensitivity is proportional to its class's KL.
CLASS_SENSITIVITY = {"q_proj": 0.0403, "k_proj": 0.0621, "v_proj": 0.2060, "o_proj": 0.0559,
                     "gate_proj": 0.1618, "up_proj": 0.2316, "down_proj": 0.1939}


def sensitivity(sizes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """The allocation's weight of each matrix's relative error: its class's measured KL, so v_proj and the MLP
    get bits before q_proj and o_proj; a class the table does not know gets the mean."""
    mean = sum(CLASS_SENSITIVITY.values()) / len(CLASS_SENSITIVITY)
    return {n: CLASS_SENSITIVITY.get(n.rsplit(".", 1)[-1], mean) for n in sizes}


def plan(job: PlanJob) -> dict[str, Any]:
    """--target-bpw: each matrix's bits from the allocation (sagekit.quant.allocation)."""
    bits = allocate(job.sizes, grid_nbytes, job.target_bpw, sensitivity(job.sizes))
    return {"matrix_knobs": {n: {"bits": b} for n, b in bits.items()}}


METHOD = Method(name="sage-grid", layout="sage-grid", knobs=GridKnobs, calibration="optional", plan=plan)

"""Method `sage-vq`, the `vq` recipe of `sagekit compress --method sage` (issue 13, step 8): the grid recipe
with a small vector codebook in place of the scalar levels.

Per matrix: the seeded input rotation and the FP16 row scale of sage-grid, then each run of D consecutive
rotated, row-normalised weights is coded as one of 256 codewords fitted to the matrix (k-means), so one byte
codes D weights (D = 4: 2 bits per weight). A codebook spends its bits jointly: on Gaussian weights, which
the rotation makes them, 256 codewords of 4 dimensions have about 17% less squared error than the best
2-bit scalar levels. With a calibration Hessian the runs are coded left to right with GPTQ/LDLQ error
feedback (each run's error pushed onto the columns not yet coded) and the row scales refit under H.

The stored layout is sagekit.format.sage_vq.PackedVQ (codes, row scales, codebook, the rotation's seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sagekit.format.sage_vq import DIMS, ENTRIES, PackedVQ, book_ints, book_step, pack_vq, vq_nbytes
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant import grid
from sagekit.quant.allocation import allocate
from sagekit.quant.hessian import compensate, inverse_hessian_factor
from sagekit.quant.registry import Method, PlanJob
from sagekit.quant.sage_grid import rotated_problem, rotation_seed, sensitivity

KMEANS_ITERS = 25  # from a seeded random start; a warm start after a scale refit takes WARM_ITERS
WARM_ITERS = 8
KMEANS_SAMPLE = 1 << 14  # 64 runs per codeword pin the codebook down
ALTERNATIONS = 2
CHUNK = 8192  # runs per distance block: bounds the (runs, 256) distance matrix


@dataclass(frozen=True)
class VQKnobs:
    dim: int = 4  # weights per codeword: 8 / dim bits per weight
    rotate: bool = True
    error_feedback: bool = True
    act_order: bool = True  # runs coded by descending Hessian energy, as sage-grid's columns (measured there)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim not in DIMS:
            raise ValueError(f"--dim must be one of {', '.join(map(str, DIMS))}, not {self.dim}")


def nearest(runs: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """uint8 index of the nearest codeword (squared distance) for each row of runs (n, D)."""
    c2 = 2.0 * codebook.astype(np.float32)
    half_norm = 0.25 * np.sum(c2 * c2, axis=1)  # |c|^2: argmax of 2 r.c - |c|^2 is the nearest codeword
    out = np.empty(len(runs), dtype=np.uint8)
    for st in range(0, len(runs), CHUNK):
        r = runs[st:st + CHUNK].astype(np.float32)
        out[st:st + CHUNK] = np.argmax(r @ c2.T - half_norm, axis=1)
    return out


def kmeans(runs: np.ndarray, weight: np.ndarray, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    """ENTRIES codewords (float64) minimising the weighted squared error over an evenly spaced sample of runs."""
    if len(runs) > KMEANS_SAMPLE:
        pick = np.linspace(0, len(runs) - 1, KMEANS_SAMPLE).astype(np.int64)
        runs, weight = runs[pick], weight[pick]
    if init is None:
        rng = np.random.default_rng(seed)
        book = runs[rng.choice(len(runs), ENTRIES, replace=len(runs) < ENTRIES)].astype(np.float64)
    else:
        book = np.array(init, dtype=np.float64)
    for _ in range(KMEANS_ITERS if init is None else WARM_ITERS):
        code = nearest(runs, book)
        mass = np.bincount(code, weights=weight, minlength=ENTRIES)
        for d in range(runs.shape[1]):
            total = np.bincount(code, weights=weight * runs[:, d], minlength=ENTRIES)
            book[:, d] = np.where(mass > 0, total / np.maximum(mass, 1e-300), book[:, d])
    return book


def fit(w: np.ndarray, dim: int, col_weight: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(FP16-exact row scales (out,), codebook (256, dim) exact on its stored int8 grid) for w (out, in), scales
    and codebook in turn."""
    out, in_ = w.shape
    cw = np.ones(in_) if col_weight is None else col_weight / max(float(np.mean(col_weight)), 1e-300)
    run_weight = np.tile(cw.reshape(-1, dim).mean(axis=1), out)
    rms = np.sqrt(np.mean(w * w, axis=1))
    scales = _half(np.where(rms > 0, rms, 1.0))
    book = None
    for _ in range(ALTERNATIONS):
        runs = (w / scales[:, None]).reshape(-1, dim)
        book = _on_int8_grid(kmeans(runs, run_weight, seed, book))
        values = book[nearest(runs, book)].reshape(out, in_)
        new = _half(grid.row_scales(w, values, cw))
        scales = np.where(new > 0, new, scales)
    return scales, book


def _half(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float64)


def _on_int8_grid(book: np.ndarray) -> np.ndarray:
    """The codebook as it will be stored (int8 times an FP16 step), in float64."""
    step = book_step(book)
    return book_ints(book, step).astype(np.float64) * float(step)


def run_order(diag: np.ndarray, dim: int) -> np.ndarray:
    """Column order for act-order LDLQ that keeps each run of dim columns whole: runs by descending Hessian
    energy. A permutation inside a run would change which weights a code covers, so runs move as blocks."""
    runs = np.argsort(-diag.reshape(-1, dim).sum(axis=1), kind="stable")
    return (runs[:, None] * dim + np.arange(dim)).ravel()


def codes_of(w: np.ndarray, scales: np.ndarray, book: np.ndarray) -> np.ndarray:
    """uint8 (out, in / D): plain nearest-codeword coding (the data-free path)."""
    dim = book.shape[1]
    return nearest((w / scales[:, None]).reshape(-1, dim), book).reshape(w.shape[0], -1)


def ldlq(w: np.ndarray, h: np.ndarray, u: np.ndarray, scales: np.ndarray,
         book: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) by run-wise LDLQ: blocks of runs with lazy updates, each run's error through U_rr^-1;
    then the row scales are re-solved under H and the runs coded again (grid.REFIT_ROUNDS passes in all)."""
    dim, codes = book.shape[1], None
    for round_ in range(grid.REFIT_ROUNDS):
        if round_:
            new = grid.hessian_row_scales(w, h, book[codes].reshape(w.shape))
            scales = np.where(new > 0, new, scales)
        s32, b32 = scales.astype(np.float32)[:, None], book.astype(np.float32)

        def run(wr: np.ndarray, _: int) -> np.ndarray:
            return s32 * b32[nearest(wr / s32, b32)]

        def block(wb: np.ndarray, st: int) -> np.ndarray:
            return compensate(wb, u[st:st + wb.shape[1], st:st + wb.shape[1]], run, dim)

        q = compensate(w.astype(np.float32), u, block, 32 * dim)
        codes = codes_of(q.astype(np.float64), scales, book)
    return codes, scales


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "", dim: int = 4, rotate: bool = True,
             error_feedback: bool = True, act_order: bool = False, seed: int = 0) -> tuple[PackedVQ, MatrixStats]:
    """Rotate, fit scales and codebook, code the runs (LDLQ when a Hessian is given and error_feedback), pack."""
    t0 = time.perf_counter()
    VQKnobs(dim=dim)  # the one check of dim
    if w.shape[1] % dim:
        raise ValueError(f"{w.shape[1]} input columns are not a multiple of --dim {dim}")
    rot, wr, (hr, u, _) = rotated_problem(w, h, name, seed, rotate, error_feedback and not act_order, False)
    scales, book = fit(wr, dim, None if hr is None else np.diag(hr).copy(), rotation_seed(seed, name + ":vq"))
    if hr is not None and error_feedback and act_order:
        order = run_order(np.diag(hr), dim)
        ho = hr[np.ix_(order, order)]
        coded, scales = ldlq(wr[:, order], ho, inverse_hessian_factor(ho)[0], scales, book)
        codes = np.empty_like(coded)
        codes[:, order[::dim] // dim] = coded
    elif hr is not None and error_feedback:
        codes, scales = ldlq(wr, hr, u, scales, book)
    else:
        codes = codes_of(wr, scales, book)
    packed = pack_vq(codes, scales, book, rot)
    return packed, matrix_stats(name, np.asarray(w, np.float32), packed.unpack(), packed.nbytes, 8.0 / dim,
                                16.0 / w.shape[1], t0, groups=ENTRIES)


# relative MSE of this module's codebook on unit Gaussian runs (what the rotation makes the weights), by run
# length D, cheapest first: kmeans() on 2^16 seeded N(0, 1) runs, scored on 2^16 others. D = 4 is 14% under
# 2-bit Lloyd-Max scalar levels (0.1175), D = 3 (2.67 bits) sits between 2 and 3 bits, D = 2 matches 4 bits.
DIM_LADDER = [(8, 0.3318), (6, 0.2243), (4, 0.1005), (3, 0.0446), (2, 0.00936)]


def plan(job: PlanJob) -> dict[str, Any]:
    """--target-bpw: each matrix's run length D from the allocation (sagekit.quant.allocation), with the grid
    recipe's measured sensitivities; a D that does not divide a matrix's width is left out of its ladder."""
    widths = {i for _, i in job.sizes.values()}
    ladder = [(d, e) for d, e in DIM_LADDER if all(i % d == 0 for i in widths)]
    dims = allocate(job.sizes, lambda o, i, d: vq_nbytes(o, i, d, job.knobs.rotate), job.target_bpw,
                    sensitivity(job.sizes), ladder)
    return {"matrix_knobs": {n: {"dim": d} for n, d in dims.items()}}


METHOD = Method(name="sage-vq", layout="sage-vq", knobs=VQKnobs, calibration="optional", plan=plan)

"""Method `sage-paper`, the `paper` recipe of `sagekit compress --method sage`: SAGE-PTQ as the paper has it.

One weight matrix: saliency -> graph grouping -> adaptive threshold -> dual mode -> pack (layout `sage`).

Group count: the paper lets the silhouette score pick G (`group_select="silhouette"`). Because an honest
store pays ceil(log2 G) bits per weight for the group id, sagekit also offers `group_select="rate"`: G
is chosen with p by the same rate-distortion objective, among 1, 2, 4, 8 (a G that is not a power of two
pays for ids it cannot use). `--target-bpw` needs it: p <= p_max alone cannot spend more than ~1 bit.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sagekit.format.sage import PackedSage, pack_sage, sage_nbytes
from sagekit.format.stats import MatrixStats
from sagekit.quant.registry import Method, PlanJob
from sagekit.quant.dualmode import dual_error, prepare_dual, quantize_dual
from sagekit.quant.graph import Grouping, group_magnitudes
from sagekit.quant.saliency import saliency_order, salient_mask
from sagekit.quant.threshold import search_fraction

CURVE_POINTS = 9  # salient fractions sampled per (matrix, G) to solve for the lambda of a bit target
CurvePoint = tuple[int, float, float]  # (G, relative error, true bits)


@dataclass(frozen=True)
class SageKnobs:
    salient_bits: int = 4
    max_salient: float = 0.05
    rate_penalty: float = 0.2  # slope of error per bit near p = 1%: lands on the paper's ~1.03 weight bits
    group_select: str = "silhouette"
    n_sub: int = 2048
    knn: int = 10
    max_groups: int = 8
    seed: int = 0
    saliency: str = "magnitude"  # or "hessian": weighted by the calibration inputs' RMS (needs --calib)

    def __post_init__(self) -> None:
        if self.group_select not in ("silhouette", "rate"):
            raise ValueError(f"--group-select must be silhouette or rate, not '{self.group_select}'")
        if self.saliency not in ("magnitude", "hessian"):
            raise ValueError(f"--saliency must be magnitude or hessian, not '{self.saliency}'")

    @property
    def calibration(self) -> str:
        """The paper recipe is data-free; Hessian saliency needs the calibration inputs."""
        return "required" if self.saliency == "hessian" else "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def matrix_seed(seed: int, name: str) -> int:
    """Each matrix draws its randomness from seed + crc32(name): the same bytes in any worker order."""
    return (seed + zlib.crc32(name.encode())) % (2 ** 32)


def true_bits(shape: tuple[int, int], groups: int, p: float) -> float:
    """Honest bits per weight of the stored arrays for a salient fraction p (what pack_sage will write)."""
    out, in_ = shape
    nnz = int(round(p * out * in_))
    return 8.0 * sage_nbytes(out, in_, groups, nnz) / (out * in_)


def candidate_groups(grouping: Grouping, rule: str) -> list[int]:
    if rule == "silhouette":
        return [grouping.chosen]
    return [g for g in (1, 2, 4, 8) if g in grouping.boundaries]


class MatrixQuantizer:
    """The per-matrix state shared by the lambda solve and the final quantisation: sort, groups, prep."""

    def __init__(self, w: np.ndarray, knobs: SageKnobs, seed: int, hessian: np.ndarray | None = None):
        self.w, self.knobs, self.shape = np.ascontiguousarray(w, dtype=np.float32), knobs, w.shape
        rms = None if hessian is None else np.sqrt(np.maximum(np.diag(hessian).astype(np.float64), 0.0))
        self.order = saliency_order(self.w, rms)
        unsalient = ~salient_mask(self.order, self.shape, knobs.max_salient)
        self.grouping = group_magnitudes(np.abs(self.w[unsalient]), knobs.n_sub, knobs.knn, knobs.max_groups,
                                         seed=seed)
        self.prep = prepare_dual(self.w, self.order)
        self.groups = candidate_groups(self.grouping, knobs.group_select)

    def error(self, p: float, groups: int) -> float:
        return dual_error(self.prep, p, self.grouping.boundaries[groups], self.knobs.salient_bits)

    def curve(self) -> list[CurvePoint]:
        """(G, error, true bits) at a grid of (G, p): enough to solve for the model-wide lambda of a target."""
        ps = np.linspace(0.0, self.knobs.max_salient, CURVE_POINTS)
        return [(g, self.error(p, g), true_bits(self.shape, g, p)) for g in self.groups for p in ps]

    def choose(self, lam: float, groups: int | None = None) -> tuple[int, float]:
        """(G, p) minimising relative_error + lam * true_bits, p by bounded Brent per candidate G.

        `groups` pins G (the one the lambda solve picked on the curve): Brent then only refines p, so the
        final choice cannot jump to a G whose bits the solve never counted.
        """
        best = None
        for g in (self.groups if groups is None else [groups]):
            p, val = search_fraction(lambda p: self.error(p, g) + lam * true_bits(self.shape, g, p),
                                     self.knobs.max_salient)
            if best is None or val < best[2]:
                best = (g, p, val)
        return best[0], best[1]

    def quantize(self, lam: float, name: str, t0: float,
                 groups: int | None = None) -> tuple[PackedSage, MatrixStats]:
        g, p = self.choose(lam, groups)
        mask = salient_mask(self.order, self.shape, p)
        d = quantize_dual(self.w, mask, self.grouping.boundaries[g], self.knobs.salient_bits)
        packed = pack_sage(d.sign, d.gid, d.alpha, d.sal_ptr, d.sal_idx, d.sal_val, d.sal_scale)
        out, in_ = self.shape
        n, nnz = out * in_, int(d.sal_idx.size)
        scales = g + int(np.count_nonzero(d.sal_scale))
        stats = MatrixStats(
            name=name, shape=(out, in_), salient_fraction=nnz / n, groups=g, silhouette_groups=self.grouping.chosen,
            paper_bits=1.0 + nnz / n * (self.knobs.salient_bits - 1), paper_scale_bits=16.0 * scales / n,
            true_bits=8.0 * packed.nbytes / n, rel_error=d.rel_error, seconds=time.perf_counter() - t0,
            nbytes=packed.nbytes)
        return packed, stats


def curve_choice(curve: list[CurvePoint], lam: float) -> CurvePoint:
    """The sampled (G, error, bits) point minimising error + lam * bits."""
    return min(curve, key=lambda c: c[1] + lam * c[2])


def lambda_for_target(curves: list[tuple[int, list[CurvePoint]]], target_bpw: float) -> float:
    """The one lambda whose per-matrix choices on the sampled curves land the weighted mean bits on target.

    curves: (weights in the matrix, its curve) per matrix. Bits fall as lambda grows, so bisect on log
    lambda.
    """
    def bpw(lam: float) -> float:
        total = sum(n * curve_choice(c, lam)[2] for n, c in curves)
        return total / sum(n for n, _ in curves)

    lo, hi = 1e-7, 10.0
    if bpw(lo) < target_bpw:
        return lo
    if bpw(hi) > target_bpw:
        return hi
    for _ in range(60):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if bpw(mid) > target_bpw else (lo, mid)
    return float(np.sqrt(lo * hi))


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "", groups: int | None = None,
             lam: float | None = None, **knobs: Any) -> tuple[PackedSage, MatrixStats]:
    """One matrix at the knobs' rate penalty (or `lam`, the solved one of a bit target), G pinned by `groups`."""
    t0 = time.perf_counter()
    k = SageKnobs(**knobs)
    q = MatrixQuantizer(w, k, matrix_seed(k.seed, name), h)
    return q.quantize(k.rate_penalty if lam is None else lam, name, t0, groups)


def _curve(w: np.ndarray, name: str, knobs: SageKnobs) -> tuple[int, list[CurvePoint]]:
    return w.size, MatrixQuantizer(w, knobs, matrix_seed(knobs.seed, name)).curve()


def plan(job: PlanJob) -> dict[str, Any]:
    """--target-bpw: one lambda for the whole model from every matrix's sampled rate curve, and each
    matrix's G on it; the rate term then picks G too (group_select "rate")."""
    if job.knobs.saliency == "hessian":
        raise ValueError("--target-bpw needs every matrix's rate curve before the calibration pass, which "
                         "--saliency hessian cannot give: use --rate-penalty with it")
    knobs = dataclasses.replace(job.knobs, group_select="rate")
    if job.on_start:
        job.on_start("rate curves", len(job.sizes))
    curves = []
    for c in job.map_weights(_curve, [(n, knobs) for n in job.sizes]):
        curves.append(c)
        if job.on_step:
            job.on_step(None)
    lam = lambda_for_target(curves, job.target_bpw)
    return {"knobs": {"group_select": "rate"}, "rate_penalty_used": lam,
            "matrix_knobs": {n: {"lam": lam, "groups": curve_choice(c, lam)[0]} for n, (_, c) in zip(job.sizes, curves)}}


METHOD = Method(name="sage-paper", layout="sage", knobs=SageKnobs, plan=plan)

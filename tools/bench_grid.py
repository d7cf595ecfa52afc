"""GEMV speed of the grid and vq layouts on the CPU: symmetric grid levels on the packed LUT kernel, free
levels on the level kernel, vq codes on the codebook kernel, each against the FP16 runtime (the same weights
decoded to FP16) and NumPy float32 `x @ W.T`, same shapes, same run, alternating rounds.

    python tools/bench_grid.py --shapes 576x576,1536x576,576x1536,4096x11008,11008x4096 --bits 2,3 \
        --free-bits 2,3,4,5 --vq-dims 4,3

Weights are random codes (speed does not depend on their values); both grid runtimes
include the rotation of x. Each figure is the median over rounds of a median of --repeats calls. GB/s is the
bytes each runtime holds for the weight over the time, next to a STREAM-like copy measured in the run.
"""

from __future__ import annotations

import argparse
import json
import time

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before NumPy loads it)
import numpy as np

from sagekit.backend import get_backend
from sagekit.format import rotation
from sagekit.format.sage_grid import pack_grid
from sagekit.format.sage_vq import pack_vq
from sagekit.kernels import cpu
from sagekit.model.linear import GridLinear, HalfLinear


def timed(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def copy_bandwidth() -> float:
    a = np.ones(64 * 2 ** 20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    return 2 * a.nbytes / timed(lambda: np.copyto(b, a), 5) / 1e9


def case(out: int, in_: int, bits: int, rounds: int, repeats: int, symmetric: bool = True) -> dict:
    """A grid of random codes: levels mirrored about 0 (the LUT kernel's) or free ones (the level kernel's)."""
    rng = np.random.default_rng(out + bits)
    half = 1 << (bits - 1)
    mags = np.sort(rng.uniform(0.2, 2.0, half)).astype(np.float16).astype(np.float64)
    levels = np.concatenate([-mags[::-1], mags]) if symmetric else np.sort(rng.uniform(-2.0, 2.0, 2 * half))
    packed = pack_grid(rng.integers(0, 1 << bits, (out, in_), dtype=np.uint8), rng.uniform(0.5, 1.5, out), levels,
                       12345)
    kernel = "lut" if symmetric else "level"
    return {"shape": [out, in_], "bits": bits, **compare(packed, kernel, rounds, repeats)}


def vq_case(out: int, in_: int, dim: int, rounds: int, repeats: int) -> dict:
    rng = np.random.default_rng(out + dim)
    packed = pack_vq(rng.integers(0, 256, (out, in_ // dim)), rng.uniform(0.5, 1.5, out),
                     rng.standard_normal((256, dim)), 12345)
    return {"shape": [out, in_], "vq_dim": dim, **compare(packed, "book", rounds, repeats)}


def compare(packed, kernel: str, rounds: int, repeats: int) -> dict:
    """ms, x-fold and GB/s of GridLinear (whose kernel is `kernel`), the FP16 runtime and dense float32."""
    out, in_ = packed.shape
    fast = GridLinear(packed, get_backend("cpu"))
    assert fast.kernel == kernel, f"GridLinear did not take the {kernel} kernel"
    fp16 = HalfLinear(packed.rotated().astype(np.float16))
    rot = lambda v: rotation.rotate(v, 12345)
    dense = np.ascontiguousarray(packed.unpack().astype(np.float32))
    x = np.random.default_rng(out).standard_normal((1, in_)).astype(np.float32)
    runs = {kernel: [], "fp16": [], "dense": []}
    for _ in range(rounds):
        runs[kernel].append(timed(lambda: fast(x), repeats))
        runs["fp16"].append(timed(lambda: fp16(rot(x)), repeats))
        runs["dense"].append(timed(lambda: x @ dense.T, repeats))
    ms = {k: 1e3 * float(np.median(v)) for k, v in runs.items()}
    held = {kernel: fast.nbytes, "fp16": fp16.nbytes, "dense": dense.nbytes}
    return {**{f"{k}_ms": v for k, v in ms.items()}, f"{kernel}_vs_dense": ms["dense"] / ms[kernel],
            f"{kernel}_vs_fp16": ms["fp16"] / ms[kernel], **{f"{k}_gbps": held[k] / (ms[k] / 1e3) / 1e9 for k in ms}}


def show(r: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x11008,11008x4096")
    ap.add_argument("--bits", default="2,3", help="symmetric grids on the LUT kernel ('' for none)")
    ap.add_argument("--free-bits", default="2,3,4,5", help="free-level grids on the level kernel ('' for none)")
    ap.add_argument("--vq-dims", default="4,3", help="vq run lengths on the codebook kernel ('' for none)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--min-run", type=int, default=None,
                    help="give the codebook kernel runs this short (GridLinear's MIN_RUN; to time vq D = 2 on it)")
    args = ap.parse_args()
    if args.min_run is not None:
        cpu.MIN_RUN = args.min_run
    print(json.dumps({"copy_gbps": round(copy_bandwidth(), 2)}), flush=True)
    for shape in args.shapes.split(","):
        out, in_ = map(int, shape.split("x"))
        for bits in [int(b) for b in args.bits.split(",") if b]:
            show(case(out, in_, bits, args.rounds, args.repeats))
        for bits in [int(b) for b in args.free_bits.split(",") if b]:
            show(case(out, in_, bits, args.rounds, args.repeats, symmetric=False))
        for dim in [int(d) for d in args.vq_dims.split(",") if d]:
            show(vq_case(out, in_ - in_ % dim, dim, args.rounds, args.repeats))
    print(json.dumps({"copy_gbps": round(copy_bandwidth(), 2)}), flush=True)


if __name__ == "__main__":
    main()

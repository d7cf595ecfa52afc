"""Time the packed CPU matmul against NumPy float32 dense on the same shapes, in the same run.

    python tools/bench_kernels.py --shapes 4096x11008,11008x4096 --groups 1,2,4 --tokens 1,128 --json out.json

Shapes are out x in. Weights are random packed matrices (sagekit.format.sage.random_packed): speed does not
depend on the values. Every figure is the median of --repeats timed calls, packed and dense calls in
alternating blocks; the minimum is printed too because other work on a small machine inflates medians. Speedup is dense median / packed median. For a per-core comparison set NUMBA_NUM_THREADS=1 and
OPENBLAS_NUM_THREADS=1 (or OMP_NUM_THREADS=1, depending on NumPy's BLAS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before Numba or NumPy loads it)
import numba
import numpy as np

from sagekit.format.sage import random_packed, unpack_sage
from sagekit.kernels import cpu


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas_vars = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    blas_threads = next((os.environ[v] for v in blas_vars if v in os.environ), "default")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "blas_threads": blas_threads,
        "numba_threading_layer": numba.config.THREADING_LAYER,
        "avx512_kernel": cpu.AVX512,
    }


def timed(fns: list, repeats: int, rounds: int = 5) -> list[tuple[float, float]]:
    """(median, min) seconds of each fn. Calls run in back-to-back blocks, as a model would make them (so
    thread pools stay awake), and the blocks of the fns alternate over several rounds so that background
    load on a shared machine hits them alike."""
    ts = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, ts):
            fn()  # warm-up: compile, caches, worker threads
            for _ in range(max(1, repeats // rounds)):
                start = time.perf_counter()
                fn()
                t.append(time.perf_counter() - start)
    return [(float(np.median(t)), float(np.min(t))) for t in ts]


def bench(out: int, in_: int, groups: int, tokens: int, salient: float, repeats: int) -> dict:
    p = random_packed(out, in_, groups, salient, seed=0)
    k = cpu.prepare(p)
    dense = unpack_sage(p)
    x = np.random.default_rng(1).standard_normal((tokens, in_)).astype(np.float32)
    xv = x[0].copy()
    dense_fn = (lambda: dense @ xv) if tokens == 1 else (lambda: x @ dense.T)  # GEMV for a vector, else GEMM
    (t_packed, t_packed_min), (t_dense, t_dense_min) = timed([lambda: cpu.sage_matmul(x, k), dense_fn], repeats)
    return {
        "shape": f"{out}x{in_}", "G": groups, "T": tokens, "salient": salient,
        "packed_ms": 1e3 * t_packed, "packed_min_ms": 1e3 * t_packed_min,
        "dense_ms": 1e3 * t_dense, "dense_min_ms": 1e3 * t_dense_min,
        "speedup": t_dense / t_packed,
        "packed_GBps": p.nbytes / t_packed / 1e9, "packed_bytes": p.nbytes,
        "bits_per_weight": 8 * p.nbytes / (out * in_),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x11008,11008x4096", help="comma-separated OUTxIN")
    ap.add_argument("--groups", default="1,2,4,8")
    ap.add_argument("--tokens", default="1", help="comma-separated T; 1 = GEMV, e.g. 1,128,2048")
    ap.add_argument("--salient", type=float, default=0.02, help="salient fraction of each row")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", help="write the rows and the machine here")
    args = ap.parse_args()
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, numba threads {info['numba_threads']}, "
          f"BLAS threads {info['blas_threads']}, Numba threading layer {info['numba_threading_layer']}, "
          f"avx512 kernel {info['avx512_kernel']}")
    print(f"{'shape':>11} {'G':>2} {'T':>5} {'bpw':>5} {'ms':>8} {'min':>8} {'dense_ms':>9} {'min':>8} "
          f"{'speedup':>7} {'GB/s':>6}")
    rows = []
    for shape in args.shapes.split(","):
        out, in_ = (int(d) for d in shape.lower().split("x"))
        for g in (int(v) for v in args.groups.split(",")):
            for t in (int(v) for v in args.tokens.split(",")):
                r = bench(out, in_, g, t, args.salient, args.repeats if t < 512 else max(3, args.repeats // 10))
                rows.append(r)
                print(f"{r['shape']:>11} {g:>2} {t:>5} {r['bits_per_weight']:5.2f} {r['packed_ms']:8.3f} "
                      f"{r['packed_min_ms']:8.3f} {r['dense_ms']:9.3f} {r['dense_min_ms']:8.3f} {r['speedup']:7.2f} "
                      f"{r['packed_GBps']:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

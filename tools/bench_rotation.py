"""Run-time cost of the grid recipe's input rotation (issue 13): R x by its Kronecker factors, against the
dense float32 matmuls that read the same rotated input, on the demo model's shapes, in the same run.

    python tools/bench_rotation.py [--tokens 1 512] [--repeats 200]

Each figure is the median of `repeats` calls; rotation and matmul calls alternate so drift hits both alike.
"""

from __future__ import annotations

import argparse
import time

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before NumPy loads it)
import numpy as np

from sagekit.format import rotation

# input width -> output rows of the linears that read that input (demo model: q|k|v, o, gate|up, down)
SHAPES = {"q|k|v (576 -> 960)": (576, 960), "o (576 -> 576)": (576, 576), "gate|up (576 -> 3072)": (576, 3072),
          "down (1536 -> 576)": (1536, 576)}


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| input | tokens | R x (us) | x @ W.T (us) | rotation / matmul |")
    print("|---|---:|---:|---:|---:|")
    for label, (n, rows) in SHAPES.items():
        w = rng.standard_normal((rows, n)).astype(np.float32)
        rotation.factors(n, 1)
        for t in args.tokens:
            x = rng.standard_normal((t, n)).astype(np.float32)
            rot, mm = [], []
            for _ in range(3):
                rot.append(median_us(lambda: rotation.rotate(x, 1), args.repeats // 3))
                mm.append(median_us(lambda: x @ w.T, args.repeats // 3))
            r, m = float(np.median(rot)), float(np.median(mm))
            print(f"| {label} | {t} | {r:.1f} | {m:.1f} | {r / m:.2f} |")


if __name__ == "__main__":
    main()

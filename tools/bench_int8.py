"""The int8 prefill GEMM (sagekit/kernels/int8_gemm.py) against OpenBLAS float32 on the same shapes, in one run.

Each shape times, alternating over rounds (medians): OpenBLAS's `x @ W.T` in float32; the int8 GEMM alone
(`gemm`); rounding the tokens (`RoundedTokens`) and laying the byte rows out for it (`interleave`), which
the prefill pays on every call, besides decoding the rows from the codes (the layout's part, not timed here).

    python tools/bench_int8.py --tokens 512 --rounds 5 --json int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before NumPy loads it)
import numpy as np

from sagekit.kernels import int8_gemm

SHAPES = {  # (in, out): the demo model's linears, then LLaMA-2-7B's MLP
    "demo q/o": (576, 576), "demo k/v": (576, 192), "demo gate/up": (576, 1536), "demo down": (1536, 576),
    "7B up": (4096, 11008), "7B down": (11008, 4096),
}


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(tokens: int, width: int, out: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    q = rng.integers(-127, 128, (out, width))
    w = (q * rng.uniform(0.5, 2.0, (out, 1))).astype(np.float32)
    rounded = int8_gemm.RoundedTokens(x)
    rows, sw = rounded.row_buffers(out)
    rows[:] = 128
    rows[:out, :width] = q + 128
    sw[:] = 1.0
    wq = np.empty(rows.shape[0] * rounded.k4, np.int32)
    int8_gemm.interleave(rows, wq, int8_gemm.PANEL_ROWS)
    y = np.empty((tokens, rows.shape[0]), np.float32)
    wb = wq.view(np.uint8)
    return {
        "blas_s": _best(lambda: x @ w.T, repeats),
        "gemm_s": _best(lambda: int8_gemm.gemm(y, 0, tokens, rounded.xq, rounded.k4, rounded.sx, rounded.corr,
                                               wb, sw), repeats),
        "tokens_s": _best(lambda: int8_gemm.RoundedTokens(x), repeats),
        "interleave_s": _best(lambda: int8_gemm.interleave(rows, wq, int8_gemm.PANEL_ROWS), repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10, help="timings per shape and round (best kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not int8_gemm.VNNI:
        raise SystemExit("this CPU (or SAGEKIT_NO_AVX512) gives no AVX-512 VNNI: the int8 GEMM does not run here")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SHAPES}
    for _ in range(args.rounds):
        for name, (width, out) in SHAPES.items():
            runs[name].append(measure(args.tokens, width, out, args.repeats))
    rows = []
    load = os.getloadavg()[0]
    print(f"{args.tokens} tokens, {os.cpu_count()} CPUs, load {load:.2f}; medians of {args.rounds} rounds")
    for name, (width, out) in SHAPES.items():
        med = {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]}
        ops = 2.0 * args.tokens * width * out
        total = med["gemm_s"] + med["tokens_s"] + med["interleave_s"]
        row = {"shape": name, "in": width, "out": out, **med, "blas_gops": ops / med["blas_s"] / 1e9,
               "gemm_gops": ops / med["gemm_s"] / 1e9, "speedup_gemm": med["blas_s"] / med["gemm_s"],
               "speedup_with_both": med["blas_s"] / total}
        rows.append(row)
        print(f"{name:13} {width:5}x{out:<5}  BLAS f32 {med['blas_s'] * 1e3:7.2f} ms {row['blas_gops']:4.0f} GFLOP/s"
              f" | int8 GEMM {med['gemm_s'] * 1e3:6.2f} ms {row['gemm_gops']:4.0f} GOP/s"
              f" + tokens {med['tokens_s'] * 1e3:5.2f} + interleave {med['interleave_s'] * 1e3:5.2f} ms"
              f" | {row['speedup_gemm']:.2f}x, {row['speedup_with_both']:.2f}x with both")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "rounds": args.rounds, "load": os.getloadavg(), "shapes": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()

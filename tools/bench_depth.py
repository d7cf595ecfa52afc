"""Decode speed against context depth, several models interleaved in one process.

    python tools/bench_depth.py out/sage-default ~/.cache/sagekit/smollm2-135m-instruct --depths 0,512

Each round times `--steps` one-token steps of every model at every depth in turn, after a prompt of
max(depths) tokens filled the cache once; medians over `--rounds`. Interleaving at this grain keeps a noisy
machine from favouring one model, which `sagekit bench` (one model's whole round at a time) cannot promise.
"""

from __future__ import annotations

import argparse
import time

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before NumPy loads it)
import numpy as np

from sagekit.backend import get_backend
from sagekit.kernels import cpu
from sagekit.model.llama import Llama
from sagekit.model.load import load_model


def step_ms(model: Llama, start: int, steps: int) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        model.forward(np.array([5 + i]), start + i, last_only=True)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model folders (compressed or not)")
    p.add_argument("--depths", default="0,512", help="comma-separated cache depths")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-runs", default=None,
                   help="comma-separated values of GridLinear's MIN_RUN: each model is loaded once per value")
    p.add_argument("--level-kernel", default="on",
                   help="on, off or on,off: free-level grids of 2-5 bits on the level kernel, or as before it "
                        "(codebook or FP16); with on,off each model is loaded both ways")
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    backend = get_backend(args.device)
    runs = [None] if args.min_runs is None else [int(r) for r in args.min_runs.split(",")]
    level_bits = cpu.LEVEL_BITS
    models = {}
    for path in args.models:
        for run in runs:
            for level in args.level_kernel.split(","):
                if run is not None:
                    cpu.MIN_RUN = run
                cpu.LEVEL_BITS = level_bits if level == "on" else ()
                m = load_model(path, backend, max(depths) + args.steps)
                m.forward(np.arange(100, 100 + max(max(depths), 8)) % m.config.vocab_size, 0, last_only=True)
                label = path + ("" if run is None else f" (min run {run})")
                models[label + ("" if args.level_kernel == "on" else f" (level kernel {level})")] = m
    times: dict[tuple[str, int], list[float]] = {(m, d): [] for m in models for d in depths}
    for _ in range(args.rounds):
        for path, m in models.items():
            for d in depths:
                times[(path, d)].append(step_ms(m, d, args.steps))
    print(f"{backend.describe()}, {args.steps} steps x {args.rounds} rounds, medians (min)")
    for (path, d), v in times.items():
        print(f"  {path}  depth {d:5d}: {np.median(v):6.2f} ms/token ({min(v):.2f}), {1e3 / np.median(v):6.1f} tok/s, "
              f"weights {models[path].weight_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

"""GPU figures for issue 14, each against a baseline measured in the same run: the packed kernels' GEMV and
prefill on LLaMA-2-7B shapes against cuBLAS FP16 and the device's measured copy bandwidth, and a compressed
model's decode (eager and CUDA-graphed) and prefill against its dense FP16 twin.

    python tools/bench_gpu.py --folder out/vq203 --json gpu.json

Kernel times are cupyx.profiler.benchmark's CUDA-event medians; model figures are sagekit.eval.speed's
(wall clock, every decode step read back to the host as sampling would), medians of alternating rounds.
Random weights: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import cupy as cp
import numpy as np
from cupyx.profiler import benchmark

from sagekit.backend import get_backend
from sagekit.eval import speed
from sagekit.format.sage import random_packed
from sagekit.format.sage_grid import pack_grid
from sagekit.format.sage_vq import pack_vq
from sagekit.kernels import codebook_cuda, cuda, dense_cuda
from sagekit.model.generate import generate


def gpu_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median device milliseconds of fn (CUDA events), after cupyx's warm-up."""
    return float(np.median(benchmark(fn, n_repeat=repeats, n_warmup=10).gpu_times)) * 1e3


def copy_gbs(repeats: int) -> float:
    """A STREAM-like copy of 1 GiB, bytes read plus written per second."""
    a = cp.ones(2 ** 28, dtype=cp.float32)
    b = cp.empty_like(a)
    return 2 * a.nbytes / gpu_ms(lambda: cp.copyto(b, a), repeats) / 1e6


def layouts(out: int, in_: int) -> dict[str, tuple[Any, Callable[[Any, Any], Any]]]:
    """Each packed layout the GPU runs, on the device, with its matmul."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 2.0, out)
    found = {"vq D=4 (2 bits)": pack_vq(rng.integers(0, 256, (out, in_ // 4)), scale,
                                        rng.standard_normal((256, 4)) * 0.1, None)}
    for bits in (2, 3, 4):
        levels = np.sort(rng.standard_normal(2 ** bits))
        found[f"grid {bits} bits"] = pack_grid(rng.integers(0, 2 ** bits, (out, in_)).astype(np.uint8), scale, levels,
                                              None)
    on_device = {k: (codebook_cuda.to_device(p), codebook_cuda.codebook_matmul_gpu) for k, p in found.items()}
    for groups in (1, 2, 4):
        on_device[f"sage G={groups} (paper)"] = (cuda.to_device(random_packed(out, in_, groups, 0.01)),
                                                 cuda.sage_matmul_gpu)
    return on_device


def kernel_rows(shapes: list[tuple[int, int]], tokens: int, repeats: int, bandwidth: float) -> list[dict]:
    rows = []
    for out, in_ in shapes:
        w = cp.asarray(np.random.default_rng(1).standard_normal((out, in_)) * 0.02, dtype=cp.float16)
        x = cp.asarray(np.random.default_rng(2).standard_normal((tokens, in_)), dtype=cp.float16)
        dense = gpu_ms(lambda: x @ w.T, repeats)
        rows.append({"shape": f"{out}x{in_}", "tokens": tokens, "layout": "cuBLAS FP16", "ms": dense,
                     "bytes": int(w.nbytes), "gbs": w.nbytes / dense / 1e6, "speedup": 1.0})
        found = layouts(out, in_)
        if tokens == 1:
            found["sagekit FP16 GEMV"] = (w, lambda x, w: dense_cuda.gemv(w, x[0]))
        for name, (dev, matmul) in found.items():
            ms = gpu_ms(lambda: matmul(x, dev), repeats)
            rows.append({"shape": f"{out}x{in_}", "tokens": tokens, "layout": name, "ms": ms,
                         "bytes": int(dev.nbytes), "gbs": dev.nbytes / ms / 1e6, "speedup": dense / ms})
    for r in rows:
        r["of_copy_bandwidth"] = r["gbs"] / bandwidth
    return rows


def model_rows(folder: Path, decode: int, depth: int, rounds: int) -> dict[str, Any]:
    """Decode at depth 0 and `depth`, and prefill of `depth` tokens: packed and dense twin, eager and graphed."""
    pair = speed.load_pair(folder, get_backend("cuda"), depth + decode + 8)
    graphs = {"packed": pair.packed.decode_plan, "dense": pair.dense.decode_plan}
    runs: dict[str, list] = {}
    for _ in range(rounds):
        for name, model in (("packed", pair.packed), ("dense", pair.dense)):
            for mode in ("eager", "graph"):
                model.decode_plan = graphs[name] if mode == "graph" else None
                figures = speed.model_speed(model, decode, depth)
                runs.setdefault(f"{name} {mode}", []).append(figures)
    prompt = list(range(1, 9))
    same = []
    for plan in (graphs["packed"], None):
        pair.packed.decode_plan = plan
        same.append(generate(pair.packed, prompt, 32).tokens)
    medians = {k: dict(zip(("decode_tok_s", "prefill_tok_s", "decode_depth_tok_s"), np.median(v, axis=0).tolist()))
               for k, v in runs.items()}
    return {"folder": str(folder), "depth": depth, "decode_tokens": decode, "rounds": rounds, "median": medians,
            "runs": runs, "graph_tokens_equal_eager": same[0] == same[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, help="a compressed folder: decode and prefill against its dense twin")
    ap.add_argument("--shapes", default="4096x11008,11008x4096", help="out x in, comma-separated")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    props = cp.cuda.runtime.getDeviceProperties(0)
    report: dict[str, Any] = {"device": props["name"].decode(), "cupy": cp.__version__,
                              "copy_gbs": copy_gbs(args.repeats)}
    print(f"{report['device']}, CuPy {report['cupy']}: copy {report['copy_gbs']:.0f} GB/s", flush=True)
    report["kernels"] = []
    for tokens in (1, 512):
        for r in kernel_rows(shapes, tokens, args.repeats, report["copy_gbs"]):
            report["kernels"].append(r)
            print(f"{r['shape']:>11} T={tokens:<4} {r['layout']:<20} {r['ms'] * 1e3:9.1f} us {r['gbs']:7.0f} GB/s "
                  f"{r['of_copy_bandwidth']:5.0%}  {r['speedup']:5.2f}x cuBLAS FP16", flush=True)
    if args.folder:
        report["model"] = model_rows(args.folder, args.decode, args.depth, args.rounds)
        for k, v in report["model"]["median"].items():
            print(f"{k:<14} decode {v['decode_tok_s']:7.1f} tok/s, at depth {args.depth} "
                  f"{v['decode_depth_tok_s']:7.1f}, prefill {v['prefill_tok_s']:8.0f} tok/s", flush=True)
        print("graph tokens equal eager:", report["model"]["graph_tokens_equal_eager"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

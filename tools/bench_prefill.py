"""Prefill throughput of the Llama forward pass next to plain matmuls of the same shapes, in one run.

The baseline times exactly the matrix products a prefill of T tokens performs (every linear layer, lm_head,
and the attention score / value products of the blocked causal attention) as bare `a @ b` calls on random
arrays of the model's dtype. The ratio of the two FLOP rates shows what the rest of the forward pass
(norms, RoPE, softmax, casts, Python) costs.

    python tools/bench_prefill.py [MODEL] --seqlen 2048 --device cpu --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before NumPy loads it)
import numpy as np

from sagekit.backend import get_backend
from sagekit.io.demo import resolve_model
from sagekit.model import llama as llama_mod
from sagekit.model.load import load_model


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def matmul_shapes(model: llama_mod.Llama, t: int) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of every product a prefill of t tokens does, attention blocks included."""
    c = model.config
    shapes = [(1, t, lin.in_features, lin.out_features) for lin in model.linears().values()]
    rep, chunk = c.n_heads // c.n_kv_heads, llama_mod.ATTN_CHUNK
    for _ in range(c.n_layers):
        for t0 in range(0, t, chunk):
            tb = min(t, t0 + chunk) - t0
            s = t0 + tb
            shapes.append((c.n_kv_heads, rep * tb, c.head_dim, s))  # scores
            shapes.append((c.n_kv_heads, rep * tb, s, c.head_dim))  # probs @ values
    return shapes


def time_matmuls(xp, shapes, dtype, repeats: int, sync) -> float:
    rng = np.random.default_rng(0)
    arrays = {}
    for b, m, k, n in set(shapes):
        arrays[(b, m, k, n)] = (xp.asarray(rng.standard_normal((b, m, k)).astype(np.float32), dtype=dtype),
                                xp.asarray(rng.standard_normal((b, k, n)).astype(np.float32), dtype=dtype))
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for s in shapes:
            a, w = arrays[s]
            a @ w
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: the demo model)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()

    be = get_backend(args.device)
    path = resolve_model(args.model)
    model = load_model(path, be, args.seqlen)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, args.seqlen)
    model.forward(tokens[:128], 0)
    best = float("inf")
    for _ in range(args.repeats):
        be.synchronize()
        t0 = time.perf_counter()
        model.forward(tokens, 0)
        be.synchronize()
        best = min(best, time.perf_counter() - t0)
    shapes = matmul_shapes(model, args.seqlen)
    flops = sum(2.0 * b * m * k * n for b, m, k, n in shapes)
    mm = time_matmuls(be.xp, shapes, be.dtype, args.repeats, be.synchronize)
    res = {
        "model": str(path), "device": be.describe(), "cpu": cpu_name(), "seqlen": args.seqlen,
        "prefill_seconds": best, "prefill_tok_s": args.seqlen / best, "prefill_gflop_s": flops / best / 1e9,
        "matmul_seconds": mm, "matmul_gflop_s": flops / mm / 1e9, "fraction_of_matmul_rate": mm / best,
        "gflop": flops / 1e9,
    }
    for k, v in res.items():
        print(f"{k:26s} {v:.4g}" if isinstance(v, float) else f"{k:26s} {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""What scoring one 2048-token window costs: the whole-logits log-softmax against sagekit's row-chunked one.

Both score the same model on the same window, alternating, on one thread (as each of pareto.py's
`--eval-jobs 2` workers runs). The baseline is the plain code: `forward` gives the (2047, vocab) logits and
the log-softmax and KL run on them whole, fresh 400 MB temporaries each; `log_probs` and `Tally.add` work
256 positions at a time into a reused buffer.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python tools/bench_scoring.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before NumPy loads it)
import numpy as np

from sagekit.backend import get_backend
from sagekit.eval.perplexity import Tally, log_probs
from sagekit.io.demo import demo_model
from sagekit.model.load import load_model


def whole(model, window: np.ndarray) -> np.ndarray:
    logits = model.forward(window, 0)[:-1]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def whole_kl(ref: np.ndarray, logp: np.ndarray) -> float:
    return float((np.exp(ref) * (ref - logp)).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the demo model, FP16)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = load_model(args.model or demo_model(), get_backend("cpu"), args.seqlen)
    window = np.random.default_rng(0).integers(0, model.config.vocab_size, args.seqlen)
    ref = log_probs(model, window)
    buf = np.empty_like(ref)
    times: dict[str, list[float]] = {"whole pass": [], "chunked pass": [], "whole KL": [], "chunked KL": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        a = whole(model, window)
        times["whole pass"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = log_probs(model, window, buf)
        times["chunked pass"].append(time.perf_counter() - t)
        t = time.perf_counter()
        whole_kl(ref, a)
        times["whole KL"].append(time.perf_counter() - t)
        t = time.perf_counter()
        Tally().add(np, b, window, ref)
        times["chunked KL"].append(time.perf_counter() - t)
    assert np.abs(a - b).max() < 1e-3, "the two paths disagree"
    out = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out.update(rounds=args.rounds, load=os.getloadavg()[0], threads=os.environ.get("OPENBLAS_NUM_THREADS"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

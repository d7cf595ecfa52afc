"""Prefill time of one model under different thread-pool settings, each in a fresh process.

Numba's OpenMP pool and OpenBLAS's pool both spin after parallel work; where packed kernels and BLAS
alternate they can take each other's cores. The settings must be in the environment before NumPy and
Numba load, hence one subprocess per setting; every process times the same prefill (median of --repeats).

    python tools/bench_threads.py MODEL --tokens 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "sagekit default (OMP_WAIT_POLICY=passive)": {},
    "OMP_WAIT_POLICY=active (spinning)": {"OMP_WAIT_POLICY": "active"},
    "NUMBA_THREADING_LAYER=workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
    "OPENBLAS_NUM_THREADS=1": {"OPENBLAS_NUM_THREADS": "1"},
    "NUMBA_NUM_THREADS=1": {"NUMBA_NUM_THREADS": "1"},
}

CHILD = """
import json, sys, time
import numpy as np
from sagekit.backend import get_backend
from sagekit.model.load import load_model
path, tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = load_model(path, get_backend("cpu"), tokens)
ids = np.random.default_rng(0).integers(0, model.config.vocab_size, tokens)
model.forward(ids[:8], 0)
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    model.forward(ids, 0)
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": float(np.median(times)), "min": min(times)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model folder (dense or compressed)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {}
    for name, env in SETTINGS.items():
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.tokens), str(args.repeats)],
                             env={**os.environ, **env}, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:45s} {results[name]['seconds']:7.3f} s (min {results[name]['min']:.3f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

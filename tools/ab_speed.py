"""Prefill or decode speed of compressed folders under two checkouts of sagekit, alternating, in one run.

A change to the forward pass or a kernel is measured against the code before it on the same machine and in
the same minutes: each round runs every folder under the baseline tree and under this one, each in a fresh
process (Numba's caches are per source path, so the two trees never share compiled kernels). A process
loads the folder and warms up, then reports its best of `repeats` timings:
  * prefill: a prompt of `tokens` random tokens (last token's logits only, as `sagekit bench` and
    llama-bench's pp count it), in tokens/s;
  * decode: 64 one-token steps (logits included) after a prompt of `tokens` tokens, in tokens/s.

    git worktree add /tmp/base 421c740
    python tools/ab_speed.py /tmp/vq203 /tmp/g305h5 --baseline /tmp/base --rounds 5 --json ab.json
    python tools/ab_speed.py /tmp/vq203 --baseline /tmp/base --measure decode --tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROBE = """
import sys, time
import sagekit
import numpy as np
from sagekit.backend import get_backend
from sagekit.model.load import load_model
folder, n, repeats, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = load_model(folder, get_backend("cpu"), n + steps)
tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, n + steps)
def run():  # (prefill seconds, decode seconds)
    t0 = time.perf_counter()
    model.forward(tokens[:n], 0, last_only=True)
    t1 = time.perf_counter()
    for i in range(n, n + steps):
        model.forward(tokens[i:i + 1], i, last_only=True)
    return t1 - t0, time.perf_counter() - t1
run()
times = [run()[1 if steps else 0] for _ in range(repeats)]
print(sagekit.__file__, (steps or n) / min(times))
"""
STEPS = {"prefill": 0, "decode": 64}


def tokens_per_second(tree: Path, folder: str, tokens: int, repeats: int, measure: str) -> float:
    """Best of `repeats` prefills (or decodes) of `folder` with the sagekit found in `tree`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-c", PROBE, folder, str(tokens), str(repeats), str(STEPS[measure])]
    out = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.split()
    if not out[0].startswith(str(tree)):
        raise SystemExit(f"{tree} did not provide sagekit (got {out[0]}): is it a checkout of the repository?")
    return float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="compressed model folders")
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare against")
    ap.add_argument("--measure", choices=sorted(STEPS), default="prefill", help="what to time (default prefill)")
    ap.add_argument("--tokens", type=int, default=512, help="prompt length (default 512, llama-bench's pp512)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process; its best counts")
    ap.add_argument("--json", type=Path, default=None, help="also write every round's figures here")
    args = ap.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this tree": HERE}
    rounds: dict[str, dict[str, list[float]]] = {f: {k: [] for k in trees} for f in args.folders}
    for r in range(args.rounds):
        for folder in args.folders:
            for name, tree in trees.items():
                speed = tokens_per_second(tree, folder, args.tokens, args.repeats, args.measure)
                rounds[folder][name].append(speed)
                print(f"round {r + 1}/{args.rounds}  {folder}  {name:9s}  {speed:7.1f} tok/s", flush=True)
    load = os.getloadavg()
    summary = {}
    for folder, by in rounds.items():
        med = {k: statistics.median(v) for k, v in by.items()}
        summary[folder] = {"median_tok_s": med, "speedup": med["this tree"] / med["baseline"], "rounds": by}
        print(f"{folder}: baseline {med['baseline']:.1f}, this tree {med['this tree']:.1f} tok/s "
              f"({summary[folder]['speedup']:.2f}x), medians of {args.rounds} rounds")
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"measure": args.measure, "tokens": args.tokens,
                                         "baseline": str(args.baseline), "load": load,
                                         "folders": summary}, indent=2))


if __name__ == "__main__":
    main()

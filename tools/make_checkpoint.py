"""Write a random-weight Llama checkpoint of a named real shape (sharded bf16 safetensors + config +
the demo model's tokenizer, so the vocabulary is the demo's 49152; every linear has the real shape), so large-model handling can be tested without downloading anything.

    python tools/make_checkpoint.py llama2-7b /data/llama2-7b-random --shards 7
    python tools/make_checkpoint.py small /tmp/small --layers 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sagekit.io.demo import demo_model
from sagekit.io.synthetic import SHAPES, llama_config, write_random_checkpoint

DEMO_VOCAB = 49152


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES), help="named architecture")
    ap.add_argument("out", type=Path, help="folder to write")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smaller test files)")
    ap.add_argument("--shards", type=int, default=4, help="number of safetensors shards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float32", action="store_true", help="store float32 instead of bf16")
    args = ap.parse_args()

    overrides = dict(SHAPES[args.shape])
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    overrides["vocab_size"] = DEMO_VOCAB  # the copied tokenizer's ids must index the embedding
    write_random_checkpoint(args.out, llama_config(**overrides), seed=args.seed, bf16=not args.float32,
                            shards=args.shards, tokenizer_from=demo_model())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

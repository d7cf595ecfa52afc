"""Where a decode step's time goes: the model as loaded, then with its linears and/or its lm_head swapped for
stubs that return zeros of the right shape, each variant timed in turn in the same process.

    python tools/profile_decode.py out/sage-default --depth 512 --steps 32 --rounds 15

The differences of the medians are the cost of the linears and of the lm_head; "neither" is what every model
shares (embedding, norms, RoPE, attention over the cache, residuals). The stubs make the outputs meaningless:
this is a timing tool only. Every variant runs layer by layer: the fused decode step (kernels/decode_step.py)
cannot run stubs, so it is switched off for all of them, and "as loaded" is slower than `sagekit bench` reports
for the grid and vq recipes.
"""

from __future__ import annotations

import argparse

import sagekit  # noqa: F401  (first: its thread settings must reach OpenBLAS before NumPy loads it)
import numpy as np

from sagekit.backend import get_backend
from sagekit.format.architecture import LLAMA_LAYER
from sagekit.model.llama import Llama
from sagekit.model.load import load_model

from bench_depth import step_ms  # tools/ is the script's folder, hence on sys.path


class Zeros:
    """Stands in for a linear: the right output shape, no work."""

    def __init__(self, out_features: int, in_features: int):
        self.out_features, self.in_features = out_features, in_features

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((x.shape[0], self.out_features), dtype=np.float32)


def stub(model: Llama, linears: bool, head: bool) -> Llama:
    if linears:
        for layer in model.layers:
            for t in LLAMA_LAYER.linears:
                lin = getattr(layer, t.attr)
                setattr(layer, t.attr, Zeros(lin.out_features, lin.in_features))
    if head:
        w = model.weights
        w.lm_head = Zeros(w.lm_head.out_features, w.lm_head.in_features)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model folder (compressed or not)")
    p.add_argument("--depth", type=int, default=512, help="prompt length before the timed steps")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    backend = get_backend(args.device)
    variants = {}
    for name, lin, head in (("as loaded", False, False), ("no linears", True, False), ("no lm_head", False, True),
                            ("neither", True, True)):
        model = stub(load_model(args.model, backend, args.depth + args.steps), lin, head)
        model.decode_plan = None  # the same path for every variant (module docstring)
        model.forward(np.arange(100, 100 + args.depth) % model.config.vocab_size, 0, last_only=True)
        variants[name] = model
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, model in variants.items():
            times[name].append(step_ms(model, args.depth, args.steps))
    med = {name: float(np.median(v)) for name, v in times.items()}
    print(f"{args.model}, {backend.describe()}, depth {args.depth}, {args.steps} steps x {args.rounds} rounds")
    for name, v in times.items():
        print(f"  {name:>10}: median {med[name]:6.2f} ms/token (min {min(v):.2f})")
    print(f"  linears {med['as loaded'] - med['no linears']:.2f} ms, lm_head {med['as loaded'] - med['no lm_head']:.2f}"
          f" ms, shared {med['neither']:.2f} ms")


if __name__ == "__main__":
    main()

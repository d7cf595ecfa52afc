"""Autoregressive generation with the KV cache: one prefill of the prompt, then one token per step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from sagekit.model.llama import Llama


@dataclass
class Generation:
    tokens: list[int]
    prefill_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from the prefill logits; each later one costs a decode step
        return max(len(self.tokens) - 1, 0) / max(self.decode_seconds, 1e-9)


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else nucleus sampling over the smallest set with mass >= top_p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def stream_tokens(model: Llama, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, stop: tuple[int, ...] = (),
                  use_cache: bool = True) -> Iterator[int]:
    """New tokens after `prompt`, each yielded as soon as it is sampled (a stop token is yielded, then it ends).

    Lazy: nothing runs until the first token is asked for, and closing the iterator stops the work, so a
    reader that goes away (a closed stream, Ctrl-C) costs no further forward passes.
    use_cache=False recomputes the whole sequence each step (a test reference).
    """
    rng = np.random.default_rng(seed)
    be = model.backend
    ids = list(prompt)
    logits = be.to_numpy(model.forward(np.asarray(ids), 0, last_only=True))[-1]
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, rng)
        yield nxt
        if nxt in stop or step == max_new_tokens - 1:
            return
        ids.append(nxt)
        if use_cache:
            logits = be.to_numpy(model.forward(np.asarray([nxt]), len(ids) - 1, last_only=True))[-1]
        else:
            logits = be.to_numpy(model.forward(np.asarray(ids), 0, last_only=True))[-1]


def generate(model: Llama, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None,
             use_cache: bool = True) -> Generation:
    """All new tokens after `prompt` at once, timed: the prefill ends when the first token is sampled."""
    t0 = time.perf_counter()
    t1 = None
    out: list[int] = []
    for nxt in stream_tokens(model, prompt, max_new_tokens, temperature, top_p, seed, stop, use_cache):
        if t1 is None:
            t1 = time.perf_counter()
        out.append(nxt)
        if on_token:
            on_token(nxt)
    t2 = time.perf_counter()
    t1 = t2 if t1 is None else t1
    return Generation(tokens=out, prefill_tokens=len(prompt), prefill_seconds=t1 - t0, decode_seconds=t2 - t1)

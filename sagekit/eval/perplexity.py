"""Perplexity by the protocol of docs sage-ptq.md section 5, with optional KL against a reference model.

The whole text is tokenised once with no BOS, cut into non-overlapping windows of `seqlen` tokens (a short
tail is dropped), and every position after the first of each window is scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from sagekit.errors import SagekitError
from sagekit.model.llama import Llama


@dataclass
class EvalResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float
    kl: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def windows(ids: np.ndarray, seqlen: int, max_windows: int | None) -> np.ndarray:
    n = len(ids) // seqlen
    if n == 0:
        raise SagekitError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}: use a smaller --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


HEAD_ROWS = 256


def log_probs(model: Llama, window: np.ndarray, out: Any | None = None) -> Any:
    """(seqlen - 1, vocab) float32 log-probabilities of the next token at every position but the last.

    The head and the log-softmax run HEAD_ROWS positions at a time into `out` (reusable across windows), so
    the 400 MB of a 2048-token window's logits never exist as fresh temporaries: on the 2-core VM their page
    faults cost more than the head's GEMM (7.8 s of a 21 s pass, against 0.2 s for the same arithmetic
    in cache-sized chunks).
    """
    xp = model.xp
    h = model.hidden(window, 0)[:-1]
    if out is None:
        out = xp.empty((h.shape[0], model.config.vocab_size), dtype=xp.float32)
    for r0 in range(0, h.shape[0], HEAD_ROWS):
        logits = model.head(h[r0:r0 + HEAD_ROWS])
        logits -= logits.max(axis=-1, keepdims=True)
        xp.subtract(logits, xp.log(xp.exp(logits).sum(axis=-1, keepdims=True)), out=out[r0:r0 + HEAD_ROWS])
    return out


@dataclass
class Tally:
    """Running sums over scored positions, so one reference pass can score several models window by window."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    scored: int = 0

    def add(self, xp: Any, logp: Any, window: np.ndarray, ref_logp: Any | None = None) -> None:
        n = len(window) - 1
        self.nll -= float(logp[xp.arange(n), xp.asarray(window[1:])].sum())
        if ref_logp is not None:
            for r0 in range(0, n, HEAD_ROWS):  # in row chunks, for the reason log_probs gives
                ref, mine = ref_logp[r0:r0 + HEAD_ROWS], logp[r0:r0 + HEAD_ROWS]
                self.kl += float((xp.exp(ref) * (ref - mine)).sum())
                self.agree += int((ref.argmax(axis=-1) == mine.argmax(axis=-1)).sum())
        self.scored += n

    def __add__(self, other: Tally) -> Tally:
        """The sums over both tallies' positions (windows scored apart, e.g. by parallel jobs)."""
        return Tally(self.nll + other.nll, self.kl + other.kl, self.agree + other.agree, self.scored + other.scored)

    def result(self, windows: int, seqlen: int, seconds: float, with_reference: bool) -> EvalResult:
        return EvalResult(ppl=math.exp(self.nll / self.scored), nll=self.nll / self.scored, tokens=self.scored,
                          windows=windows, seqlen=seqlen, seconds=seconds,
                          kl=self.kl / self.scored if with_reference else None,
                          top1=self.agree / self.scored if with_reference else None)


def evaluate(model: Llama, ids: np.ndarray, seqlen: int, max_windows: int | None = None,
             reference: Llama | None = None, on_window: Callable[[int, int], None] | None = None) -> EvalResult:
    """Score `ids`; with a reference model also the mean KL(reference || model) and top-1 agreement."""
    wins = windows(ids, seqlen, max_windows)
    tally = Tally()
    start = time.perf_counter()
    for w, win in enumerate(wins):
        tally.add(model.xp, log_probs(model, win), win, None if reference is None else log_probs(reference, win))
        if on_window:
            on_window(w + 1, len(wins))
    model.backend.synchronize()
    return tally.result(len(wins), seqlen, time.perf_counter() - start, reference is not None)

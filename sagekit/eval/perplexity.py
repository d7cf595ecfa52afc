"""Perplexity by the protocol of docs sage-ptq.md section 5, with optional KL against a reference model.

The whole text is tokenised once with no BOS, cut into non-overlapping windows of `seqlen` tokens (a short
tail is dropped), and every position after the first of each window is scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
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


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SagekitError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise SagekitError(f"{path} is not UTF-8 text (byte {e.start}): convert it first") from None
    except OSError as e:
        raise SagekitError(f"cannot read {path}: {e.strerror}") from None


def windows(ids: np.ndarray, seqlen: int, max_windows: int | None) -> np.ndarray:
    n = len(ids) // seqlen
    if n == 0:
        raise SagekitError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}: use a smaller --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


def _log_softmax(xp: Any, logits: Any) -> Any:
    m = logits.max(axis=-1, keepdims=True)
    shifted = logits - m
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def evaluate(model: Llama, ids: np.ndarray, seqlen: int, max_windows: int | None = None,
             reference: Llama | None = None, on_window: Callable[[int, int], None] | None = None) -> EvalResult:
    """Score `ids`; with a reference model also the mean KL(reference || model) and top-1 agreement."""
    xp = model.xp
    wins = windows(ids, seqlen, max_windows)
    nll, kl, agree, scored = 0.0, 0.0, 0, 0
    start = time.perf_counter()
    for w, win in enumerate(wins):
        logp = _log_softmax(xp, model.forward(win, 0)[:-1])
        target = xp.asarray(win[1:])
        nll -= float(logp[xp.arange(seqlen - 1), target].sum())
        if reference is not None:
            ref_logp = _log_softmax(xp, reference.forward(win, 0)[:-1])
            kl += float((xp.exp(ref_logp) * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(axis=-1) == logp.argmax(axis=-1)).sum())
        scored += seqlen - 1
        if on_window:
            on_window(w + 1, len(wins))
    model.backend.synchronize()
    return EvalResult(
        ppl=math.exp(nll / scored), nll=nll / scored, tokens=scored, windows=len(wins), seqlen=seqlen,
        seconds=time.perf_counter() - start,
        kl=None if reference is None else kl / scored, top1=None if reference is None else agree / scored)

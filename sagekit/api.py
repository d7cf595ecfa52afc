"""The Python API: load a model (dense or compressed) and talk to it, or compress one, in a few lines.

    import sagekit
    m = sagekit.load()                    # the built-in demo model; or sagekit.load("out/")
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0))
    for piece in m.generate("Once upon a time", max_new_tokens=40, stream=True):
        print(piece, end="", flush=True)

The command line, the chat and the server are built on the same objects.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from tokenizers import Tokenizer

from sagekit.errors import SagekitError
from sagekit.model.chat import (
    ChatTemplate,
    Message,
    load_chat_template,
    stop_token_ids,
    trim_history,
)
from sagekit.model.generate import stream_tokens
from sagekit.model.llama import Llama
from sagekit.model.tokenizer import StreamDecoder

CACHE_STEP = 512  # tokens: the KV cache grows in these steps


class Reply(Iterator[str]):
    """A reply being generated: iterate for its text pieces as they come; afterwards read its figures.

    finish_reason is "stop" (the model ended its turn, or a stop string came), "length" (max_new_tokens
    reached) or "cancelled" (closed early). The end-of-turn token and stop strings are not part of the text.
    """

    def __init__(self, tokens: Iterator[int], tokenizer: Tokenizer, prompt_tokens: int, stop_ids: Sequence[int],
                 stop: Sequence[str]):
        self._tokens, self._decoder = tokens, StreamDecoder(tokenizer)
        self._stop_ids, self._stop = set(stop_ids), [s for s in stop if s]
        self._held = ""  # text that may be the start of a stop string, not yet given out
        self.prompt_tokens, self.tokens, self.text = prompt_tokens, [], ""
        self.finish_reason: str | None = None
        self.prefill_seconds, self.decode_seconds = 0.0, 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def __next__(self) -> str:
        while self.finish_reason is None:
            piece = self._step()
            if piece:
                self.text += piece
                return piece
        if self._held:  # the end came without a stop string: what was held back is text after all
            piece, self._held = self._held, ""
            self.text += piece
            return piece
        raise StopIteration

    def _step(self) -> str:
        """Generate one token; the text it releases (often all of its piece, sometimes nothing)."""
        t0 = time.perf_counter()
        token = next(self._tokens, None)
        if self.tokens:
            self.decode_seconds += time.perf_counter() - t0
        else:
            self.prefill_seconds = time.perf_counter() - t0
        if token is None:
            self.finish_reason = "length"
            return self._release(self._decoder.flush())
        self.tokens.append(token)
        if token in self._stop_ids:
            self._end("stop")
            return self._release(self._decoder.flush())
        return self._release(self._decoder.push(token))

    def _release(self, piece: str) -> str:
        """What of `piece` can be given out now: none of a stop string, nor what may be the start of one."""
        if not self._stop:
            return piece
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._end("stop")
            self._held = ""
            return text[:min(hits)]
        keep = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self._tokens.close()

    def close(self) -> None:
        """Stop generating (no further forward passes); finish_reason becomes "cancelled" if it was running."""
        if self.finish_reason is None:
            self._end("cancelled")
            self._held = ""

    def wait(self) -> Reply:
        """Run to the end; returns self, whose .text is then the whole reply."""
        for _ in self:
            pass
        return self


class Model:
    """A loaded model with its tokenizer and chat template. One reply at a time: starting one closes the last."""

    def __init__(self, path: Path, llm: Llama, tokenizer: Tokenizer, template: ChatTemplate | None,
                 stop_ids: tuple[int, ...], context_length: int):
        self.path, self.llm, self.tokenizer, self.template = path, llm, tokenizer, template
        self.stop_ids = stop_ids
        self.context_length = context_length  # prompt plus reply tokens at most
        self.name = (path if path.is_dir() else path.parent).name
        self._active: Reply | None = None

    def _reserve(self, tokens: int) -> None:
        """Grow the KV cache to hold `tokens` (in steps of CACHE_STEP, so it is not reallocated every time)."""
        self.llm.reserve(min(self.context_length, -(-tokens // CACHE_STEP) * CACHE_STEP))

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; special=False leaves out what the tokenizer would add (a BOS, say)."""
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def chat_prompt(self, messages: list[Message]) -> str:
        """The prompt text the chat template makes of `messages`, ready for the assistant's turn."""
        if self.template is None:
            raise SagekitError(f"{self.path} has no chat template (chat_template in tokenizer_config.json): use "
                               "plain generation, or copy the model's tokenizer_config.json beside its weights")
        return self.template.render(messages, add_generation_prompt=True)

    def chat_ids(self, messages: list[Message]) -> list[int]:
        # the template writes any BOS itself; the tokenizer must not add a second one
        return self.encode(self.chat_prompt(messages), special=False)

    def fit_history(self, messages: list[Message], max_new_tokens: int) -> list[Message]:
        """The most recent part of a conversation that leaves room for a reply of max_new_tokens."""
        room = self.context_length - max_new_tokens
        return trim_history(messages, lambda kept: len(self.chat_ids(kept)) <= room)

    def start(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = 0, stop: Sequence[str] = ()) -> Reply:
        """A reply to a tokenised prompt, generated lazily as it is read. seed=None draws a fresh one."""
        if not prompt_ids:
            raise SagekitError("the prompt is empty after tokenisation: give some text")
        if max_new_tokens < 1:
            raise SagekitError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.context_length:
            raise SagekitError(f"the prompt's {len(prompt_ids)} tokens plus {max_new_tokens} new ones exceed the "
                               f"context of {self.context_length} tokens: shorten the prompt or ask for fewer tokens")
        if temperature < 0 or not 0 <= top_p <= 1:
            raise SagekitError(f"temperature must be >= 0 and top_p from 0 to 1, not {temperature} and {top_p}")
        if self._active is not None:
            self._active.close()  # one KV cache: an unfinished reply cannot go on once another starts
        seed = secrets.randbits(32) if seed is None else seed
        self._reserve(len(prompt_ids) + max_new_tokens)
        tokens = stream_tokens(self.llm, prompt_ids, max_new_tokens, temperature, top_p, seed, self.stop_ids)
        self._active = Reply(tokens, self.tokenizer, len(prompt_ids), self.stop_ids, stop)
        return self._active

    @overload
    def generate(self, prompt: str, max_new_tokens: int = ..., temperature: float = ..., top_p: float = ...,
                 seed: int | None = ..., stop: Sequence[str] = ..., stream: Literal[False] = ...) -> str: ...

    @overload
    def generate(self, prompt: str, max_new_tokens: int = ..., temperature: float = ..., top_p: float = ...,
                 seed: int | None = ..., stop: Sequence[str] = ..., *, stream: Literal[True]) -> Reply: ...

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.95,
                 seed: int | None = 0, stop: Sequence[str] = (), stream: bool = False) -> str | Reply:
        """Continue `prompt` (no chat template). temperature 0 is greedy; the same seed gives the same text.

        stream=True returns the Reply, an iterator of text pieces, instead of the whole text.
        """
        reply = self.start(self.encode(prompt), max_new_tokens, temperature, top_p, seed, stop)
        return reply if stream else reply.wait().text

    @overload
    def chat(self, messages: list[Message], max_new_tokens: int = ..., temperature: float = ...,
             top_p: float = ..., seed: int | None = ..., stop: Sequence[str] = ...,
             stream: Literal[False] = ...) -> str: ...

    @overload
    def chat(self, messages: list[Message], max_new_tokens: int = ..., temperature: float = ...,
             top_p: float = ..., seed: int | None = ..., stop: Sequence[str] = ..., *,
             stream: Literal[True]) -> Reply: ...

    def chat(self, messages: list[Message], max_new_tokens: int = 256, temperature: float = 0.7,
             top_p: float = 0.95, seed: int | None = 0, stop: Sequence[str] = (), stream: bool = False) -> str | Reply:
        """The assistant's reply to `messages` ([{"role": "user", "content": "..."}, ...]) under the chat template.

        Generation ends at the model's end-of-turn token, which the text leaves out. stream=True: see generate.
        """
        reply = self.start(self.chat_ids(messages), max_new_tokens, temperature, top_p, seed, stop)
        return reply if stream else reply.wait().text

    def perplexity(self, text: str, seqlen: int | None = None, max_windows: int | None = None) -> float:
        """Perplexity of `text` as `sagekit eval` scores it: non-overlapping windows of seqlen tokens.

        seqlen defaults to the whole text, up to the context length.
        """
        from sagekit.eval.perplexity import evaluate

        ids = np.asarray(self.encode(text), dtype=np.int64)
        if len(ids) < 2:
            raise SagekitError("perplexity needs a text of at least two tokens")
        seqlen = seqlen or min(len(ids), self.context_length)
        if seqlen > self.context_length:
            raise SagekitError(f"seqlen {seqlen} exceeds the context of {self.context_length} this model was loaded "
                               "with: pass a smaller seqlen, or load(..., context_length=N)")
        if self._active is not None:
            self._active.close()
        self._reserve(seqlen)
        return evaluate(self.llm, ids, seqlen, max_windows).ppl


def load(path: str | Path | None = None, device: str = "auto", context_length: int | None = None) -> Model:
    """A model ready to talk to: an HF folder, a .safetensors file or a sagekit compressed folder.

    path=None is the built-in demo model (SmolLM2-135M-Instruct). device: auto (CUDA when CuPy sees a
    GPU), cpu or cuda. context_length (default: the model's own, or its sliding window when that is shorter)
    caps prompt plus reply; the KV cache grows to what replies use.
    """
    from sagekit.backend import get_backend
    from sagekit.format.config import LlamaConfig
    from sagekit.io.demo import resolve_model
    from sagekit.model.load import load_model, start_kernels
    from sagekit.model.tokenizer import load_tokenizer

    path = resolve_model(None if path is None else str(path))
    folder = path if path.is_dir() else path.parent
    backend = get_backend(device)
    start_kernels(backend)  # before the tokenizer's memory too (load_model would do it after)
    tokenizer = load_tokenizer(folder)
    config = LlamaConfig.load(folder / "config.json")
    ctx = context_length or min(config.max_seq_len, config.sliding_window or config.max_seq_len)
    config.check_context(ctx)
    if not 1 < ctx <= config.max_seq_len:
        raise SagekitError(f"context_length must be from 2 to the model's {config.max_seq_len}, not {ctx}")
    llm = load_model(path, backend, min(ctx, CACHE_STEP))
    return Model(path, llm, tokenizer, load_chat_template(folder), stop_token_ids(folder, config, tokenizer), ctx)


def compress(src: str | Path | None, out: str | Path, *, method: str = "sage", recipe: str | None = None,
             target_bpw: float | None = None, calib: str | Path | None = None, calib_samples: int = 128,
             calib_seqlen: int = 2048, calib_seed: int = 0, fp_targets: bool = False, skip: str | None = None,
             workers: int = 1, device: str = "auto", head_bits: int | None = None, force: bool = False,
             **knobs: Any) -> dict[str, Any]:
    """Compress `src` (None: the demo model) into the packed folder `out`; returns its report (report.json).

    Arguments are `sagekit compress`'s options, with underscores, and so are its defaults: the sage grid
    recipe, data-free, 5 bits. `knobs` are the method's own (bits, seed, rotate, levels, ... for the grid
    recipe; salient_bits, rate_penalty, ... for recipe="paper"; damp, pbllm_fraction, bits for the baselines);
    one the method does not have is a one-line error naming the methods that take it.
    """
    from sagekit.io.demo import resolve_model
    from sagekit.quant import registry
    from sagekit.quant.calibration import CalibOptions
    from sagekit.quant.compress import CompressOptions
    from sagekit.quant.compress import compress as run

    name = registry.resolve(method, recipe)
    if fp_targets and calib is None:
        raise SagekitError("fp_targets changes how calibration fits each layer: give calib too")
    opts = CompressOptions(method=name, knobs=registry.get(name).make_knobs(knobs), target_bpw=target_bpw,
                           skip=skip, workers=workers, device=device, head_bits=head_bits,
                           calib=CalibOptions(Path(calib), calib_samples, calib_seqlen, calib_seed, fp_targets)
                           if calib is not None else None)
    return run(resolve_model(None if src is None else str(src)), Path(out), opts, force=force)

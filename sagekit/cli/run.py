"""`generate` and `eval`: run a model (dense or compressed) on a prompt or a text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from sagekit.cli.common import (
    DEVICE_HELP,
    MODEL_HELP,
    _fmt_bytes,
    _model,
    _resolve,
    _tokenizer,
    _user_errors,
    app,
    device_name,
    err,
    out,
    progress,
)
from sagekit.errors import SagekitError


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue; with --chat, the user's message."),
    chat: bool = typer.Option(False, "--chat", help="Answer the prompt as one chat turn, under the model's chat "
                              "template; the reply ends at the model's end-of-turn token."),
    system: Optional[str] = typer.Option(None, help="With --chat: a system message before the prompt."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature; 0 = greedy (deterministic)."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability adds up to this."),
    seed: int = typer.Option(0, help="Random seed for sampling; the same seed gives the same text."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text, tokens, speeds) instead."),
) -> None:
    """Continue a prompt (or answer it, with --chat), streaming text as it comes, then print the speeds."""
    from sagekit.api import load

    with _user_errors():
        if system is not None and not chat:
            raise SagekitError("--system applies to --chat")
        m = load(_resolve(model), device)
        if chat:
            messages = [{"role": "system", "content": system}] if system is not None else []
            reply = m.chat([*messages, {"role": "user", "content": prompt}], max_new_tokens, temperature, top_p,
                           seed, stream=True)
        else:
            reply = m.generate(prompt, max_new_tokens, temperature, top_p, seed, stream=True)
        if not json_out and not chat:
            sys.stdout.write(prompt)
        for piece in reply:
            if not json_out:
                sys.stdout.write(piece)
                sys.stdout.flush()
        llm = m.llm
        decode_tok_s = max(len(reply.tokens) - 1, 0) / max(reply.decode_seconds, 1e-9)
        prefill_tok_s = reply.prompt_tokens / max(reply.prefill_seconds, 1e-9)
        if json_out:
            print(json.dumps({"model": str(m.path), "prompt": prompt, "text": reply.text, "tokens": reply.tokens,
                              "prompt_tokens": reply.prompt_tokens, "finish_reason": reply.finish_reason,
                              "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s,
                              "weight_bytes": llm.weight_bytes, "kv_cache_bytes": llm.cache_bytes,
                              "device": device_name(llm.backend)}))
            return
        sys.stdout.write("\n")
        err.print(f"[dim]{reply.prompt_tokens} prompt tokens at {prefill_tok_s:.1f} tok/s, {len(reply.tokens)} new "
                  f"tokens at {decode_tok_s:.1f} tok/s on {device_name(llm.backend)}; weights "
                  f"{_fmt_bytes(llm.weight_bytes)}, KV cache {_fmt_bytes(llm.cache_bytes)}[/]")


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    text: Path = typer.Option(..., "--text", "-t", help="UTF-8 text file to score (e.g. wiki.test.txt)."),
    seqlen: int = typer.Option(2048, min=2, help="Window length in tokens; windows do not overlap."),
    max_windows: Optional[int] = typer.Option(None, min=1, help="Score only the first N windows."),
    reference: Optional[str] = typer.Option(None, help="Reference model: also report KL(reference || model) "
                                                       "per token and top-1 agreement, in the same pass."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Perplexity on a text: tokenise once (no BOS), non-overlapping windows, score every position after the first.

    On AVX-512 VNNI CPUs windows multiply at int8 (+0.2-0.4% ppl, demo model); SAGEKIT_PREFILL=float32: float32.
    """
    from sagekit.eval.perplexity import evaluate, windows
    from sagekit.io.text import read_text

    with _user_errors():
        path = _resolve(model)
        tok = _tokenizer(path)
        llm = _model(path, device, seqlen)
        ref = _model(_resolve(reference), device, seqlen) if reference else None
        ids = np.asarray(tok.encode(read_text(text)).ids, dtype=np.int64)
        n = len(windows(ids, seqlen, max_windows))
        with progress() as bar:
            task = bar.add_task(f"eval {path.name}", total=n)
            r = evaluate(llm, ids, seqlen, max_windows, reference=ref,
                         on_window=lambda i, _n: bar.update(task, completed=i))
        result = {"model": str(path), "text": str(text), **r.to_dict(), "device": device_name(llm.backend)}
        if json_out:
            print(json.dumps(result))
            return
        t = Table(title=f"{path.name} on {text.name}")
        for k in ("ppl", "nll", "kl", "top1", "tokens", "windows", "seqlen", "seconds", "device"):
            if k in result:
                v = result[k]
                t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        out.print(t)

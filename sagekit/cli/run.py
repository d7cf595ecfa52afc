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
    err,
    out,
    progress,
)
from sagekit.errors import SagekitError


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (no chat template is applied)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature; 0 = greedy (deterministic)."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability adds up to this."),
    seed: int = typer.Option(0, help="Random seed for sampling; the same seed gives the same text."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text, tokens, speeds) instead."),
) -> None:
    """Continue a prompt, streaming tokens as they come, then print prefill and decode speed."""
    from sagekit.model.generate import generate as run
    from sagekit.model.tokenizer import StreamDecoder

    with _user_errors():
        path = _resolve(model)
        tok = _tokenizer(path)
        ids = tok.encode(prompt).ids
        if not ids:
            raise SagekitError("the prompt is empty after tokenisation: give some text with --prompt")
        llm = _model(path, device, len(ids) + max_new_tokens)
        stream = StreamDecoder(tok)
        on_token = None if json_out else (lambda t: (sys.stdout.write(stream.push(t)), sys.stdout.flush()))
        if not json_out:
            sys.stdout.write(prompt)
        g = run(llm, ids, max_new_tokens, temperature, top_p, seed, stop=llm.config.eos_token_ids, on_token=on_token)
        stats = {"prefill_tok_s": g.prefill_tok_s, "decode_tok_s": g.decode_tok_s,
                 "weight_bytes": llm.weight_bytes, "kv_cache_bytes": llm.cache_bytes,
                 "device": llm.backend.describe()}
        if json_out:
            print(json.dumps({"model": str(path), "prompt": prompt, "text": tok.decode(g.tokens), "tokens": g.tokens,
                              "prompt_tokens": len(ids), **stats}))
            return
        sys.stdout.write("\n")
        err.print(f"[dim]{len(ids)} prompt tokens at {g.prefill_tok_s:.1f} tok/s, {len(g.tokens)} new tokens at "
                  f"{g.decode_tok_s:.1f} tok/s on {stats['device']}; weights {_fmt_bytes(llm.weight_bytes)}, "
                  f"KV cache {_fmt_bytes(llm.cache_bytes)}[/]")


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
    """Perplexity on a text: tokenise once (no BOS), non-overlapping windows, score every position after the first."""
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
        result = {"model": str(path), "text": str(text), **r.to_dict(), "device": llm.backend.describe()}
        if json_out:
            print(json.dumps(result))
            return
        t = Table(title=f"{path.name} on {text.name}")
        for k in ("ppl", "nll", "kl", "top1", "tokens", "windows", "seqlen", "seconds", "device"):
            if k in result:
                v = result[k]
                t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        out.print(t)

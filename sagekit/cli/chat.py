"""`chat`: talk to a model in the terminal, turn after turn, each reply streamed as it is generated."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from sagekit.cli.common import DEVICE_HELP, MODEL_HELP, _resolve, _user_errors, app, err
from sagekit.errors import SagekitError

if TYPE_CHECKING:
    from sagekit.api import Model, Reply

PROMPT = "\n> "


@app.command()
def chat(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    system: str | None = typer.Option(None, help="A system message that opens the conversation."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, help="Tokens per reply at most."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature; 0 = greedy (deterministic)."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0, help="Seed of the first reply; each later reply uses the next one."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Interactive chat under the model's chat template. Ctrl-C stops a reply; Ctrl-D (or Ctrl-C at the prompt) quits.

    The conversation is kept as long as it fits in the model's context with room for a reply; past that the
    oldest turns are dropped.
    """
    from sagekit.api import load

    with _user_errors():
        m = load(_resolve(model), device)
        if m.template is None:
            raise SagekitError(f"{m.path} has no chat template (chat_template in tokenizer_config.json): "
                               "use `sagekit generate` for plain continuation")
        err.print(f"[dim]{escape(m.name)}: context {m.context_length} tokens. Ctrl-C stops a reply; Ctrl-D quits.[/]")
        history = [{"role": "system", "content": system}] if system is not None else []
        turn = 0
        while True:
            try:
                line = input(PROMPT)
            except (EOFError, KeyboardInterrupt):
                sys.stdout.write("\n")
                return
            if not line.strip():
                continue
            try:
                history = _turn(m, [*history, {"role": "user", "content": line}], max_new_tokens, temperature,
                                top_p, seed + turn)
            except SagekitError as e:  # this message cannot be answered; the conversation goes on without it
                err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            turn += 1


def _turn(m: Model, history: list[dict], max_new_tokens: int, temperature: float, top_p: float,
          seed: int) -> list[dict]:
    """One reply to the last message of `history`; returns the history with the reply (trimmed to fit)."""
    kept = m.fit_history(history, max_new_tokens)
    if len(kept) < len(history):
        err.print(f"[dim](the {len(history) - len(kept)} oldest messages no longer fit and are dropped)[/]")
    text = _stream(m.chat(kept, max_new_tokens, temperature, top_p, seed, stream=True))
    return [*kept, {"role": "assistant", "content": text}]


def _stream(reply: Reply) -> str:
    """Print a reply as it comes; Ctrl-C ends it early. Returns the text shown, which the history keeps."""
    try:
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        reply.close()
        err.print("[yellow] (stopped)[/]", end="")
    sys.stdout.write("\n")
    return reply.text

"""The model's tokenizer: a `tokenizers.Tokenizer` read from tokenizer.json, plus streaming decode."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from sagekit.errors import SagekitError


def load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SagekitError(f"{folder} has no tokenizer.json: copy the model's tokenizer.json beside its config.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise SagekitError(f"{path} could not be read as a tokenizer ({str(e).splitlines()[0]})") from None


class StreamDecoder:
    """Turns a growing list of token ids into printable text pieces, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[len(self.printed):], text
        return piece

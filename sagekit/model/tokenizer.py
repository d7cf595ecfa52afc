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
    """Turns a growing list of token ids into printable text pieces, never splitting a UTF-8 character.

    Special tokens (<|im_end|>, <|im_start|>, ...) print as nothing. Each step decodes only the tokens since
    the previous piece, with the ones before it as context (a decoder may drop a leading space at the start
    of a string), so a long reply costs the same per token as a short one.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix, self.read = 0, 0  # ids[prefix:read] were printed last time; ids[read:] are not yet

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """What is still held back when the text ends (a character cut short comes out as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]

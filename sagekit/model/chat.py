"""The model's chat template: the Jinja `chat_template` of tokenizer_config.json, rendered as HF transformers does.

An Instruct model only answers well when its prompt is laid out the way it was trained (turn markers such
as <|im_start|>user ... <|im_end|>). The template ships with the model; transformers renders it in a
sandboxed Jinja environment with trim_blocks and lstrip_blocks, a `raise_exception` global, a `tojson` filter
that keeps non-ASCII text, the special tokens as variables and `add_generation_prompt`. So does this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from sagekit.errors import SagekitError
from sagekit.format.config import LlamaConfig

CONFIG_NAME = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer transformers versions save the template beside the config
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
JINJA_MISSING = "chat templates need Jinja2: pip install 'sagekit[chat]' (or pip install jinja2)"

Message = dict[str, Any]


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken object with `content`."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _default_template(t: Any, where: Path) -> str | None:
    """`chat_template` is a string, or a list of named templates of which "default" is the chat one."""
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise SagekitError(f"{where}: chat_template is neither a string nor a list with a 'default' template")


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A chat template and the special tokens it may refer to; compiled on first use."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source, self.special_tokens = source, special_tokens

    @cached_property
    def _compiled(self) -> Any:
        try:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise SagekitError(JINJA_MISSING) from None
        from jinja2.exceptions import TemplateError

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except TemplateError as e:
            raise SagekitError(f"the model's chat template does not compile ({e}): fix chat_template in "
                               f"{CONFIG_NAME}") from None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opener when add_generation_prompt."""
        template = self._compiled  # first: it says which extra to install when Jinja2 is missing
        from jinja2.exceptions import TemplateError

        try:
            return template.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **self.special_tokens)
        except TemplateError as e:
            raise SagekitError(f"the model's chat template refused the messages: {e}") from None


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json as a dict ({} when the folder has none)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise SagekitError(f"{path} is not valid JSON ({e}); copy the model's {CONFIG_NAME} again") from None
    if not isinstance(cfg, dict):
        raise SagekitError(f"{path} is not a JSON object; copy the model's {CONFIG_NAME} again")
    return cfg


def load_chat_template(folder: Path) -> ChatTemplate | None:
    """The folder's chat template (chat_template.jinja, else tokenizer_config.json), or None if it has none."""
    cfg = read_tokenizer_config(folder)
    source = _default_template(cfg.get("chat_template"), folder / CONFIG_NAME)
    if (folder / TEMPLATE_FILE).is_file():
        source = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    if source is None:
        return None
    special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(cfg.get(k))) is not None}
    return ChatTemplate(source, special)


def stop_token_ids(folder: Path, config: LlamaConfig, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Every token that ends a reply: config.json's eos ids, generation_config.json's, the tokenizer's eos.

    Instruct models often end a turn with a token that only one of the three names (Llama 3's <|eot_id|>).
    """
    ids = list(config.eos_token_ids)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
        except (ValueError, RecursionError, AttributeError):
            raise SagekitError(f"{gen_path} is not a valid JSON object; copy the model's file again") from None
        ids += [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
    eos_text = _token_text(read_tokenizer_config(folder).get("eos_token"))
    if eos_text is not None and tokenizer.token_to_id(eos_text) is not None:
        ids.append(tokenizer.token_to_id(eos_text))
    return tuple(dict.fromkeys(ids))


def check_messages(messages: Any) -> list[Message]:
    """Messages as chat templates expect them: a list of {"role": str, "content": str} objects."""
    if not isinstance(messages, list) or not messages:
        raise SagekitError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SagekitError(f"message {i} must be an object with a string 'role' and a string 'content', "
                               f"not {m!r:.80}")
    return messages


def trim_history(messages: list[Message], fits: Callable[[list[Message]], bool]) -> list[Message]:
    """The longest recent history that `fits`: whole turns go, oldest first, after a leading system message.

    A kept history starts at a user message (templates may insist that roles alternate from there); the
    system message and the last message always stay.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user" or i == len(turns) - 1]
    for start in starts:
        if fits(head + turns[start:]):
            return head + turns[start:]
    raise SagekitError("the last message alone does not fit in the model's context: shorten it")

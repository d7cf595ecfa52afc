"""The OpenAI wire format: request bodies checked into a `Request`, replies shaped as OpenAI shapes them.

Every refusal is an `ApiError`: an HTTP status and the body OpenAI sends, {"error": {"message", "type",
"param", "code"}}, so that clients written for OpenAI show the message.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sagekit.api import Model, Reply
from sagekit.errors import SagekitError

MAX_STOP = 4  # stop strings per request, as OpenAI allows


class ApiError(Exception):
    """A refused request: the status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A checked request, ready for the model: token ids and sampling settings."""

    kind: str  # "chat" or "text" (/v1/completions)
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int  # completion tokens per request
    context_length: int  # prompt plus completion


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _field(body: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    """body[key] if it has one of `kinds` (null or absent: the default). A bool is not a number here."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise _bad(f"'{key}' must be {what}, not {type(v).__name__}", key, "invalid_type")
    return v


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    v = float(_field(body, key, (int, float), default, "a number"))
    if not low <= v <= high:
        raise _bad(f"'{key}' must be from {low:g} to {high:g}, not {v:g}", key)
    return v


def _stop(body: dict[str, Any]) -> list[str]:
    stop = _field(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    return stop


def _unsupported(body: dict[str, Any]) -> None:
    """Options a client relies on that this server does not give: refused, not silently ignored."""
    if _field(body, "n", (int,), 1, "an integer") != 1:
        raise _bad("only n = 1 is supported", "n", "unsupported_value")
    for key in ("logprobs", "echo"):
        if body.get(key):
            raise _bad(f"'{key}' is not supported", key, "unsupported_value")
    if body.get("tools"):
        raise _bad("tools are not supported", "tools", "unsupported_value")


def _content(m: Any, i: int) -> dict[str, str]:
    """A message as the chat template takes it; content may be a string or a list of text parts."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _bad(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]", "invalid_type")
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")
    return {"role": m["role"], "content": content}


def _prompt_ids(body: dict[str, Any], kind: str, model: Model) -> list[int]:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list of messages", "messages", "invalid_type")
        try:
            return model.chat_ids([_content(m, i) for i, m in enumerate(messages)])
        except SagekitError as e:  # no template, or the template refused these messages
            raise _bad(str(e), "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string", "prompt", "invalid_type")
    return model.encode(prompt)


def parse(body: Any, kind: str, model: Model, model_id: str, limits: Limits) -> Request:
    """Check a /v1/chat/completions (kind "chat") or /v1/completions ("text") body against the limits."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    name = body.get("model")
    if not isinstance(name, str):
        raise _bad("'model' must be a string: the id from GET /v1/models", "model", "invalid_type")
    if name != model_id:
        raise ApiError(404, f"the model '{name}' does not exist here; this server has '{model_id}'",
                       param="model", code="model_not_found")
    _unsupported(body)
    ids = _prompt_ids(body, kind, model)
    room = limits.context_length - len(ids)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, key, (int,), None, "an integer")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise _bad(f"'{key}' must be from 1 to {limits.max_tokens}, not {max_tokens}", key)
    if room < 1 or (max_tokens or 1) > room:
        raise _bad(f"this model's context is {limits.context_length} tokens; the prompt has {len(ids)}"
                   f"{'' if max_tokens is None else f' and {max_tokens} more were asked for'}: shorten the prompt "
                   "or ask for fewer tokens", "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    options = _field(body, "stream_options", (dict,), {}, "an object")
    seed = _field(body, "seed", (int,), None, "an integer")
    return Request(kind=kind, prompt_ids=ids, max_tokens=max_tokens or min(limits.max_tokens, room),
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                   seed=None if seed is None else seed % 2 ** 64, stop=_stop(body),
                   stream=bool(_field(body, "stream", (bool,), False, "true or false")),
                   include_usage=bool(options.get("include_usage")))


def usage(reply: Reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def finish_reason(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


def _head(req: Request, model_id: str, chunk: bool) -> dict[str, Any]:
    kind = {"chat": "chat.completion", "text": "text_completion"}[req.kind]
    return {"id": req.id, "object": kind + (".chunk" if chunk and req.kind == "chat" else ""),
            "created": req.created, "model": model_id}


def completion(req: Request, model_id: str, reply: Reply) -> dict[str, Any]:
    """The whole reply as one response body."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text}, "logprobs": None}
    else:
        choice = {"index": 0, "text": reply.text, "logprobs": None}
    return {**_head(req, model_id, False), "choices": [{**choice, "finish_reason": finish_reason(reply)}],
            "usage": usage(reply)}


def chunk(req: Request, model_id: str, text: str | None, finish: str | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed reply: a piece of text, or (text None) the end with its reason."""
    if req.kind == "chat":
        delta = {} if text is None else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None}
    return {**_head(req, model_id, True), "choices": [{**choice, "finish_reason": finish}]}


def first_chunk(req: Request, model_id: str) -> dict[str, Any] | None:
    """A chat stream opens with the assistant's role, as OpenAI's does; a text stream has no opener."""
    if req.kind != "chat":
        return None
    body = chunk(req, model_id, "")
    body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return body


def usage_chunk(req: Request, model_id: str, reply: Reply) -> dict[str, Any]:
    return {**_head(req, model_id, True), "choices": [], "usage": usage(reply)}

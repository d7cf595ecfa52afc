"""`sagekit serve` as a real process on a free localhost port, talked to with the official OpenAI client and
with raw HTTP. The server runs with SciPy unimportable: serving needs none (as test_slim.py checks for the
other runtime commands). Replies are held to what the Python API answers for the same request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_chat_model
from typer.testing import CliRunner

import sagekit
from sagekit.cli import app

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
NO_SCIPY = "import sys; sys.modules['scipy'] = None; from sagekit.cli import app; app()"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_BODY, MAX_TOKENS = 65536, 60000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: Path, log_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """Run `sagekit serve` until /health answers; returns the process and its base URL. Its output goes to
    LOG_DIR/server.log."""
    port = _free_port()
    log = open(log_dir / "server.log", "wb")  # noqa: SIM115 - the process writes it until the end
    p = subprocess.Popen([sys.executable, "-c", NO_SCIPY, "serve", str(model), "--port", str(port), "--device",
                          "cpu", *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    while True:  # the model loads first; a dead process fails the fixture at once
        assert p.poll() is None, (log_dir / "server.log").read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return p, url
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny chat model with room for a long reply (the queue test needs one that runs while it checks)."""
    return write_chat_model(tmp_path_factory.mktemp("serve") / "tiny-chat", max_position_embeddings=65536)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("log")


@pytest.fixture(scope="module")
def server(model, log_dir) -> Iterator[str]:
    p, url = _start(model, log_dir, "--api-key", KEY, "--max-queue", "0", "--max-body",
                    str(MAX_BODY), "--max-tokens", str(MAX_TOKENS))
    yield url
    p.terminate()
    p.wait(timeout=60)


@pytest.fixture(scope="module")
def local(model) -> sagekit.Model:
    """The same model through the Python API: what the server must answer."""
    return sagekit.load(model, device="cpu")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").owned_by == "sagekit"


def test_chat_completion(client, local):
    r = client.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == local.chat(QUESTION, max_new_tokens=8, temperature=0)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 8)
    assert r.usage.prompt_tokens == len(local.chat_ids(QUESTION))


def test_streamed_chat_completion(client, local):
    stream = client.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local.chat(QUESTION, max_new_tokens=8, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and len({c.id for c in chunks}) == 1


def test_completion_and_streamed_completion(client, local):
    expected = local.generate("The fox", max_new_tokens=8, temperature=0)
    r = client.completions.create(model="tiny-chat", prompt="The fox", max_tokens=8, temperature=0)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="tiny-chat", prompt="The fox", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_seeded_sampling_is_the_apis(client, local):
    ask = {"model": "tiny-chat", "messages": QUESTION, "max_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 5}
    a, b = (client.chat.completions.create(**ask).choices[0].message.content for _ in range(2))
    assert a == b == local.chat(QUESTION, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=5)


def _post(url: str, body, key: str | None = KEY, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers=headers, timeout=120)


GOOD = {"model": "tiny-chat", "messages": QUESTION, "max_tokens": 4}
BAD = {  # request -> (status, error code, param)
    "malformed JSON": (b'{"model": "tiny-chat", "messages": [', 400, "invalid_json", None),
    "body not an object": ([GOOD], 400, "invalid_type", None),
    "max_tokens a string": ({**GOOD, "max_tokens": "4"}, 400, "invalid_type", "max_tokens"),
    "messages a string": ({**GOOD, "messages": "hi"}, 400, "invalid_type", "messages"),
    "message without role": ({**GOOD, "messages": [{"content": "hi"}]}, 400, "invalid_type", "messages[0]"),
    "temperature a word": ({**GOOD, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    "temperature too high": ({**GOOD, "temperature": 7}, 400, "invalid_value", "temperature"),
    "stream a string": ({**GOOD, "stream": "yes"}, 400, "invalid_type", "stream"),
    "negative max_tokens": ({**GOOD, "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    "zero max_tokens": ({**GOOD, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    "huge max_tokens": ({**GOOD, "max_tokens": 10 ** 12}, 400, "invalid_value", "max_tokens"),
    "prompt plus completion past the context": (
        {**GOOD, "messages": [{"role": "user", "content": "x" * 6000}], "max_tokens": MAX_TOKENS}, 400,
        "context_length_exceeded", "messages"),
    "n of 2": ({**GOOD, "n": 2}, 400, "unsupported_value", "n"),
    "unknown model": ({**GOOD, "model": "gpt-4"}, 404, "model_not_found", "model"),
    "missing model": ({k: v for k, v in GOOD.items() if k != "model"}, 400, "invalid_type", "model"),
    "oversized body": ({**GOOD, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}, 413,
                       "request_too_large", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_refused_and_the_server_goes_on(server, case):
    body, status, code, param = BAD[case]
    r = _post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and error["message"] and error["type"]
    assert _post(server, GOOD).status_code == 200


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_checked(server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for r in (_post(server, GOOD, key=key), httpx.get(server + "/v1/models", headers=headers)):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/health").status_code == 200  # for container health checks: no key
    assert _post(server, GOOD).status_code == 200


def test_unknown_path_and_method_are_json(server):
    assert httpx.get(server + "/v2/nothing").json()["error"]["message"].endswith("Not Found")
    assert httpx.get(server + "/v1/completions").status_code == 405
    assert _post(server, {"model": "tiny-chat", "prompt": 3}, path="/v1/completions").json()["error"]["param"] == "prompt"


def test_a_full_queue_refuses_with_429(server, log_dir):
    """With --max-queue 0, a request that comes while a reply is being generated is refused at once."""
    body = {**GOOD, "max_tokens": MAX_TOKENS - 100, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=headers, timeout=120) as long:
        lines = long.iter_lines()
        assert next(lines).startswith("data: ")  # the long reply has started
        r = _post(server, GOOD)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    # the long reply's reader went away: the worker stops it (the server notices at its next token), and then
    # the next request is served
    while httpx.get(server + "/health").json()["busy"]:
        time.sleep(0.1)
    stopped = [line for line in (log_dir / "server.log").read_text().splitlines() if "client went away" in line]
    assert len(stopped) == 1 and int(stopped[0].split()[-2]) < MAX_TOKENS - 100, stopped
    assert _post(server, GOOD).status_code == 200


def test_other_hosts_need_an_api_key(model):
    r = CliRunner().invoke(app, ["serve", str(model), "--host", "0.0.0.0"], env={"SAGEKIT_API_KEY": None})
    assert r.exit_code == 1 and "--api-key" in r.output


@pytest.mark.slow
def test_demo_model_answers_through_the_openai_client(demo_model, tmp_path):
    p, url = _start(demo_model, tmp_path)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=demo_model.name, messages=QUESTION, max_tokens=20, temperature=0)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    finally:
        p.terminate()
        p.wait(timeout=60)


def test_load_test_tool_checks_pass_under_refusals(server):
    """tools/load_test.py against the live server: with --max-queue 0 most concurrent requests are refused,
    and every one that is answered must still be whole and the same for the same seeded prompt."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "load_test.py"), "--url", server, "--api-key", KEY,
                        "--clients", "3", "--seconds", "2", "--max-tokens", "4", "--json"],
                       capture_output=True, text=True, check=False, timeout=300)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["problems"] == [], report
    assert report["replies"] >= 1 and report["failed"] == 0
    assert report["requests"] == report["replies"] + report["refused_429"]


def test_load_test_check_finds_crossed_and_cut_streams():
    sys.path.insert(0, str(ROOT / "tools"))
    from load_test import Outcome, check

    def reply(prompt, text, rid):
        return Outcome(prompt=prompt, status=200, text=text, ids={rid}, finish="length", tokens=4, done=True)

    good = [reply(0, "a b", "x1"), reply(0, "a b", "x2"), reply(1, "c d", "x3"), Outcome(prompt=1, status=429)]
    assert check(good, max_tokens=4) == []
    crossed = [reply(0, "a b", "x1"), reply(0, "c d", "x2")]
    assert check(crossed, 4) == ["prompt 0: 2 different replies to the same seeded request"]
    assert "not one id of its own" in check([reply(0, "a", "x1"), reply(1, "b", "x1")], 4)[0]
    cut = [Outcome(prompt=0, status=200, text="a", ids={"x1"}, finish=None, tokens=1, done=False)]
    assert "incomplete" in check(cut, 4)[0]

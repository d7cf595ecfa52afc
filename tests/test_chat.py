"""Chat: the template rendered as HF transformers renders it, replies that end at the end-of-turn token with
special tokens hidden, the history kept within the context, and `sagekit chat` / `generate --chat`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import write_chat_model
from tokenizers import Tokenizer

import sagekit
from sagekit.errors import SagekitError
from sagekit.io.synthetic import byte_tokenizer_json
from sagekit.model.chat import load_chat_template, trim_history
from sagekit.model.tokenizer import StreamDecoder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]


@pytest.mark.slow
def test_demo_template_matches_the_reference_rendering(demo_model):
    """Read off SmolLM2's template by hand: a default system turn when none is given, ChatML turns, the opener."""
    t = load_chat_template(demo_model)
    assert t.render(QUESTION) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert t.render(CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n")


@pytest.mark.slow
def test_gguf_import_keeps_the_chat_template(demo_model):
    gguf = pytest.importorskip("gguf")
    from sagekit.io.demo import demo_gguf

    reader = gguf.GGUFReader(demo_gguf())
    cfg = json.loads((demo_model / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")


def test_tokenizer_config_from_a_written_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    from sagekit.io.gguf_import import open_gguf, tokenizer_config

    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ bos_token }}{{ messages[0]['content'] }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = tokenizer_config(open_gguf(tmp_path / "t.gguf"))
    assert cfg["chat_template"] == "{{ bos_token }}{{ messages[0]['content'] }}"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<s>", "</s>", False)


def _template(folder: Path, source, **tokens) -> object:
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": source, **tokens}))
    return load_chat_template(folder)


def test_template_environment_is_transformers(tmp_path):
    """trim_blocks + lstrip_blocks, a tojson that keeps non-ASCII and '<', special tokens, named templates."""
    source = ("{{ bos_token }}\n{% for m in messages %}\n    {{ m['role'] }}: {{ m['content'] | tojson }}\n"
              "    {% if loop.last %}(last){% endif %}\n{% endfor %}\n{% if add_generation_prompt %}bot:{% endif %}")
    t = _template(tmp_path / "a", source, bos_token={"content": "<s>", "special": True})
    assert t.render([{"role": "user", "content": "héllo <b>"}]) == '<s>\n    user: "héllo <b>"\n(last)bot:'
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    assert _template(tmp_path / "b", named, eos_token="</s>").render(QUESTION) == "D</s>"
    assert load_chat_template(tmp_path) is None  # no tokenizer_config.json: no template


def test_template_errors_are_one_line(tmp_path):
    refuses = _template(tmp_path / "a", "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system "
                                        "first') }}{% endif %}")
    with pytest.raises(SagekitError, match="refused the messages: system first"):
        refuses.render(QUESTION)
    with pytest.raises(SagekitError, match="does not compile"):
        _template(tmp_path / "b", "{% for %}").render(QUESTION)
    with pytest.raises(SagekitError, match="string 'content'"):
        refuses.render([{"role": "user", "content": 3}])
    with pytest.raises(SagekitError, match="not valid JSON"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "tokenizer_config.json").write_text("{")
        load_chat_template(tmp_path / "c")


def test_without_jinja2_the_error_names_the_extra(tiny_chat_model):
    code = ("import sys; sys.modules['jinja2'] = None\nfrom sagekit.model.chat import load_chat_template\n"
            f"from sagekit.errors import SagekitError\nt = load_chat_template(__import__('pathlib').Path({str(tiny_chat_model)!r}))\n"
            "try:\n    t.render([{'role': 'user', 'content': 'x'}])\nexcept SagekitError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install 'sagekit[chat]'" in r.stdout


def test_stream_decoder_hides_special_tokens_and_keeps_characters_whole():
    tok = Tokenizer.from_str(byte_tokenizer_json(300))
    tok.add_special_tokens(["<|im_end|>"])
    ids = tok.encode("héllo 🙂<|im_end|> wörld").ids
    assert tok.token_to_id("<|im_end|>") in ids and len(ids) > len("héllo 🙂 wörld")  # bytes, one by one
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "héllo 🙂 wörld"
    assert not any("\ufffd" in p for p in pieces)


def test_trim_history_drops_whole_turns_oldest_first():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}]
    size = lambda kept: sum(len(m["content"]) for m in kept)
    assert trim_history(msgs, lambda kept: size(kept) <= 100) == msgs
    assert trim_history(msgs, lambda kept: size(kept) <= 8) == [msgs[0], *msgs[3:]]  # never starts at a1
    assert trim_history(msgs, lambda kept: size(kept) <= 3) == [msgs[0], msgs[5]]
    with pytest.raises(SagekitError, match="does not fit"):
        trim_history(msgs, lambda kept: size(kept) <= 2)


def test_reply_ends_at_the_end_of_turn_token(tiny_chat_model):
    """Make a token the model emits greedily its end-of-turn token: the reply stops there and leaves it out."""
    free = sagekit.load(tiny_chat_model, device="cpu").generate("abc", max_new_tokens=12, temperature=0,
                                                               stream=True).wait()
    k = next(i for i in range(1, 12) if free.tokens[i] not in free.tokens[:i])
    cfg = json.loads((tiny_chat_model / "config.json").read_text())
    (tiny_chat_model / "config.json").write_text(json.dumps({**cfg, "eos_token_id": free.tokens[k]}))
    m = sagekit.load(tiny_chat_model, device="cpu")
    reply = m.generate("abc", max_new_tokens=12, temperature=0, stream=True).wait()
    assert reply.tokens == free.tokens[:k + 1] and reply.finish_reason == "stop"
    assert reply.text == m.tokenizer.decode(free.tokens[:k])


def test_stop_strings_end_the_reply_and_are_left_out(tiny_chat_model):
    m = sagekit.load(tiny_chat_model, device="cpu")
    full = m.generate("The fox", max_new_tokens=40, temperature=0)
    stop = full[12:14]
    reply = m.generate("The fox", max_new_tokens=40, temperature=0, stop=["never here", stop], stream=True)
    pieces = list(reply)
    assert "".join(pieces) == reply.text == full[:full.find(stop)]
    assert reply.finish_reason == "stop"


@pytest.mark.slow
def test_generate_chat_answers_and_hides_the_end_of_turn_token(demo_model):
    r = subprocess.run([sys.executable, "-m", "sagekit", "generate", str(demo_model), "--chat", "-p",
                        "What is the capital of France?", "-n", "20", "--temperature", "0", "--device", "cpu"],
                       capture_output=True, text=True, env=ENV, check=False, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "<|im_end|>" not in r.stdout and "<|im_start|>" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "sagekit", "generate", str(demo_model), "--chat", "-p",
                        "What is the capital of France?", "-n", "20", "--temperature", "0", "--device", "cpu",
                        "--json"], capture_output=True, text=True, env=ENV, check=False, timeout=600)
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and out["tokens"][-1] == 2 and "<|im_end|>" not in out["text"]


def _terminal_signals() -> None:
    """Ctrl-C as a terminal delivers it: a shell's background job (`cmd &`, as CI may run the tests) starts
    with SIGINT ignored, and Python keeps an ignored SIGINT, so the child would never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _chat_process(model: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sagekit", "chat", str(model), "--device", "cpu", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            preexec_fn=_terminal_signals)


def test_chat_keeps_the_conversation(tiny_chat_model):
    """Two turns in the terminal print what the API answers to the same growing conversation."""
    p = _chat_process(tiny_chat_model, "-n", "6", "--temperature", "0")
    out, errs = p.communicate(b"hello\nagain\n", timeout=300)
    assert p.returncode == 0, errs.decode()
    m = sagekit.load(tiny_chat_model, device="cpu")
    first = m.chat([{"role": "user", "content": "hello"}], max_new_tokens=6, temperature=0)
    second = m.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "again"}], max_new_tokens=6, temperature=0)
    assert out.decode() == f"\n> {first}\n\n> {second}\n\n> \n"


class _Output:
    """Collects a process's output as it comes, so a test can wait for a given point of a conversation."""

    def __init__(self, stream):
        self.data, self.changed = b"", threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(4096):
            with self.changed:
                self.data += chunk
                self.changed.notify_all()

    def wait_for(self, predicate) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.data), timeout=300), self.data[-500:]


def test_ctrl_c_stops_a_reply_not_the_program(tmp_path):
    model = write_chat_model(tmp_path / "long", max_position_embeddings=65536)
    p = _chat_process(model, "-n", "60000", "--temperature", "0")
    out, errs = _Output(p.stdout), _Output(p.stderr)
    for turn, line in enumerate((b"hello\n", b"again\n")):
        p.stdin.write(line)
        p.stdin.flush()
        out.wait_for(lambda d, n=turn + 1: d.count(b"\n> ") == n and not d.endswith(b"\n> "))  # reply started
        p.send_signal(signal.SIGINT)
        errs.wait_for(lambda d, n=turn + 1: d.count(b"(stopped)") == n)
    p.stdin.close()  # end of input at the prompt: the program ends normally
    out.wait_for(lambda d: d.count(b"\n> ") == 3)
    assert p.wait(timeout=300) == 0

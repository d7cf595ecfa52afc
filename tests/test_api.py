"""The Python API (sagekit.load / sagekit.compress) against the lower-level paths it wraps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sagekit
from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.errors import SagekitError
from sagekit.model.generate import generate
from sagekit.model.load import load_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
runner = CliRunner()


def test_import_sagekit_stays_cheap():
    code = "import sys, sagekit; print(sorted(m for m in ('numpy', 'numba', 'tokenizers', 'sagekit.api') " \
           "if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=False, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr
    assert callable(sagekit.load) and callable(sagekit.compress)


def test_generate_is_the_generation_loop_decoded(tiny_chat_model):
    m = sagekit.load(tiny_chat_model, device="cpu")
    ids = m.encode("The fox")
    reference = generate(load_model(tiny_chat_model, get_backend("cpu"), 64), ids, 20, temperature=0.0)
    assert m.generate("The fox", max_new_tokens=20, temperature=0) == m.tokenizer.decode(reference.tokens)
    reply = m.generate("The fox", max_new_tokens=20, temperature=0, stream=True)
    pieces = list(reply)
    assert reply.tokens == reference.tokens and "".join(pieces) == reply.text
    assert (reply.finish_reason, reply.prompt_tokens, reply.completion_tokens) == ("length", len(ids), 20)


def test_seed_decides_the_sampled_text(tiny_chat_model):
    m = sagekit.load(tiny_chat_model, device="cpu")
    a, b, c = (m.generate("x", max_new_tokens=16, temperature=1.0, seed=s) for s in (7, 7, 8))
    assert a == b and a != c


def test_chat_renders_the_template_and_answers(tiny_chat_model):
    m = sagekit.load(tiny_chat_model, device="cpu")
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert m.chat_prompt(messages) == "<system>sys\n<user>hi\n<assistant>"
    reply = m.chat(messages, max_new_tokens=5, temperature=0, stream=True).wait()
    assert reply.prompt_tokens == len("<system>sys\n<user>hi\n<assistant>")  # one byte token each
    assert reply.text == m.generate("<system>sys\n<user>hi\n<assistant>", max_new_tokens=5, temperature=0)


def test_perplexity_is_what_eval_reports(tiny_chat_model, tmp_path):
    text = "the quick brown fox jumps over the lazy dog; " * 6
    (tmp_path / "t.txt").write_text(text)
    r = runner.invoke(app, ["eval", str(tiny_chat_model), "--text", str(tmp_path / "t.txt"), "--seqlen", "64",
                            "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    ppl = sagekit.load(tiny_chat_model, device="cpu").perplexity(text, seqlen=64)
    assert ppl == pytest.approx(json.loads(r.stdout.strip().splitlines()[-1])["ppl"], rel=1e-6)


def test_a_new_reply_closes_the_unfinished_one(tiny_chat_model):
    m = sagekit.load(tiny_chat_model, device="cpu")
    whole = m.generate("abc", max_new_tokens=10, temperature=0)
    first = m.generate("xyz", max_new_tokens=50, temperature=0, stream=True)
    next(first)
    assert m.generate("abc", max_new_tokens=10, temperature=0) == whole  # the half-used cache is not read
    assert first.finish_reason == "cancelled" and list(first) == []


def test_the_cache_grows_with_the_requests(tmp_path):
    from conftest import write_chat_model

    path = write_chat_model(tmp_path / "m", max_position_embeddings=2048)
    m = sagekit.load(path, device="cpu")
    small = m.llm.cache_bytes
    long_prompt = "lorem ipsum dolor sit amet " * 30  # 810 byte tokens: past the first cache size
    reply = m.generate(long_prompt, max_new_tokens=40, temperature=0, stream=True).wait()
    assert m.llm.cache_bytes > small and m.context_length == 2048
    reference = generate(load_model(path, get_backend("cpu"), 2048), m.encode(long_prompt), 40, temperature=0.0)
    assert reply.tokens == reference.tokens


def test_bad_requests_are_one_line_errors(tiny_chat_model, tiny_model):
    m = sagekit.load(tiny_chat_model, device="cpu", context_length=64)
    with pytest.raises(SagekitError, match="exceed the context of 64"):
        m.generate("x" * 60, max_new_tokens=10)
    with pytest.raises(SagekitError, match="empty"):
        m.generate("", max_new_tokens=10)
    with pytest.raises(SagekitError, match="string 'role'"):
        m.chat([{"content": "no role"}])
    with pytest.raises(SagekitError, match="context_length must be"):
        sagekit.load(tiny_chat_model, device="cpu", context_length=10 ** 6)
    with pytest.raises(SagekitError, match="no chat template"):
        sagekit.load(tiny_model, device="cpu").chat([{"role": "user", "content": "hi"}])


def test_compress_is_the_default_command(tiny_model, tmp_path):
    report = sagekit.compress(tiny_model, tmp_path / "api")
    r = runner.invoke(app, ["compress", str(tiny_model), str(tmp_path / "cli"), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(json.dumps(report)) == json.loads((tmp_path / "api" / "report.json").read_text())
    for f in [tmp_path / "cli" / "config.json", *sorted((tmp_path / "cli").glob("*.safetensors"))]:
        assert (tmp_path / "api" / f.name).read_bytes() == f.read_bytes(), f.name
    packed_head = sagekit.compress(tiny_model, tmp_path / "head", head_bits=4)
    assert packed_head["totals"]["head_bits"] == 4 and packed_head["totals"]["head_bytes"] < report["totals"]["head_bytes"]
    with pytest.raises(SagekitError, match="--bitz applies to no method"):
        sagekit.compress(tiny_model, tmp_path / "x", bitz=3)
    with pytest.raises(SagekitError, match="--salient-bits applies to --method sage --recipe paper"):
        sagekit.compress(tiny_model, tmp_path / "x", salient_bits=3)


@pytest.mark.slow
def test_the_readme_one_liner_names_paris(demo_model):
    code = ("import sagekit; m = sagekit.load(); print(m.chat([{'role': 'user', 'content': 'What is the capital of "
            "France?'}], max_new_tokens=20, temperature=0))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=False, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout

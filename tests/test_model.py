"""The forward pass, KV cache and generation against slow, obvious references on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from sagekit.backend import get_backend
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.kernels.transformer_ops import swiglu
from sagekit.model.generate import generate
from sagekit.model.llama import silu_mul
from sagekit.model.load import load_model

from conftest import tiny_config


def reference_logits(ckpt: Checkpoint, tokens: np.ndarray) -> np.ndarray:
    """Textbook Llama in float64, one query at a time, KV heads repeated explicitly, no cache."""
    c = ckpt.config
    W = lambda n: ckpt.float32(n).astype(np.float64)  # noqa: E731
    H, KV, D = c.n_heads, c.n_kv_heads, c.head_dim
    inv = 1.0 / c.rope_theta ** (np.arange(0, D, 2) / D)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * w

    def rope(v, pos):  # v: (heads, D), HF layout: pair i with i + D/2
        ang = pos * inv
        cos, sin = np.cos(ang), np.sin(ang)
        a, b = v[:, : D // 2], v[:, D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    T = len(tokens)
    h = W("model.embed_tokens.weight")[tokens]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        x = rms(h, W(p + "input_layernorm.weight"))
        q = (x @ W(p + "self_attn.q_proj.weight").T).reshape(T, H, D)
        k = (x @ W(p + "self_attn.k_proj.weight").T).reshape(T, KV, D)
        v = (x @ W(p + "self_attn.v_proj.weight").T).reshape(T, KV, D)
        q = np.stack([rope(q[t], t) for t in range(T)])
        k = np.stack([rope(k[t], t) for t in range(T)])
        att = np.zeros((T, H, D))
        for t in range(T):
            for hd in range(H):
                kvh = hd // (H // KV)
                s = np.array([q[t, hd] @ k[j, kvh] for j in range(t + 1)]) / np.sqrt(D)
                pr = np.exp(s - s.max())
                pr /= pr.sum()
                att[t, hd] = pr @ v[: t + 1, kvh]
        h = h + att.reshape(T, H * D) @ W(p + "self_attn.o_proj.weight").T
        x = rms(h, W(p + "post_attention_layernorm.weight"))
        g = x @ W(p + "mlp.gate_proj.weight").T
        u = x @ W(p + "mlp.up_proj.weight").T
        h = h + (g / (1 + np.exp(-g)) * u) @ W(p + "mlp.down_proj.weight").T
    h = rms(h, W("model.norm.weight"))
    head = W("model.embed_tokens.weight") if c.tie_embeddings else W("lm_head.weight")
    return h @ head.T


CASES = {
    "gqa-f32": dict(config=tiny_config(), bf16=False, shards=1),
    "gqa-bf16-sharded": dict(config=tiny_config(), bf16=True, shards=3),
    "mha-tied-f32-sharded": dict(config=tiny_config(num_key_value_heads=4, tie_word_embeddings=True), bf16=False,
                                 shards=2),
    "mqa-tied-bf16": dict(config=tiny_config(num_key_value_heads=1, tie_word_embeddings=True), bf16=True, shards=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(tmp_path, case):
    spec = CASES[case]
    path = write_random_checkpoint(tmp_path / case, spec["config"], seed=3, bf16=spec["bf16"], shards=spec["shards"],
                                   std=0.2)
    tokens = np.random.default_rng(1).integers(0, spec["config"]["vocab_size"], 37)
    model = load_model(path, get_backend("cpu"), max_seq_len=64)
    got = model.forward(tokens, 0)
    with Checkpoint(path) as ckpt:
        want = reference_logits(ckpt, tokens)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_prefill_in_pieces_equals_one_prefill(tiny_model):
    """The cache must make [a] then [b] equal to [a b] (positions, masks and RoPE offsets line up)."""
    tokens = np.random.default_rng(2).integers(0, 300, 150)
    model = load_model(tiny_model, get_backend("cpu"), max_seq_len=160)
    whole = model.forward(tokens, 0)
    first = model.forward(tokens[:70], 0)
    rest = model.forward(tokens[70:], 70)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=1e-4, atol=1e-4)


def test_greedy_generation_with_cache_equals_without(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", tiny_config(), seed=5, std=0.3)
    model = load_model(path, get_backend("cpu"), max_seq_len=64)
    prompt = [5, 17, 42, 99]
    cached = generate(model, prompt, 20, temperature=0.0).tokens
    uncached = generate(model, prompt, 20, temperature=0.0, use_cache=False).tokens
    assert cached == uncached
    assert len(set(cached)) > 1, "a degenerate model that repeats one token would make this test vacuous"


def test_sampling_is_deterministic_for_a_seed(tiny_model):
    model = load_model(tiny_model, get_backend("cpu"), max_seq_len=64)
    a = generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=7).tokens
    b = generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=7).tokens
    c = generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=8).tokens
    assert a == b and a != c


def test_llama3_rope_scaling_keeps_high_and_scales_low_frequencies():
    from sagekit.format.config import LlamaConfig

    base = LlamaConfig.from_hf(tiny_config(hidden_size=512, num_attention_heads=4, rope_theta=500000.0))
    scaled = LlamaConfig.from_hf(tiny_config(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}))
    b, s = np.array(base.rope_inv_freq()), np.array(scaled.rope_inv_freq())
    wavelen = 2 * np.pi / b
    assert np.allclose(s[wavelen < 8192 / 4], b[wavelen < 8192 / 4])
    assert np.allclose(s[wavelen > 8192], b[wavelen > 8192] / 8.0)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and np.all((s[mid] < b[mid]) & (s[mid] > b[mid] / 8.0))


@pytest.mark.parametrize("kernel", ["numpy", "numba"])
def test_silu_mul_is_accurate_and_never_overflows(kernel):
    """SwiGLU's gate, NumPy's array calls and the CPU kernel: float32-accurate against float64, and no
    overflow warning past g = -88 (e^-g is inf)."""
    g = np.concatenate([np.linspace(-30, 30, 601), [-1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4]]).astype(np.float32)
    g = g.reshape(2, -1)
    u = np.random.default_rng(0).uniform(-2, 2, g.shape).astype(np.float32)
    with np.errstate(all="raise"):
        got = silu_mul(np, g, u) if kernel == "numpy" else swiglu(g, u)
    g64 = g.astype(np.float64)
    ref = g64 * np.exp(-np.logaddexp(0.0, -g64)) * u  # g * sigmoid(g) * u, computed without overflow
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-30)


def _rss_anon_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no RssAnon in /proc/self/status")


def test_cpu_cache_is_resident_only_where_written():
    """A KV cache sized for many tokens holds memory for the tokens written: 256 slots of (512, 128) float32,
    one position written in each, is 1 MiB of pages, not the 64 MiB of the whole (NumPy's zeros ask for 2 MiB
    pages above 4 MiB, which made a 512-token cache resident in full at the first token)."""
    backend = get_backend("cpu")
    before = _rss_anon_kib()
    cache = backend.zeros((256, 512, 128), np.float32)
    assert cache.shape == (256, 512, 128) and cache.dtype == np.float32 and not cache.any()
    cache[:, 0] = 1.0
    grown = _rss_anon_kib() - before
    assert cache.sum() == 256 * 128
    assert grown < 8 * 1024, f"{grown} KiB resident after writing 128 KiB"

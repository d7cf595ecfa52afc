"""A compressed model run by the packed kernels equals the same model run by dequantising on use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sagekit.backend import get_backend
from sagekit.eval.perplexity import evaluate
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.generate import generate
from sagekit.model.linear import DequantLinear, SageLinear
from sagekit.model.load import load_model
from sagekit.model.tokenizer import load_tokenizer
from sagekit.quant.compress import CompressOptions, compress
from sagekit.quant.sage import SageKnobs

from conftest import tiny_config


@pytest.mark.parametrize("target", [None, 3.0])
def test_kernels_match_the_dequantized_reference_on_a_tiny_model(tmp_path, target):
    src = write_random_checkpoint(tmp_path / "m", tiny_config(hidden_size=96, intermediate_size=200), seed=4, std=0.3)
    out = tmp_path / "packed"
    compress(src, out, CompressOptions(method="sage-paper", knobs=SageKnobs(rate_penalty=0.01), target_bpw=target))
    be = get_backend("cpu")
    fast, ref = load_model(out, be, 80), load_model(out, be, 80, kernels=False)
    assert isinstance(fast.layers[0].q, SageLinear) and isinstance(ref.layers[0].q, DequantLinear)
    tokens = np.random.default_rng(0).integers(0, 300, 70)
    a, b = fast.forward(tokens, 0), ref.forward(tokens, 0)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert generate(fast, [3, 1, 4], 8).tokens == generate(ref, [3, 1, 4], 8).tokens


@pytest.fixture(scope="session")
def demo_packed(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "sage"
    compress(demo_model, out, CompressOptions(method="sage-paper", knobs=SageKnobs(rate_penalty=0.02)))
    return out


def test_compressed_demo_model_kernels_match_reference(demo_packed, wiki_test):
    """Issue 5 acceptance 3: identical greedy continuations for 3 prompts and ppl within 0.1%."""
    be = get_backend("cpu")
    fast, ref = load_model(demo_packed, be, 512), load_model(demo_packed, be, 512, kernels=False)
    tok = load_tokenizer(demo_packed)
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        ids = tok.encode(prompt).ids
        assert generate(fast, ids, 12).tokens == generate(ref, ids, 12).tokens, prompt
    text = np.asarray(tok.encode(wiki_test.read_text(encoding="utf-8")[:20000]).ids)
    pf, pr = evaluate(fast, text, 512, 2).ppl, evaluate(ref, text, 512, 2).ppl
    assert abs(pf - pr) / pr < 1e-3, (pf, pr)


def test_bench_json_has_every_documented_field():
    """`sagekit bench --shape tiny --json`: the fields issue 5 names, each round recorded, packed bytes counted."""
    from typer.testing import CliRunner

    from sagekit.cli import app

    r = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--decode-tokens", "2", "--prefill-tokens", "4",
                                 "--repeats", "1", "--rounds", "2", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output.strip().splitlines()[-1])
    for key in ("matrices", "decode_tok_s", "dense_decode_tok_s", "prefill_tok_s", "dense_prefill_tok_s", "device",
                "decode_depth_tok_s", "dense_decode_depth_tok_s"):
        assert key in d
    assert d["depth"] == 4 and d["decode_depth_tok_s"] > 0
    assert len(d["rounds"]["dense_decode"]) == 2 and d["decode_tok_s"] > 0
    m = d["matrices"][0]
    assert {"name", "shape", "ms", "dense_ms", "bare_ms", "gbps", "peak_fraction", "flags"} <= set(m)
    assert m["gbps"] == pytest.approx(m["packed_bytes"] / (m["ms"] / 1e3) / 1e9)
    assert m["bare_ms"] > 0 and isinstance(m["flags"], list)


def test_bench_refuses_an_uncompressed_folder(tiny_model):
    from typer.testing import CliRunner

    from sagekit.cli import app

    r = CliRunner().invoke(app, ["bench", str(tiny_model), "--device", "cpu"])
    assert r.exit_code == 1 and "is not compressed" in r.output and "dense against dense" in r.output, r.output


def test_bench_flags_a_dense_twin_slower_than_a_bare_matmul():
    """A dense twin that sleeps is caught by the same-run bare matmul, not reported as a speedup."""
    import time

    from sagekit.backend import get_backend
    from sagekit.eval.speed import matrix_speed, random_pair

    pair = random_pair("tiny", get_backend("cpu"), 16, 1, 1, 0.01)
    lin = pair.dense.layers[0].q

    class Slow:
        weight, in_features, out_features = lin.weight, lin.in_features, lin.out_features

        def __call__(self, x):
            time.sleep(0.002)
            return lin(x)

    pair.dense.layers[0].q = Slow()
    q = next(m for m in matrix_speed(pair, 3) if m["name"].endswith("q_proj"))
    assert any("slower than a bare matmul" in f for f in q["flags"])

"""The CuPy path: the same model code on the GPU must agree with the CPU. Skipped without a CUDA GPU.

Two tests run GPU code paths through NumPy on the CPU, so they are exercised in CI: the float16 dtype policy, and
the held positions the graphed decode step (sagekit.model.decode_graph) runs at.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import Backend, get_backend, gpu_available
from sagekit.cli import app
from sagekit.model.generate import generate
from sagekit.model.load import load_model

gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


def test_float16_policy_matches_float32_on_cpu(tiny_model):
    """Backend with float16 weights/activations (the GPU policy) through NumPy: same logits within fp16 noise."""
    tokens = np.random.default_rng(0).integers(0, 300, 40)
    ref_model = load_model(tiny_model, get_backend("cpu"), 64)
    half_model = load_model(tiny_model, Backend("cpu", np, np.float16), 64)
    ref, half = ref_model.forward(tokens, 0), half_model.forward(tokens, 0)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, ref, rtol=0, atol=2e-2 * np.abs(ref).max())
    ref, half = ref_model.forward(tokens[:1], 40), half_model.forward(tokens[:1], 40)  # a decode step
    np.testing.assert_allclose(half, ref, rtol=0, atol=2e-2 * np.abs(ref).max())


@pytest.mark.gpu
@gpu
def test_gpu_forward_and_greedy_match_cpu(tiny_model):
    tokens = np.random.default_rng(0).integers(0, 300, 40)
    cpu = load_model(tiny_model, get_backend("cpu"), 64)
    cuda = load_model(tiny_model, get_backend("cuda"), 64)
    a, b = cpu.forward(tokens, 0), cuda.backend.to_numpy(cuda.forward(tokens, 0))
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * np.abs(a).max())
    assert generate(cpu, [1, 2, 3], 10).tokens == generate(cuda, [1, 2, 3], 10).tokens


@pytest.mark.gpu
@gpu
def test_gpu_eval_agrees_with_cpu_on_the_demo_model(demo_model, wiki_test):
    runner = CliRunner()
    res = {}
    for device in ("cpu", "cuda"):
        r = runner.invoke(app, ["eval", str(demo_model), "--text", str(wiki_test), "--max-windows", "2",
                                "--device", device, "--json"])
        assert r.exit_code == 0, r.output
        res[device] = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    assert abs(res["cuda"] - res["cpu"]) / res["cpu"] < 1e-3, res


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_held_positions_run_as_int_positions_on_cpu(tiny_model, dtype):
    """A token at a position held in an int32 array (RoPE row gathered, KV stored by index, attention over every
    cache slot with those past the position masked) gives the residual stream of the same token at an int."""
    be = Backend("cpu", np, dtype)
    at_int, at_held = load_model(tiny_model, be, 24), load_model(tiny_model, be, 24)
    for pos, token in enumerate(np.random.default_rng(1).integers(0, 300, 12)):
        a = b = at_int.embed_tokens(np.array([token]))
        for i in range(len(at_int.layers)):
            a, b = at_int.block(i, a, pos), at_held.block(i, b, np.array([pos], dtype=np.int32))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    for held, want in ((at_held.state.cache_k, at_int.state.cache_k), (at_held.state.cache_v, at_int.state.cache_v)):
        np.testing.assert_allclose(held.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-5)


def _greedy(model, prompt, n):
    """n greedy tokens after prompt, and the logits of every step (one token at a time after the prompt)."""
    logits, out, steps = model.forward(prompt, 0, last_only=True), [], []
    for i in range(n):
        steps.append(model.backend.to_numpy(logits)[-1])
        out.append(int(steps[-1].argmax()))
        logits = model.forward(np.array(out[-1:]), len(prompt) + i, last_only=True)
    return out, np.stack(steps)


def _compressed(tiny_model, folder, *recipe):
    r = CliRunner().invoke(app, ["compress", str(tiny_model), str(folder), *recipe, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return folder


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("recipe", [("--recipe", "vq", "--dim", "4"), ("--bits", "3"), ("--recipe", "paper")])
def test_graphed_decode_step_matches_eager_and_the_cpu(tiny_model, tmp_path, recipe):
    """The CUDA-graph decode step (codebook or sage GEMV kernels, the device rotation, the held-position KV store
    and attention) against the eager GPU path token for token and against the CPU's greedy tokens; after the
    cache is reallocated (reserve) the graph is captured again and still agrees."""
    from sagekit.model.decode_graph import DecodeGraph

    folder = _compressed(tiny_model, tmp_path / "packed", *recipe)
    model = load_model(folder, get_backend("cuda"), 40)
    graph = model.decode_plan
    assert isinstance(graph, DecodeGraph)
    prompt = np.array([5, 17, 99])
    got, got_logits = _greedy(model, prompt, 20)
    first = graph.graph
    assert first is not None
    model.decode_plan = None
    want, want_logits = _greedy(model, prompt, 20)
    assert got == want
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-3 * np.abs(want_logits).max())
    assert got[:10] == _greedy(load_model(folder, get_backend("cpu"), 40), prompt, 10)[0]  # FP16 against FP32
    model.decode_plan = graph
    model.reserve(80)
    again, _ = _greedy(model, prompt, 20)
    assert again == want and graph.graph is not first


@pytest.mark.gpu
@gpu
def test_a_dense_model_decodes_through_the_graph_too(tiny_model):
    """FP16 matrices go through sagekit's own GEMV at one token, so a dense model gets a graph as well."""
    model = load_model(tiny_model, get_backend("cuda"), 40)
    graph = model.decode_plan
    assert graph is not None
    got = _greedy(model, np.array([1, 2]), 12)
    model.decode_plan = None
    want = _greedy(model, np.array([1, 2]), 12)
    assert got[0] == want[0] and graph.graph is not None
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-3 * np.abs(want[1]).max())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("out,in_", [(1, 8), (37, 70), (300, 576), (11008, 4096)])
def test_dense_gemv_matches_numpy(out, in_):
    from sagekit.kernels import dense_cuda

    rng = np.random.default_rng(out)
    w, x = rng.standard_normal((out, in_)).astype(np.float16), rng.standard_normal(in_).astype(np.float16)
    cp = get_backend("cuda").xp
    got = dense_cuda.gemv(cp.asarray(w), cp.asarray(x)).get().astype(np.float64)
    ref = w.astype(np.float64) @ x.astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * (np.abs(w.astype(np.float64)) @ np.abs(x)).max())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads,kv,dim,seq", [(9, 3, 64, 700), (32, 8, 128, 300), (4, 4, 80, 20000)])
def test_held_attention_kernel_matches_numpy(heads, kv, dim, seq):
    """The CUDA kernel against the NumPy math, at the first, a middle and the last position; 20,000 positions
    need more than the 48 KiB of shared memory a kernel gets unasked."""
    from sagekit.kernels import held_position

    rng = np.random.default_rng(dim)
    q = (rng.standard_normal((heads, dim)) / np.sqrt(dim)).astype(np.float32)
    keys, values = (rng.standard_normal((kv, seq, dim)).astype(np.float16) for _ in range(2))
    cp = get_backend("cuda").xp
    for pos in (0, seq // 3, seq - 1):
        at = np.array([pos], dtype=np.int32)
        want = held_position.attention(q, keys, values, at)
        got = held_position.attention(cp.asarray(q), cp.asarray(keys), cp.asarray(values), cp.asarray(at)).get()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(values).max())

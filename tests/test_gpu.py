"""The CuPy path: the same model code on the GPU must agree with the CPU. Skipped without a CUDA GPU.

One test runs the GPU's float16 dtype policy through NumPy on the CPU, so its casts are exercised in CI.
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

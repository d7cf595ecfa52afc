"""The codebook RawKernels (sagekit.kernels.codebook_cuda, issue 14) against the dequantised weight, on the
GPU: every vq run length and grid width, odd shapes, decode and prefill; the device rotation; a packed model
on the GPU against the CPU. Skipped without a CUDA GPU (codebook.cu's compile check runs in test_kernels)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_grid, random_vq

from sagekit.backend import get_backend, gpu_available
from sagekit.format import rotation
from sagekit.format.sage_vq import DIMS
from sagekit.model.linear import GridLinear
from sagekit.model.load import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]


def _check(packed, tokens: int) -> None:
    be = get_backend("cuda")
    lin = GridLinear(packed, be)
    x = np.random.default_rng(tokens).standard_normal((tokens, packed.shape[1])).astype(np.float16)
    w = packed.unpack().astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    got = be.to_numpy(lin(be.xp.asarray(x))).astype(np.float64)
    assert got.shape == ref.shape
    # FP16 rotation, weights (prefill) and output: errors scale with the terms summed, not with the sum
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * (np.abs(x.astype(np.float64)) @ np.abs(w).T).max())


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("out", [1, 37, 300])
@pytest.mark.parametrize("tokens", [1, 70])
def test_vq_on_the_gpu_runs_as_its_dequantised_weight(dim, out, tokens):
    _check(random_vq((out, 24 * dim), dim, seed=dim + out), tokens)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(40, 72), (17, 33)])
@pytest.mark.parametrize("tokens", [1, 9])
def test_grids_on_the_gpu_run_as_their_dequantised_weight(bits, shape, tokens):
    _check(random_grid(shape, bits, seed=bits), tokens)


@pytest.mark.parametrize("rows", [1, 5])
def test_device_rotation_is_the_cpu_rotation(rows):
    """Many rows on cuBLAS, one (the graphed decode step's) on broadcast products and sums."""
    from sagekit.kernels import codebook_cuda

    x = np.random.default_rng(0).standard_normal((rows, 576)).astype(np.float32)
    got = get_backend("cuda").to_numpy(codebook_cuda.rotate(get_backend("cuda").xp.asarray(x), 7))
    np.testing.assert_allclose(got, rotation.rotate(x, 7), rtol=0, atol=1e-2 * np.abs(x).max())


def test_a_vq_model_on_the_gpu_matches_the_cpu(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from sagekit.cli import app

    out = tmp_path / "vq"
    r = CliRunner().invoke(app, ["compress", str(tiny_model), str(out), "--recipe", "vq", "--dim", "4",
                                      "--device", "cpu"])
    assert r.exit_code == 0, r.output
    tokens = np.random.default_rng(0).integers(0, 300, 40)
    cpu = load_model(out, get_backend("cpu"), 64).forward(tokens, 0)
    cuda = load_model(out, get_backend("cuda"), 64)
    assert any(isinstance(L.q, GridLinear) and L.q.kernel == "gpu" for L in cuda.layers)
    got = cuda.backend.to_numpy(cuda.forward(tokens, 0))
    np.testing.assert_allclose(got, cpu, rtol=0, atol=3e-2 * np.abs(cpu).max())

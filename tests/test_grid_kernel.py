"""Symmetric grid levels on the packed `sage` LUT kernel (issue 14): the codes as a sign plane and
magnitude-id planes, row scales after, the rotation before; checked against the dequantised weight."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.linear import GridLinear
from sagekit.model.load import load_model
from sagekit.quant import sage_grid

from conftest import tiny_config


def _grid(bits: int, shape: tuple[int, int], levels: str = "symmetric", rotate: bool = True, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal(shape)
    return sage_grid.quantize(w, None, "x.o_proj", bits=bits, levels=levels, rotate=rotate)[0]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("in_", [72, 50, 33])
def test_symmetric_levels_are_a_sign_times_a_magnitude(bits, in_):
    p = _grid(bits, (24, in_), rotate=False, seed=bits)
    sage = p.as_sage()
    assert sage is not None and sage.n_groups == 1 << (bits - 1) and sage.nnz == 0
    np.testing.assert_array_equal(sage.unpack(), p.levels.astype(np.float32)[p.indices()])


def test_free_levels_are_not_taken_for_symmetric_ones():
    assert _grid(2, (16, 64), levels="lloyd").as_sage() is None
    assert _grid(3, (16, 64), levels="uniform").as_sage() is not None  # uniform levels are mirrored too


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(40, 72), (37, 50), (300, 96)])
@pytest.mark.parametrize("tokens", [1, 3, 70])
def test_the_lut_kernel_runs_the_grid_as_its_dequantised_weight(bits, shape, tokens):
    p = _grid(bits, shape, seed=bits + shape[0])
    lin = GridLinear(p, get_backend("cpu"))
    assert lin.kernel == "lut"
    x = np.random.default_rng(tokens).standard_normal((tokens, shape[1])).astype(np.float32)
    ref = x @ p.unpack().T
    np.testing.assert_allclose(lin(x), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    np.testing.assert_allclose(lin.rows(np.array([0, 5])), p.rotated(np.array([0, 5])))


def test_the_kernel_holds_the_codes_at_about_their_stored_size():
    p = _grid(2, (576, 1536))
    lin = GridLinear(p, get_backend("cpu"))
    assert lin.nbytes <= 1.05 * p.nbytes


def test_six_bit_symmetric_levels_fall_back_to_fp16():
    """32 magnitudes are past the CPU LUT kernel's 16 groups: the FP16 runtime takes them."""
    lin = GridLinear(_grid(6, (8, 64)), get_backend("cpu"))
    assert lin.kernel == "half"


def test_a_symmetric_folder_runs_packed_as_it_runs_dequantised(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", tiny_config(), seed=5, std=0.05)
    r = CliRunner().invoke(app, ["compress", str(src), str(tmp_path / "out"), "--bits", "3", "--levels",
                                 "symmetric", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    be = get_backend("cpu")
    fast, ref = load_model(tmp_path / "out", be, 64), load_model(tmp_path / "out", be, 64, kernels=False)
    assert fast.layers[0].q.kernel == "lut"
    tokens = np.arange(1, 30)
    np.testing.assert_allclose(fast.forward(tokens), ref.forward(tokens), rtol=1e-2, atol=1e-2)


def test_linears_that_read_one_input_rotate_it_once(monkeypatch):
    """run_shared: grid and vq matrices of one rotation seed (q|k|v, gate|up) take one R x; other seeds each
    their own; the products are those of separate calls either way."""
    from conftest import random_grid, random_vq

    from sagekit.format import rotation
    from sagekit.model.linear import run_shared

    be = get_backend("cpu")
    same = [GridLinear(random_grid((32, 64), 3, 0), be), GridLinear(random_grid((16, 64), 4, 1), be)]
    other = [same[0], GridLinear(random_vq((8, 64), 4, seed=5), be)]
    assert same[0].rotation_seed == same[1].rotation_seed != other[1].rotation_seed
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    calls = []
    rotate = rotation.rotate
    monkeypatch.setattr(rotation, "rotate", lambda v, seed: calls.append(seed) or rotate(v, seed))
    for group, rotations in ((same, 1), (other, 2)):
        calls.clear()
        outs = run_shared(x, *group)
        assert len(calls) == rotations
        for lin, y in zip(group, outs, strict=True):
            np.testing.assert_array_equal(y, lin(x))

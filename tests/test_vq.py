"""The vq recipe (issue 13, step 8): a 256-entry codebook per matrix for runs of D rotated weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.format.sage_vq import PackedVQ, vq_nbytes
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.generate import generate
from sagekit.model.load import load_model
from sagekit.quant import sage_grid, sage_vq
from sagekit.quant.registry import PlanJob

from conftest import tiny_config
from test_baselines import calibration_text, correlated_inputs, hessian, stored_bytes

runner = CliRunner()


def test_a_codebook_beats_the_best_scalar_levels_at_two_bits():
    """On Gaussian-like weights 256 codewords of 4 weights code with ~17% less error than 4 Lloyd levels."""
    w = np.random.default_rng(0).standard_normal((128, 576)).astype(np.float32)
    err = lambda p: float(np.mean((w - p.unpack()) ** 2) / np.mean(w * w))  # noqa: E731
    vq, _ = sage_vq.quantize(w, None, "x.q_proj", dim=4)
    scalar, _ = sage_grid.quantize(w, None, "x.q_proj", bits=2)
    assert err(vq) < 0.9 * err(scalar)
    assert 8 * (vq.nbytes - 256 * 4 - 2) / w.size == pytest.approx(2 + (16 + 32 / 128) / 576, abs=1e-9)


def test_the_int8_codebook_is_the_one_the_quantiser_coded_with():
    """The stored codewords (int8 times the FP16 step) reproduce the quantiser's own reconstruction."""
    w = np.random.default_rng(2).standard_normal((32, 96))
    wr = sage_grid.rotated_problem(w, None, "x.q_proj", 0, True, False, False)[1]
    scales, book = sage_vq.fit(wr, 4, None, 7)
    packed = sage_vq.pack_vq(sage_vq.codes_of(wr, scales, book), scales, book, None)
    assert packed.codebook.dtype == np.int8 and np.abs(packed.codebook).max() == 127
    np.testing.assert_array_equal(packed.codewords(), book.astype(np.float32))


def test_act_order_moves_whole_runs_by_energy():
    diag = np.array([1, 1, 9, 9, 5, 0, 2, 2.0])
    order = sage_vq.run_order(diag, 2)
    assert order.tolist() == [2, 3, 4, 5, 6, 7, 0, 1]  # run energies 2, 18, 5, 4


def test_act_order_codes_the_same_runs_it_was_given():
    """With act-order, each stored code still covers its own run: a Hessian that is diagonal (no error to
    pass on) gives the same codes in any order."""
    w = np.random.default_rng(3).standard_normal((16, 64))
    h = np.diag(np.random.default_rng(4).uniform(0.5, 5.0, 64))
    a, _ = sage_vq.quantize(w, h, "x.o_proj", dim=4, rotate=False, act_order=True)
    b, _ = sage_vq.quantize(w, h, "x.o_proj", dim=4, rotate=False, act_order=False)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_run_wise_error_feedback_beats_plain_coding_on_a_planted_problem():
    rng = np.random.default_rng(4)
    x = correlated_inputs(2048, 256, seed=5).astype(np.float64)
    w = 0.05 * rng.standard_normal((64, 256))
    h = hessian(x)
    fed, _ = sage_vq.quantize(w, h, "x.o_proj", dim=4)
    plain, _ = sage_vq.quantize(w, h, "x.o_proj", dim=4, error_feedback=False)
    err = lambda p: np.linalg.norm(x @ (w - p.unpack()).T)  # noqa: E731
    assert err(fed) < 0.85 * err(plain)


@pytest.mark.parametrize("field,corrupt", [
    ("codes", lambda a: a.astype(np.uint16)),
    ("codebook", lambda a: np.concatenate([a, a[:, :1]], axis=1)),  # runs of 5 are not a layout
    ("codebook", lambda a: a[:128]),
    ("scale", lambda a: np.full_like(a, np.inf)),
    ("book_scale", lambda a: np.full_like(a, np.nan)),
    ("codebook", lambda a: a.astype(np.float16)),
    ("rot", lambda a: np.concatenate([a, a])),
])
def test_corrupt_vq_fields_are_named(field, corrupt):
    packed, _ = sage_vq.quantize(np.random.default_rng(1).standard_normal((4, 72)), None, "x.q_proj", dim=4)
    assert packed.nbytes == vq_nbytes(4, 72, 4)
    arrays = packed.arrays()
    arrays[field] = corrupt(arrays[field])
    with pytest.raises(ValueError, match=field):
        PackedVQ.from_arrays(arrays, packed.shape)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", tiny_config(), seed=11, std=0.05)


@pytest.mark.parametrize("args", [[], ["--dim", "2"], ["CALIB"]])
def test_vq_folder_counts_its_bytes_and_runs(tiny_src, tmp_path, args):
    if args == ["CALIB"]:
        args = ["--calib", str(calibration_text(tmp_path / "calib.txt")), "--calib-samples", "4",
                "--calib-seqlen", "32"]
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", str(tiny_src), str(out), "--recipe", "vq", "--device", "cpu", "--json", *args])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "sage-vq"
    stored = stored_bytes(out)
    for m in report["matrices"]:
        assert m["nbytes"] == sum(v for k, v in stored.items() if k.startswith(m["name"] + "."))
    be = get_backend("cpu")
    fast, ref = load_model(out, be, 64), load_model(out, be, 64, kernels=False)
    assert type(fast.layers[0].q).__name__ == "GridLinear"
    tokens = np.arange(1, 30)
    np.testing.assert_allclose(fast.forward(tokens), ref.forward(tokens), rtol=1e-2, atol=1e-2)
    assert len(generate(fast, [1, 2, 3], 5, temperature=0.0).tokens) == 5


@pytest.mark.parametrize("args,message", [
    (["--recipe", "vq", "--dim", "3"], "not a multiple of --dim 3"),
    (["--recipe", "vq", "--dim", "5"], "--dim must be one of 2, 3, 4, 6, 8"),
    (["--dim", "4"], "--dim applies to --method sage --recipe vq, not to --method sage --recipe grid"),
    (["--recipe", "vq", "--bits", "2"], "--bits applies to"),
])
def test_bad_vq_options_are_one_line_errors(tiny_src, tmp_path, args, message):
    r = runner.invoke(app, ["compress", str(tiny_src), str(tmp_path / "out"), "--device", "cpu", *args])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", [1.5, 2.0, 2.55, 3.05, 3.5])
def test_the_run_length_allocation_lands_on_target(target):
    from test_grid import DEMO_SHAPES

    job = PlanJob(DEMO_SHAPES, target, sage_vq.VQKnobs(), map_weights=None)
    dims = {n: k["dim"] for n, k in sage_vq.plan(job)["matrix_knobs"].items()}
    true_bpw = 8 * sum(vq_nbytes(*DEMO_SHAPES[n], d) for n, d in dims.items()) / sum(
        o * i for o, i in DEMO_SHAPES.values())
    assert target - 0.03 <= true_bpw <= target
    if target == 2.55:
        assert {3, 4} <= set(dims.values())  # a fractional target mixes run lengths


def test_vq_target_bpw_writes_the_allocated_run_lengths(tiny_src, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", str(tiny_src), str(out), "--recipe", "vq", "--target-bpw", "4.8",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["linear_true_bpw"] <= 4.8
    assert len({m["paper_bits"] for m in report["matrices"]}) > 1  # the tiny model's budget mixes run lengths
    model = load_model(out, get_backend("cpu"), 64)
    assert len(generate(model, [1, 2, 3], 5, temperature=0.0).tokens) == 5

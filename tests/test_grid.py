"""The grid recipe (issue 13): rotation, Lloyd levels, LDLQ error feedback, bit allocation, packed layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sagekit.backend import get_backend
from sagekit.errors import SagekitError
from sagekit.eval.perplexity import evaluate
from sagekit.format import rotation
from sagekit.format.sage_grid import PackedGrid, grid_nbytes
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.generate import generate
from sagekit.model.load import load_model
from sagekit.quant import grid, sage_grid
from sagekit.quant.allocation import allocate

from conftest import tiny_config
from test_baselines import calibration_text, correlated_inputs, hessian, stored_bytes


@pytest.mark.parametrize("n", [576, 1536, 192, 40, 7, 1])
def test_rotation_is_orthogonal_and_its_fast_form_matches_the_matrix(n):
    r = rotation.matrix(n, seed=5)
    assert np.abs(r @ r.T - np.eye(n)).max() < 1e-12
    x = np.random.default_rng(0).standard_normal((3, n))
    assert np.allclose(rotation.rotate(x, 5), x @ r.T, atol=1e-12)
    assert np.allclose(rotation.unrotate(rotation.rotate(x, 5), 5), x, atol=1e-12)
    assert rotation.split(n)[0] * rotation.split(n)[1] == n


def test_rotations_differ_by_seed_and_repeat_for_the_same_seed():
    assert np.array_equal(rotation.matrix(48, 1), rotation.matrix(48, 1))
    assert not np.allclose(rotation.matrix(48, 1), rotation.matrix(48, 2))


def test_runtime_use_of_the_rotation_reproduces_x_w_t():
    """y = (R x) against the stored grid W R^T equals x @ W_hat.T, W_hat the unrotated weight."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 96)).astype(np.float32)
    packed, _ = sage_grid.quantize(w, None, "model.layers.0.self_attn.q_proj", bits=3)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    rotated_x = rotation.rotate(x.astype(np.float64), int(packed.rot[0]))
    y_runtime = rotated_x @ packed.rotated().astype(np.float64).T
    assert np.allclose(y_runtime, x @ packed.unpack().T, rtol=1e-4, atol=1e-4)


def test_lloyd_levels_reach_the_gaussian_optimum():
    v = np.random.default_rng(2).standard_normal(200_000)
    for bits, mse in [(1, 0.3634), (2, 0.1175), (3, 0.03454)]:
        levels = grid.lloyd(v, 1 << bits)
        err = np.mean((v - levels[grid.nearest(v, levels)]) ** 2)
        assert err == pytest.approx(mse, rel=0.03)


def test_error_feedback_beats_plain_rounding_on_a_planted_problem():
    """Correlated inputs with outlier channels (H far from diagonal): LDLQ lowers ||X W^T - X W_hat^T||."""
    rng = np.random.default_rng(4)
    x = correlated_inputs(2048, 256, seed=5).astype(np.float64)
    w = 0.05 * rng.standard_normal((64, 256))
    h = hessian(x).astype(np.float64)
    scales, levels = grid.fit(w, 2)
    plain = scales[:, None] * levels[grid.round_codes(w, scales, levels)]
    codes, fed_scales = grid.ldlq(w, h, scales, levels)
    fed_back = fed_scales[:, None] * levels[codes]
    err = lambda w_hat: np.linalg.norm(x @ (w - w_hat).T)  # noqa: E731
    assert err(fed_back) < 0.8 * err(plain)


def test_shared_inputs_share_one_rotation():
    seed = lambda proj: sage_grid.rotation_seed(0, f"model.layers.3.{proj}")  # noqa: E731
    assert seed("self_attn.q_proj") == seed("self_attn.k_proj") == seed("self_attn.v_proj")
    assert seed("mlp.gate_proj") == seed("mlp.up_proj")
    assert len({seed("self_attn.q_proj"), seed("self_attn.o_proj"), seed("mlp.up_proj"), seed("mlp.down_proj")}) == 4
    assert sage_grid.rotation_seed(0, "model.layers.3.mlp.up_proj") != sage_grid.rotation_seed(1, "model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_packed_grid_stores_what_it_counts_and_unpacks_the_quantizers_weight(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((10, 70)).astype(np.float32)
    packed, stats = sage_grid.quantize(w, None, "m.layers.0.mlp.down_proj", bits=bits)
    assert packed.nbytes == grid_nbytes(10, 70, bits) == stats.nbytes
    assert stats.true_bits == pytest.approx(8 * packed.nbytes / w.size)
    again = PackedGrid.from_arrays(packed.arrays(), packed.shape)
    assert np.array_equal(again.unpack(), packed.unpack())
    assert len(np.unique(packed.indices())) <= 1 << bits


@pytest.mark.parametrize("field,corrupt", [
    ("codes", lambda a: a[:-1]),
    ("codes", lambda a: a | np.uint32(1 << 31)),  # in = 70: bits of columns >= 70 are padding
    ("scale", lambda a: np.full_like(a, np.nan)),
    ("levels", lambda a: a[:-1]),
    ("levels", lambda a: np.concatenate([a, a])),  # 8 levels need 3 code planes, not 2
    ("rot", lambda a: a.astype(np.int32)),
])
def test_corrupt_grid_fields_are_named(field, corrupt):
    packed, _ = sage_grid.quantize(np.ones((4, 70), np.float32), None, "x.q_proj", bits=2)
    arrays = packed.arrays()
    arrays[field] = corrupt(arrays[field])
    with pytest.raises(ValueError, match="codes" if field == "levels" and len(arrays[field]) == 8 else field):
        PackedGrid.from_arrays(arrays, packed.shape)


DEMO_SHAPES = {f"model.layers.{i}.{n}": s for i in range(30) for n, s in [
    ("self_attn.q_proj", (576, 576)), ("self_attn.k_proj", (192, 576)), ("self_attn.v_proj", (192, 576)),
    ("self_attn.o_proj", (576, 576)), ("mlp.gate_proj", (1536, 576)), ("mlp.up_proj", (1536, 576)),
    ("mlp.down_proj", (576, 1536))]}


@pytest.mark.parametrize("target", [1.5, 2.0, 2.5, 3.0, 4.0])
def test_allocation_lands_on_target(target):
    bits = allocate(DEMO_SHAPES, grid_nbytes, target, sage_grid.sensitivity(DEMO_SHAPES))
    total = sum(grid_nbytes(*DEMO_SHAPES[n], b) for n, b in bits.items())
    true_bpw = 8 * total / sum(o * i for o, i in DEMO_SHAPES.values())
    assert target - 0.03 <= true_bpw <= target


def test_allocation_gives_the_more_sensitive_matrix_more_bits():
    sizes = {"a": (64, 64), "b": (64, 64)}
    bits = allocate(sizes, grid_nbytes, 3.0, {"a": 10.0, "b": 1.0})
    assert bits["a"] > bits["b"]


def test_allocation_below_the_cheapest_codes_is_refused():
    with pytest.raises(SagekitError, match="at least"):
        allocate(DEMO_SHAPES, grid_nbytes, 1.0, sage_grid.sensitivity(DEMO_SHAPES))


def _compress(src, out, *args):
    from typer.testing import CliRunner

    from sagekit.cli import app

    r = CliRunner().invoke(app, ["compress", str(src), str(out), "--device", "cpu", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", tiny_config(), seed=11, std=0.05)


@pytest.mark.parametrize("args", [[], ["--bits", "2"], ["--target-bpw", "2.5"], ["CALIB"]])
def test_grid_folder_counts_its_bytes_and_runs(tiny_src, tmp_path, args):
    """The default recipe end to end: true bits from the bytes stored; the folder loads, scores, generates."""
    if args == ["CALIB"]:
        args = ["--calib", str(calibration_text(tmp_path / "calib.txt")), "--calib-samples", "4",
                "--calib-seqlen", "32"]
    report = _compress(tiny_src, tmp_path / "out", *args)
    assert report["method"] == "sage-grid"
    stored = stored_bytes(tmp_path / "out")
    total = weights = 0
    for m in report["matrices"]:
        nbytes = sum(v for k, v in stored.items() if k.startswith(m["name"] + "."))
        assert m["nbytes"] == nbytes
        total, weights = total + nbytes, weights + m["shape"][0] * m["shape"][1]
    assert report["totals"]["linear_true_bpw"] == pytest.approx(8 * total / weights, rel=1e-12)
    if "--target-bpw" in args:
        assert 2.47 <= report["totals"]["linear_true_bpw"] <= 2.5
        assert len({m["groups"] for m in report["matrices"]}) > 1  # a fractional target mixes bit widths
    be = get_backend("cpu")
    model, dense = load_model(tmp_path / "out", be, 64), load_model(tiny_src, be, 64)
    tokens = np.random.default_rng(0).integers(0, 300, 128)
    r = evaluate(model, tokens, 32, reference=dense)
    assert np.isfinite(r.ppl) and 0 < r.kl < 1 and 0 <= r.top1 <= 1
    assert len(generate(model, [1, 2, 3], 5, temperature=0.0).tokens) == 5


def test_calibrated_grid_beats_data_free_on_its_calibration_text(tiny_src, tmp_path):
    calib = calibration_text(tmp_path / "calib.txt")
    _compress(tiny_src, tmp_path / "free", "--bits", "2")
    _compress(tiny_src, tmp_path / "cal", "--bits", "2", "--calib", str(calib), "--calib-samples", "8",
              "--calib-seqlen", "32")
    from sagekit.model.tokenizer import load_tokenizer

    ids = np.asarray(load_tokenizer(tiny_src).encode(calib.read_text()).ids[:512])
    be = get_backend("cpu")
    dense = load_model(tiny_src, be, 64)
    kl = {k: evaluate(load_model(tmp_path / k, be, 64), ids, 32, reference=dense).kl for k in ("free", "cal")}
    assert kl["cal"] < kl["free"]


@pytest.mark.parametrize("args", [[], ["--no-rotate", "--bits", "3"]])
def test_grid_runtime_matches_dequantise_on_use(tiny_src, tmp_path, args):
    """GridLinear (FP16 grid against R x) computes what the dequantised weight computes."""
    _compress(tiny_src, tmp_path / "out", *args)
    be = get_backend("cpu")
    fast, ref = load_model(tmp_path / "out", be, 64), load_model(tmp_path / "out", be, 64, kernels=False)
    assert type(fast.layers[0].q).__name__ == "GridLinear" and type(ref.layers[0].q).__name__ == "DequantLinear"
    rng = np.random.default_rng(3)
    for name, lin in fast.linears().items():
        if name != "lm_head":
            x = rng.standard_normal((5, lin.in_features)).astype(np.float32)
            np.testing.assert_allclose(lin(x), ref.linears()[name](x), rtol=2e-3, atol=2e-3)
    tokens = np.arange(1, 30)
    np.testing.assert_allclose(fast.forward(tokens), ref.forward(tokens), rtol=1e-2, atol=1e-2)


def test_act_order_keeps_each_code_in_its_column():
    """With a diagonal Hessian LDLQ is plain rounding in any order, so act-order must give the same codes:
    a permutation not undone would scramble them. With correlated inputs the order changes the rounding."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 96))
    h = np.diag(rng.uniform(0.1, 3.0, 96))
    ordered, _ = sage_grid.quantize(w, h, "x.o_proj", bits=2, rotate=False, act_order=True)
    natural, _ = sage_grid.quantize(w, h, "x.o_proj", bits=2, rotate=False, act_order=False)
    np.testing.assert_array_equal(ordered.codes, natural.codes)
    x = correlated_inputs(2048, 96, seed=5).astype(np.float64)
    h = hessian(x)
    ordered, _ = sage_grid.quantize(w, h, "x.o_proj", bits=2, act_order=True)
    natural, _ = sage_grid.quantize(w, h, "x.o_proj", bits=2, act_order=False)
    assert not np.array_equal(ordered.codes, natural.codes)

"""The four per-matrix SAGE-PTQ steps on synthetic data whose answer is known."""

import numpy as np
import pytest

from sagekit.quant.dualmode import dequantize, dual_error, prepare_dual, quantize_dual
from sagekit.quant.graph import group_magnitudes
from sagekit.quant.saliency import saliency_order, salient_mask
from sagekit.quant.threshold import search_fraction


def _f16_exact(x: np.ndarray) -> bool:
    return bool(np.array_equal(x, x.astype(np.float16).astype(np.float32)))


def _matrix(kind: str, rng: np.random.Generator, shape: tuple[int, int] = (96, 160)) -> np.ndarray:
    if kind == "gauss":
        w = rng.standard_normal(shape)
    elif kind == "t3":
        w = rng.standard_t(3, shape)
    else:
        w = rng.laplace(size=shape) + 0.1
    return (0.02 * w).astype(np.float32)


# --- saliency ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_saliency_picks_planted_outliers(seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    n = 25
    planted = rng.choice(w.size, n, replace=False)
    w.flat[planted] = (rng.choice([-1, 1], n) * rng.uniform(8, 12, n)).astype(np.float32)
    order = saliency_order(w)
    truth = np.zeros(w.size, dtype=bool)
    truth[planted] = True
    assert np.array_equal(salient_mask(order, w.shape, n / w.size), truth.reshape(w.shape))
    assert np.array_equal(np.sort(order[:n]), np.sort(planted))


def test_hessian_saliency_weighs_each_weight_by_its_inputs_rms():
    """|w - mean| x rms(x_j): a small weight on a loud input outranks a larger one on a quiet input."""
    w = np.array([[0.1, 2.0, 0.0], [0.5, -1.0, 0.0]], dtype=np.float32)  # mean 0.2667
    rms = np.array([100.0, 0.01, 1.0])
    order = saliency_order(w, rms)
    z = np.abs(w - w.astype(np.float64).mean()) * rms
    assert list(order) == list(np.argsort(-z.ravel(), kind="stable"))
    assert order[0] == 3 and order[1] == 0  # |0.5 - m| * 100, then |0.1 - m| * 100, before the 2.0 at rms 0.01
    assert list(saliency_order(w, np.ones(3))) == list(saliency_order(w))


def test_saliency_order_ties_and_offset_mean():
    w = np.array([[1.0, -1.0, 1.0], [5.0, 1.0, 1.0]], dtype=np.float32)  # mean 1.333: the -1 is an outlier too
    order = saliency_order(w)
    assert order.dtype == np.int64
    assert list(order[:2]) == [3, 1]
    assert list(order[2:]) == [0, 2, 4, 5]  # equal z: ascending index
    assert list(saliency_order(np.ones((2, 2), np.float32))) == [0, 1, 2, 3]
    assert salient_mask(order, w.shape, 0.0).sum() == 0
    assert salient_mask(order, w.shape, 1.0).all()


# --- graph ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("centres", [(1.0, 2.0, 3.0), (1.0, 2.0, 3.0, 4.0), (0.5, 1.0, 1.5, 2.5, 4.0)])
@pytest.mark.parametrize("seed", range(3))
def test_graph_finds_planted_clusters(centres, seed):
    rng = np.random.default_rng(seed)
    absw = np.abs(np.concatenate([rng.normal(c, 0.04, 4000) for c in centres])).astype(np.float32)
    g = group_magnitudes(absw, seed=seed)
    c = len(centres)
    assert g.chosen == c
    truth = np.repeat(np.arange(c), 4000)
    assert np.array_equal(np.searchsorted(g.boundaries[c], absw, side="right"), truth)  # cuts in the gaps
    assert g.silhouette[c] > 0.8


@pytest.mark.parametrize("dist", ["uniform", "halfnormal", "t3", "exponential"])
def test_graph_unimodal_gives_one_group(dist):
    """min_silhouette = 0.7: unimodal samples score 0.4-0.65 whatever c, so they keep G = 1."""
    rng = np.random.default_rng(7)
    absw = {
        "uniform": rng.random(50000),
        "halfnormal": np.abs(rng.standard_normal(50000)),
        "t3": np.abs(rng.standard_t(3, 50000)),
        "exponential": rng.exponential(size=50000),
    }[dist].astype(np.float32)
    g = group_magnitudes(absw)
    assert g.chosen == 1
    assert max(g.silhouette.values()) < 0.7
    assert group_magnitudes(absw, min_silhouette=0.0).chosen >= 2


def test_graph_contract_and_determinism():
    absw = np.abs(np.random.default_rng(3).standard_normal(10000)).astype(np.float32)
    g = group_magnitudes(absw, seed=5)
    assert sorted(g.boundaries) == list(range(1, 9))
    assert sorted(g.silhouette) == list(range(2, 9))
    for c, b in g.boundaries.items():
        assert b.dtype == np.float32 and b.shape == (c - 1,) and np.all(np.diff(b) >= 0)
    g2 = group_magnitudes(absw, seed=5)
    assert g2.chosen == g.chosen and g2.silhouette == g.silhouette
    assert all(np.array_equal(g.boundaries[c], g2.boundaries[c]) for c in g.boundaries)


@pytest.mark.parametrize(
    "absw",
    [np.full(5000, 0.3), np.arange(8) / 8.0, np.empty(0), np.repeat([0.1, 0.2], 3)],
    ids=["constant", "few", "empty", "tiny-two-valued"],
)
def test_graph_degenerate_input(absw):
    g = group_magnitudes(absw.astype(np.float32))
    assert g.chosen == 1
    assert g.boundaries[1].shape == (0,)


def test_graph_two_values():
    absw = np.repeat(np.array([0.1, 0.2], np.float32), 3000)
    g = group_magnitudes(absw)
    assert g.chosen == 2
    assert 0.1 < g.boundaries[2][0] <= 0.2


# --- dual mode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gauss", "t3", "laplace"])
def test_refinement_never_increases_error(kind):
    rng = np.random.default_rng(11)
    for trial in range(12):
        w = _matrix(kind, rng)
        order = saliency_order(w)
        absw = np.abs(w).ravel()
        g_count = int(rng.integers(2, 6))
        bounds = np.sort(rng.choice(absw, g_count - 1, replace=False)).astype(np.float32)
        if trial % 4 == 0:
            bounds[-1] = absw.max() * 2  # an empty top group
        for p, bits in ((0.0, 4), (0.01, 4), (0.05, 4), (0.05, 2), (0.3, 2)):
            # coarse corrections on many salient weights: moving alphas can cost more there than it saves
            mask = salient_mask(order, w.shape, p)
            d = quantize_dual(w, mask, bounds, salient_bits=bits)
            d0 = quantize_dual(w, mask, bounds, salient_bits=bits, max_iter=0)
            assert d.rel_error <= d0.rel_error * (1 + 1e-9)
            assert np.isfinite(d.alpha).all() and d.alpha.shape == (g_count,)


def test_refinement_reaches_planted_levels():
    """|w| takes exactly the values 1 and 3: from a cut below both, refinement must find the exact code."""
    rng = np.random.default_rng(0)
    w = (rng.choice([-1.0, 1.0], (32, 48)) * rng.choice([1.0, 3.0], (32, 48))).astype(np.float32)
    none = np.zeros(w.shape, dtype=bool)
    d = quantize_dual(w, none, np.array([0.5], np.float32))
    assert d.rel_error == 0.0
    assert list(d.alpha) == [1.0, 3.0]
    assert quantize_dual(w, none, np.array([0.5], np.float32), max_iter=0).rel_error > 0


def test_refinement_reaches_lloyd_max_optimum():
    """|w| evenly spread on (0, 1): the best 2-level code cuts at 1/2 with levels 1/4 and 3/4."""
    rng = np.random.default_rng(1)
    mag = (np.arange(4000) + 0.5) / 4000
    w = (rng.permutation(mag) * rng.choice([-1.0, 1.0], mag.size)).astype(np.float32).reshape(40, 100)
    d = quantize_dual(w, np.zeros(w.shape, dtype=bool), np.array([0.2], np.float32))
    assert abs(d.boundaries[0] - 0.5) < 1e-3
    assert np.allclose(d.alpha, [0.25, 0.75], atol=1e-3)


@pytest.mark.parametrize("kind", ["gauss", "t3"])
@pytest.mark.parametrize("bits", [3, 4])
def test_dual_contract_and_exact_error(kind, bits):
    rng = np.random.default_rng(5)
    w = _matrix(kind, rng)
    order = saliency_order(w)
    mask = salient_mask(order, w.shape, 0.03)
    bounds = np.quantile(np.abs(w), [0.3, 0.6, 0.85]).astype(np.float32)
    d = quantize_dual(w, mask, bounds, salient_bits=bits)
    out, inn = w.shape
    assert d.sign.dtype == bool and np.array_equal(d.sign, w >= 0)
    assert d.gid.dtype == np.uint8 and np.array_equal(d.gid, np.searchsorted(d.boundaries, np.abs(w), side="right"))
    assert d.alpha.dtype == np.float32 and _f16_exact(d.alpha) and np.all(np.diff(d.alpha) >= 0)
    assert d.sal_ptr.dtype == np.int32 and d.sal_ptr.shape == (out + 1,)
    assert d.sal_idx.dtype == np.int32 and d.sal_val.dtype == np.int8
    assert np.abs(d.sal_val.astype(int)).max() <= 2 ** (bits - 1) - 1
    assert d.sal_scale.dtype == np.float32 and d.sal_scale.shape == (out,) and _f16_exact(d.sal_scale)
    rows = np.repeat(np.arange(out), np.diff(d.sal_ptr))
    rebuilt = np.zeros_like(mask)
    rebuilt[rows, d.sal_idx] = True
    assert np.array_equal(rebuilt, mask)
    assert all(np.all(np.diff(d.sal_idx[a:b]) > 0) for a, b in zip(d.sal_ptr[:-1], d.sal_ptr[1:]))
    assert np.all(d.sal_scale[np.diff(d.sal_ptr) == 0] == 0)
    w_hat = dequantize(d)
    assert w_hat.dtype == np.float32
    err = np.sum((w.astype(np.float64) - w_hat) ** 2) / np.sum(w.astype(np.float64) ** 2)
    assert d.rel_error == pytest.approx(err, rel=1e-10)
    assert dual_error(prepare_dual(w, order), 0.03, bounds, salient_bits=bits) == pytest.approx(d.rel_error, rel=1e-9)


@pytest.mark.parametrize("kind", ["gauss", "t3", "laplace"])
def test_salient_corrections_reduce_error(kind):
    rng = np.random.default_rng(2)
    w = _matrix(kind, rng)
    order = saliency_order(w)
    bounds = np.quantile(np.abs(w), [0.5]).astype(np.float32)
    mask = salient_mask(order, w.shape, 0.02)
    with_sal = quantize_dual(w, mask, bounds)
    without = quantize_dual(w, np.zeros_like(mask), bounds)
    e_with = np.sum((w - dequantize(with_sal))[mask].astype(np.float64) ** 2)
    e_without = np.sum((w - dequantize(without))[mask].astype(np.float64) ** 2)
    assert e_with < 0.1 * e_without
    assert with_sal.rel_error < without.rel_error


def test_empty_groups_stay_finite():
    w = _matrix("gauss", np.random.default_rng(4))
    bounds = np.array([0.0, 0.0, 10.0], np.float32)  # groups 0 and 3 can hold nothing
    d = quantize_dual(w, salient_mask(saliency_order(w), w.shape, 0.01), bounds)
    assert d.alpha.shape == (4,) and np.isfinite(d.alpha).all() and np.all(np.diff(d.alpha) >= 0)
    assert np.isfinite(d.rel_error) and np.isfinite(dequantize(d)).all()


def test_dual_error_matches_on_search_path():
    rng = np.random.default_rng(9)
    w = _matrix("t3", rng, (128, 96))
    order = saliency_order(w)
    prep = prepare_dual(w, order)
    bounds = np.quantile(np.abs(w), [0.4, 0.8]).astype(np.float32)
    for p in np.linspace(0, 0.05, 9):
        d = quantize_dual(w, salient_mask(order, w.shape, p), bounds)
        assert dual_error(prep, p, bounds) == pytest.approx(d.rel_error, rel=1e-9)


# --- threshold --------------------------------------------------------------------------------------


def test_brent_finds_interior_minimum():
    p, v = search_fraction(lambda p: (p - 0.013) ** 2, 0.05)
    assert abs(p - 0.013) < 2e-4 and v < 4e-8


@pytest.mark.parametrize("sign,expect", [(-1.0, 0.05), (1.0, 0.0)])
def test_brent_returns_exact_endpoint(sign, expect):
    calls = []

    def f(p: float) -> float:
        calls.append(p)
        return sign * p + 1.0

    p, v = search_fraction(f, 0.05)
    assert p == expect and v == sign * expect + 1.0
    assert len(calls) < 40

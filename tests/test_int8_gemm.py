"""The int8 prefill GEMM (sagekit/kernels/int8_gemm.py): its sums against integer products of the very bytes
it rounded, the rounding itself, odd sizes (tokens past a group of 12, rows past a panel of 32, widths off a
multiple of 4), zero tokens and rows, and tiles.tiled_matmul's choice between it and BLAS."""

from __future__ import annotations

import numpy as np
import pytest

from sagekit.kernels import int8_gemm, tiles

pytestmark = pytest.mark.skipif(not int8_gemm.VNNI, reason="the int8 GEMM needs AVX-512 VNNI")


def _unpacked_tokens(r: int8_gemm.RoundedTokens, width: int) -> np.ndarray:
    """The rounded tokens (T, width) as int64, out of the (groups, k4, TOKENS) words of four bytes."""
    groups = -(-r.n_tok // int8_gemm.TOKENS)
    q = r.xq[: groups * r.k4 * int8_gemm.TOKENS].view(np.int8).reshape(groups, r.k4, int8_gemm.TOKENS, 4)
    return q.transpose(0, 2, 1, 3).reshape(-1, 4 * r.k4)[: r.n_tok, :width].astype(np.int64)


def _unpacked_rows(n: int, k4: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The last tile's rounded rows (n, width) as int64 and their scales, out of the (panels, k4, 32) words."""
    panels = -(-n // int8_gemm.PANEL_ROWS)
    wq = int8_gemm._buffer("wq", panels * int8_gemm.PANEL_ROWS * k4, np.int32)
    q = wq.view(np.uint8).reshape(panels, k4, int8_gemm.PANEL_ROWS, 4).astype(np.int64) - 128
    q = q.transpose(0, 2, 1, 3).reshape(-1, 4 * k4)
    sw = int8_gemm._buffer("sw", panels * int8_gemm.PANEL_ROWS, np.float32)
    return q[:n, :width], sw[:n].astype(np.float64)


def _product(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, int8_gemm.RoundedTokens]:
    rounded = int8_gemm.RoundedTokens(x)
    y = np.full((x.shape[0], -(-w.shape[0] // 32) * 32), np.nan, dtype=np.float32)
    rounded.multiply(w, y, 0)
    return y[:, : w.shape[0]], rounded


@pytest.mark.parametrize("tokens, width, rows", [(1, 4, 1), (13, 7, 40), (40, 33, 70), (130, 576, 64)])
def test_the_sums_are_the_integer_products_of_the_rounded_bytes(tokens, width, rows):
    rng = np.random.default_rng(tokens + width)
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    w = rng.standard_normal((rows, width)).astype(np.float32)
    y, rounded = _product(x, w)
    qx = _unpacked_tokens(rounded, width)
    qw, sw = _unpacked_rows(rows, rounded.k4, width)
    ref = rounded.sx[:tokens, None].astype(np.float64) * sw[None, :] * (qx @ qw.T)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("width", [5, 64])
def test_each_token_and_row_is_rounded_at_its_own_scale(width):
    rng = np.random.default_rng(width)
    x = rng.standard_normal((20, width)).astype(np.float32) * np.geomspace(1e-3, 1e3, 20, dtype=np.float32)[:, None]
    w = rng.standard_normal((35, width)).astype(np.float32)
    _, rounded = _product(x, w)
    qx = _unpacked_tokens(rounded, width)
    qw, sw = _unpacked_rows(35, rounded.k4, width)
    for q, v, s in ((qx, x, rounded.sx[:20].astype(np.float64)), (qw, w, sw)):
        assert (np.abs(q).max(axis=1) == 127).all()  # the largest value of each sets the scale
        np.testing.assert_allclose(s, np.abs(v).max(axis=1) / 127, rtol=1e-6)
        assert np.abs(q - v / s[:, None]).max() <= 0.5 + 1e-3


def test_zero_tokens_and_rows_give_zeros():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((15, 40)).astype(np.float32)
    w = rng.standard_normal((33, 40)).astype(np.float32)
    x[4], w[7] = 0, 0
    y, _ = _product(x, w)
    assert (y[4] == 0).all() and (y[:, 7] == 0).all()
    assert np.isfinite(y).all()


@pytest.mark.parametrize("tokens", [32, 100])
def test_the_product_is_within_its_rounding_bound_of_float32(tokens):
    """|y - x W^T| <= the bound that rounding each token (sx / 2 a value) and row (sw / 2) allows."""
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 96)).astype(np.float32)
    w = rng.standard_normal((50, 96)).astype(np.float32)
    y, _ = _product(x, w)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    sx, sw = np.abs(x).max(1)[:, None] / 127, np.abs(w).max(1)[None, :] / 127
    bound = sx / 2 * np.abs(w).sum(1)[None, :] + sw / 2 * np.abs(x).sum(1)[:, None] + 96 * sx * sw / 4
    assert (np.abs(y - ref) <= bound * (1 + 1e-5)).all()
    assert np.sqrt(((y - ref) ** 2).mean() / (ref**2).mean()) < 0.02


def test_tiled_matmul_takes_int8_from_its_threshold_on(monkeypatch):
    """Below INT8_MIN_TOKENS the tiles go to BLAS (the float32 product to its rounding); from it on, to the
    int8 GEMM, in tiles of 32 rows here (TILE_FLOATS forced small), whose every row is written."""
    monkeypatch.setattr(tiles, "TILE_FLOATS", 32 * 40)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((70, 40)).astype(np.float32)

    def decode(r0, r1, tile):
        tile[:] = w[r0:r1]

    for tokens, close in ((tiles.INT8_MIN_TOKENS - 1, 1e-5), (tiles.INT8_MIN_TOKENS, 0.03)):
        x = rng.standard_normal((tokens, 40)).astype(np.float32)
        ref = x @ w.T
        y = tiles.tiled_matmul(x, 70, 40, decode)
        assert y.shape == (tokens, 70) and y.flags.c_contiguous
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert err < close and (err > 1e-4) == (tiles.INT8 and tokens >= tiles.INT8_MIN_TOKENS)

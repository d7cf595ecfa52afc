"""The int8 prefill GEMM (sagekit/kernels/int8_gemm.py): its sums against integer products of the very bytes
it multiplied, the tokens' rounding, odd sizes (tokens past a group of 12, rows past a panel of 32, widths off a
multiple of 4), zero tokens and rows, tiles.tiled_matmul's choice between it and BLAS, and the codebook and
level kernels' rows decoded straight to bytes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_grid, random_vq

from sagekit.kernels import cpu, int8_gemm, tiles

pytestmark = pytest.mark.skipif(not int8_gemm.VNNI, reason="the int8 GEMM needs AVX-512 VNNI")


def _unpacked_tokens(r: int8_gemm.RoundedTokens, width: int) -> np.ndarray:
    """The rounded tokens (T, width) as int64, out of the (groups, k4, TOKENS) words of four bytes."""
    groups = -(-r.n_tok // int8_gemm.TOKENS)
    q = r.xq[: groups * r.k4 * int8_gemm.TOKENS].view(np.int8).reshape(groups, r.k4, int8_gemm.TOKENS, 4)
    return q.transpose(0, 2, 1, 3).reshape(-1, 4 * r.k4)[: r.n_tok, :width].astype(np.int64)


def _product(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the GEMM's y for integer rows q (out, K) in -127..127 at float32 scales, the exact product of the same
    rounded tokens and rows)."""
    rounded = int8_gemm.RoundedTokens(x)
    rows, sw = rounded.row_buffers(q.shape[0])
    rows[: q.shape[0]] = 128
    rows[: q.shape[0], : q.shape[1]] = q + 128
    sw[: q.shape[0]] = scales
    y = np.full((x.shape[0], rows.shape[0]), np.nan, dtype=np.float32)
    rounded.multiply_rows(q.shape[0], rows, sw, y, 0)
    qx = _unpacked_tokens(rounded, x.shape[1])
    exact = rounded.sx[: x.shape[0], None].astype(np.float64) * scales[None, :].astype(np.float64) * (qx @ q.T)
    return y[:, : q.shape[0]], exact


def _random_rows(rng: np.random.Generator, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(-127, 128, (rows, width)), rng.uniform(0.5, 2.0, rows).astype(np.float32)


@pytest.mark.parametrize("tokens, width, rows", [(1, 4, 1), (13, 7, 40), (40, 33, 70), (130, 576, 64)])
def test_the_sums_are_the_integer_products_of_the_bytes(tokens, width, rows):
    rng = np.random.default_rng(tokens + width)
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    y, exact = _product(x, *_random_rows(rng, rows, width))
    np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


@pytest.mark.parametrize("width", [5, 64])
def test_each_token_is_rounded_at_its_own_scale(width):
    rng = np.random.default_rng(width)
    x = rng.standard_normal((20, width)).astype(np.float32) * np.geomspace(1e-3, 1e3, 20, dtype=np.float32)[:, None]
    rounded = int8_gemm.RoundedTokens(x)
    q, s = _unpacked_tokens(rounded, width), rounded.sx[:20].astype(np.float64)
    assert (np.abs(q).max(axis=1) == 127).all()  # the largest value of each sets the scale
    np.testing.assert_allclose(s, np.abs(x).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(q - x / s[:, None]).max() <= 0.5 + 1e-3


def test_zero_tokens_and_rows_give_zeros():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((15, 40)).astype(np.float32)
    q, scales = _random_rows(rng, 33, 40)
    x[4], q[7] = 0, 0
    y, _ = _product(x, q, scales)
    assert (y[4] == 0).all() and (y[:, 7] == 0).all()
    assert np.isfinite(y).all()


@pytest.mark.parametrize("tokens", [32, 100])
def test_the_product_is_within_the_tokens_rounding_of_float32(tokens):
    """|y - x W^T| <= sx / 2 sum |w| for weights the bytes hold exactly: the tokens' rounding is all it costs."""
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 96)).astype(np.float32)
    q, scales = _random_rows(rng, 50, 96)
    y, _ = _product(x, q, scales)
    w = q * scales[:, None].astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    bound = np.abs(x).max(1)[:, None] / 127 / 2 * np.abs(w).sum(1)[None, :]
    assert (np.abs(y - ref) <= bound * (1 + 1e-5)).all()
    assert np.sqrt(((y - ref) ** 2).mean() / (ref**2).mean()) < 0.02


def test_tiled_matmul_takes_int8_from_its_threshold_on(monkeypatch):
    """Below INT8_MIN_TOKENS, or without a byte decoder, the tiles go to BLAS (the float32 product to its
    rounding); from it on, to the int8 GEMM, in tiles of 32 rows here (TILE_FLOATS forced small), whose every
    row is written."""
    monkeypatch.setattr(tiles, "TILE_FLOATS", 32 * 40)
    rng = np.random.default_rng(5)
    q, scales = _random_rows(rng, 70, 40)
    w = (q * scales[:, None]).astype(np.float32)

    def decode(r0, r1, tile):
        tile[:] = w[r0:r1]

    def decode_bytes(r0, r1, rows, sw):
        rows[: r1 - r0, :40] = q[r0:r1] + 128
        sw[: r1 - r0] = scales[r0:r1]

    cases = ((tiles.INT8_MIN_TOKENS - 1, decode_bytes, 1e-5), (tiles.INT8_MIN_TOKENS, None, 1e-5),
             (tiles.INT8_MIN_TOKENS, decode_bytes, 0.03))
    for tokens, byte_rows, close in cases:
        x = rng.standard_normal((tokens, 40)).astype(np.float32)
        ref = x @ w.T
        y = tiles.tiled_matmul(x, 70, 40, decode, byte_rows)
        assert y.shape == (tokens, 70) and y.flags.c_contiguous
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert err < close and (err > 1e-4) == (tiles.INT8 and close > 1e-5)


def _byte_product(x: np.ndarray, q: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """sx[t] row_scale[r] (x_q @ q.T): the int8 product of integer weight rows q (out, in) at their scales,
    with x rounded as the GEMM rounds it."""
    rounded = int8_gemm.RoundedTokens(x)
    qx = _unpacked_tokens(rounded, x.shape[1])
    return rounded.sx[: x.shape[0], None].astype(np.float64) * row_scale[None, :] * (qx @ q.T)


@pytest.mark.parametrize("dim", [2, 3, 4, 6, 8])
def test_codebook_rows_decode_to_the_stored_int8_codebook(dim):
    """A `sage-vq` codebook is stored as int8 at its largest entry / 127: the decoded byte rows are those very
    integers, exactly, at scale[r] times that step."""
    p = random_vq((70, 12 * dim), dim, seed=dim)
    x = np.random.default_rng(dim).standard_normal((tiles.INT8_MIN_TOKENS + 5, p.shape[1])).astype(np.float32)
    q = p.codebook.astype(np.int64)[p.codes].reshape(p.shape[0], -1)
    book, step = int8_gemm.byte_table(p.codewords().T)
    assert np.array_equal(book[:dim].T.astype(np.int64) - 128, p.codebook)
    ref = _byte_product(x, q, p.scale.astype(np.float64) * step)
    y = cpu.codebook_matmul(x, cpu.prepare_codebook(p))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_level_rows_decode_to_the_levels_rounded_at_one_scale(bits):
    p = random_grid((70, 96), bits, seed=bits)
    x = np.random.default_rng(bits).standard_normal((tiles.INT8_MIN_TOKENS + 5, 96)).astype(np.float32)
    levels, step = int8_gemm.byte_table(p.levels.astype(np.float32))
    q = levels.astype(np.int64)[p.indices()] - 128
    ref = _byte_product(x, q, p.scale.astype(np.float64) * step)
    y = cpu.level_matmul(x, cpu.prepare_levels(p))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

"""The level kernel (sagekit/kernels/level_matmul.py) against the dequantised weight: 2-5 bit codes with free
levels, odd widths and heights, decode (one lookup per weight) and prefill (tiles) token counts, the
parallel build, the row lookup, the layout's bit positions, and the bytes it holds."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_product, random_grid

from sagekit.backend import get_backend
from sagekit.format.sage_grid import pack_grid
from sagekit.kernels import cpu, level_matmul, tiles
from sagekit.model.linear import GridLinear

needs_avx512 = pytest.mark.skipif(not cpu.AVX512, reason="the level kernel's decode needs AVX-512")


def _check(p, tokens: int, seed: int = 0) -> None:
    w = cpu.prepare_levels(p)
    x = np.random.default_rng(seed).standard_normal((tokens, p.shape[1])).astype(np.float32)
    if tokens >= tiles.INT8_MIN_TOKENS and tiles.INT8:
        steps = p.scale.astype(np.float64) * np.abs(p.levels).max() / 127  # the levels round at one scale
        assert_product(cpu.level_matmul(x, w), x, p.rotated(), rtol=1e-5, row_steps=steps)
        return
    ref = x @ p.rotated().T
    bound = np.abs(x) @ np.abs(p.rotated()).T  # the summed terms' size: float32 reordering errs relative to it
    np.testing.assert_array_less(np.abs(cpu.level_matmul(x, w) - ref), 1e-5 * bound.max() + 1e-30)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(37, 50), (16, 32), (300, 96), (1, 33)])
@pytest.mark.parametrize("tokens", [1, 3, 70])
def test_the_kernel_is_the_dequantised_product(bits, shape, tokens):
    if tokens <= level_matmul.TABLE_MAX_TOKENS and not cpu.AVX512:
        pytest.skip("decode runs on the level kernel with AVX-512 only")
    _check(random_grid(shape, bits, seed=bits + shape[0]), tokens, seed=tokens)


@needs_avx512
@pytest.mark.parametrize("bits", [3, 5])
def test_a_product_past_the_serial_threshold_runs_on_threads_and_agrees(bits):
    shape = (2048, 1056)  # 2.16M weights: past PARALLEL_MIN_WEIGHTS, and 33 chunks of 32 columns
    assert shape[0] * shape[1] >= level_matmul.PARALLEL_MIN_WEIGHTS
    _check(random_grid(shape, bits, seed=1), 1)


def test_codes_sit_in_the_layout_the_kernel_reads():
    """5 bits: column c of a chunk has its code at bits 5 c of the chunk's 5 words read as one 160-bit string;
    column 6's straddles words 0 and 1; lane = row within the block of 16."""
    idx = np.zeros((2, 40), dtype=np.uint8)
    idx[1, 6], idx[1, 9], idx[1, 33] = 0b11101, 0b10110, 0b00011
    w = cpu.prepare_levels(pack_grid(idx, np.ones(2), np.arange(32) - 15.5, None))
    words = w.codes.reshape(1, 2, 5, 16)  # (blocks, chunks, words, lanes)
    assert words[0, 0, 0, 1] == 0b01 << 30  # column 6, bits 30-31: its low two bits
    assert words[0, 0, 1, 1] == (0b10110 << 13) | 0b111  # column 9 at bit 45; column 6's top three bits
    assert words[0, 1, 0, 1] == 0b00011 << 5  # chunk 1, column 1
    assert np.count_nonzero(words) == 3


def test_a_matrix_is_laid_out_in_parts_as_it_is_whole(monkeypatch):
    """prepare_levels re-lays PREPARE_ROWS rows at a time; a part boundary inside the matrix changes nothing."""
    p = random_grid((100, 40), 5, seed=6)
    whole = cpu.prepare_levels(p).codes
    monkeypatch.setattr(level_matmul, "PREPARE_ROWS", 32)
    np.testing.assert_array_equal(cpu.prepare_levels(p).codes, whole)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_rows_are_the_dequantised_rows(bits):
    p = random_grid((45, 70), bits, seed=3)
    rows = np.array([0, 44, 17, 17])
    np.testing.assert_allclose(cpu.level_rows(cpu.prepare_levels(p), rows), p.rotated(rows), rtol=1e-6)


@needs_avx512
def test_a_grid_linear_holds_the_codes_at_their_stored_size():
    """The 5-bit head case of issue 14 acceptance 4: weights in memory at most 1.05x the stored bytes."""
    p = random_grid((1024, 576), 5, seed=4)
    lin = GridLinear(p, get_backend("cpu"))
    assert lin.kernel == "level" and lin.nbytes <= 1.05 * p.nbytes
    x = np.random.default_rng(0).standard_normal((2, 576)).astype(np.float32)
    ref = x @ p.unpack().T
    np.testing.assert_allclose(lin(x), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_other_widths_are_refused():
    with pytest.raises(ValueError, match="6-bit codes"):
        cpu.prepare_levels(random_grid((16, 32), 6, seed=0))


def test_prefill_tiles_cover_every_row(monkeypatch):
    """tiled_matmul in tiles of 16 rows (TILE_FLOATS forced small) gives the product of the whole matrix, for
    both kernels that use it."""
    from conftest import random_vq

    from sagekit.kernels import tiles

    monkeypatch.setattr(tiles, "TILE_FLOATS", 16 * 96)
    x = np.random.default_rng(1).standard_normal((9, 96)).astype(np.float32)
    for p, prepare, matmul in ((random_grid((70, 96), 3, seed=7), cpu.prepare_levels, cpu.level_matmul),
                               (random_vq((70, 96), 4, seed=7), cpu.prepare_codebook, cpu.codebook_matmul)):
        ref = x @ p.rotated().T
        np.testing.assert_allclose(matmul(x, prepare(p)), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))

"""The codebook kernel (sagekit.kernels.codebook_matmul, issue 14): `sage-vq` codes and free-level grids run
from one byte per run of weights, checked against the dequantised weight for every run length, odd widths,
decode (table) and prefill (tiles) token counts; and which matrices GridLinear gives it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_product, random_grid, random_vq

from sagekit.backend import get_backend
from sagekit.format.sage_grid import pack_grid
from sagekit.format.sage_vq import DIMS
from sagekit.kernels import cpu
from sagekit.kernels.codebook_matmul import byte_codes
from sagekit.model.linear import GridLinear


def _check(packed, tokens: int) -> None:
    book = cpu.prepare_codebook(packed)
    x = np.random.default_rng(tokens).standard_normal((tokens, packed.shape[1])).astype(np.float32)
    assert_product(cpu.codebook_matmul(x, book), x, packed.rotated(), rtol=1e-4)
    rows = np.array([0, packed.shape[0] - 1, packed.shape[0] // 2])
    np.testing.assert_allclose(cpu.decode_rows(book, rows), packed.rotated()[rows], rtol=1e-6)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("out", [1, 37, 300])
@pytest.mark.parametrize("tokens", [1, 3, 70])
def test_vq_codes_run_as_their_dequantised_weight(dim, out, tokens):
    _check(random_vq((out, 24 * dim), dim, seed=dim + out), tokens)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(40, 72), (37, 50), (17, 33)])
@pytest.mark.parametrize("tokens", [1, 2, 9])
def test_free_grid_levels_run_as_their_dequantised_weight(bits, shape, tokens):
    _check(random_grid(shape, bits, seed=bits), tokens)


@pytest.mark.parametrize("make", [lambda: random_vq((37, 48), 3, 0), lambda: random_vq((5, 64), 8, 1)]
                         + [lambda b=b: random_grid((17, 33), b, b) for b in range(1, 9)])
def test_byte_codes_decode_to_the_stored_weight(make):
    """What the CPU and GPU kernels both start from: codewords[codes] times the row scale is W R^T."""
    p = make()
    codes, words = byte_codes(p)
    out, in_ = p.shape
    assert codes.dtype == np.uint8 and len(words) <= 256 and codes.shape[1] * words.shape[1] >= in_
    w = words[codes].reshape(out, -1)[:, :in_] * p.scale.astype(np.float32)[:, None]
    np.testing.assert_allclose(w, p.rotated(), rtol=1e-6, atol=1e-7)


def test_a_long_row_runs_its_tables_in_chunks():
    """4096 runs of 256 entries are 4 MiB of tables: the kernel passes over the rows a chunk of runs at a time."""
    p = random_vq((48, 4 * 4096), 4, seed=1)
    assert 4 * 256 * p.codes.shape[1] > 4 * 1 << 18
    _check(p, 1)


def test_codes_of_a_grid_join_low_bits_first():
    """Two 3-bit codes a byte (D = 2, 64 codewords): code i of a run sits in bits 3i..3i+2."""
    idx = np.array([[1, 6, 7, 0]], dtype=np.uint8)
    p = pack_grid(idx, np.ones(1), np.arange(8) - 3.5, None)
    book = cpu.prepare_codebook(p)
    assert book.dim == 2 and book.codewords_t.shape == (2, 64)
    assert list(book.codes[[0, 16]]) == [1 | 6 << 3, 7]


LEVEL = "level" if cpu.AVX512 else "half"  # the level kernel needs AVX-512; without it those grids run FP16


@pytest.mark.parametrize("make,expect", [
    (lambda: random_vq((64, 96), 4, 0), "book"), (lambda: random_vq((64, 96), 3, 0), "book"),
    (lambda: random_vq((64, 96), 2, 0), "book"), (lambda: random_grid((64, 96), 1, 0), "book"),
    (lambda: random_grid((64, 96), 2, 0), LEVEL), (lambda: random_grid((64, 96), 3, 0), LEVEL),
    (lambda: random_grid((64, 96), 5, 0), LEVEL), (lambda: random_grid((64, 96), 6, 0), "half"),
])
def test_grid_linear_picks_the_kernel_by_layout(make, expect):
    """vq on the codebook kernel, free-level grids of 2-5 bits on the level kernel, 6+ bits FP16."""
    p = make()
    lin = GridLinear(p, get_backend("cpu"))
    assert lin.kernel == expect
    x = np.random.default_rng(0).standard_normal((1, 96)).astype(np.float32)
    ref = x @ p.unpack().T
    tol = 3e-3 if expect == "half" else 1e-4  # the FP16 runtime rounds the decoded weights to half
    np.testing.assert_allclose(lin(x), ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


def test_vq_weights_in_memory_are_their_file_bytes():
    """Issue 14 acceptance 4: the ~2-bit recipe's weights in memory at most 1.05x what the file stores."""
    p = random_vq((576, 1536), 4, seed=2)
    lin = GridLinear(p, get_backend("cpu"))
    assert lin.kernel == "book" and lin.nbytes <= 1.05 * p.nbytes

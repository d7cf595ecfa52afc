"""The packed `sage` layout of docs/FORMAT.md: bit order, dequantisation, byte accounting, validation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sagekit.format.bits import pack_bits, unpack_bits
from sagekit.format.sage import PackedSage, group_ids, pack_sage, random_packed, sage_nbytes, unpack_sage

SHAPES = [(1, 1), (3, 31), (5, 32), (4, 33), (37, 70), (129, 200)]


def dense_inputs(out: int, in_: int, n_groups: int, per_row: int, seed: int) -> dict:
    """What a quantiser hands to pack_sage: dense planes and a CSR of corrections."""
    rng = np.random.default_rng(seed)
    cols = [np.sort(rng.choice(in_, size=min(in_, rng.integers(0, per_row + 1)), replace=False)) for _ in range(out)]
    return {
        "sign": rng.random((out, in_)) < 0.5,
        "gid": rng.integers(0, n_groups, size=(out, in_), dtype=np.uint8),
        "alpha": np.sort(rng.uniform(0.01, 0.05, n_groups)).astype(np.float32),
        "sal_ptr": np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int32),
        "sal_idx": np.concatenate([np.zeros(0, np.int32)] + cols).astype(np.int32),
        "sal_val": rng.integers(-7, 8, size=sum(len(c) for c in cols)).astype(np.int8),
        "sal_scale": np.array([rng.uniform(0.005, 0.02) if len(c) else 0.0 for c in cols], dtype=np.float32),
    }


def formula(d: dict) -> np.ndarray:
    """FORMAT.md's W_hat, written out element by element from the dense inputs (fp16 alpha and scale)."""
    alpha = d["alpha"].astype(np.float16).astype(np.float32)
    scale = d["sal_scale"].astype(np.float16).astype(np.float32)
    w = (2 * d["sign"].astype(np.float32) - 1) * alpha[d["gid"]]
    for r in range(len(scale)):
        for j in range(d["sal_ptr"][r], d["sal_ptr"][r + 1]):
            w[r, d["sal_idx"][j]] += np.float32(d["sal_val"][j]) * scale[r]
    return w


@pytest.mark.parametrize("out,in_", SHAPES)
@pytest.mark.parametrize("n_groups", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("per_row", [0, 6])
def test_pack_unpack_is_the_format_formula(out, in_, n_groups, per_row):
    d = dense_inputs(out, in_, n_groups, per_row, seed=out * in_ + n_groups)
    p = pack_sage(**d)
    np.testing.assert_array_equal(unpack_sage(p), formula(d))
    np.testing.assert_array_equal(group_ids(p), d["gid"])
    assert p.n_groups == n_groups and p.shape == (out, in_)
    assert p.gid.shape == ((n_groups - 1).bit_length(), out, (in_ + 31) // 32)


def test_bit_order_is_the_documented_one():
    sign = np.zeros((2, 40), dtype=bool)
    sign[0, 0] = sign[0, 31] = sign[1, 33] = True
    words = pack_bits(sign)
    assert words.dtype == np.uint32 and words.shape == (2, 2)
    assert words[0, 0] == (1 | 1 << 31) and words[0, 1] == 0
    assert words[1, 0] == 0 and words[1, 1] == 1 << 1


@pytest.mark.parametrize("in_", [1, 7, 31, 32, 33, 64, 70, 100])
def test_pack_bits_round_trip(in_):
    plane = np.random.default_rng(in_).random((5, in_)) < 0.5
    words = pack_bits(plane)
    np.testing.assert_array_equal(unpack_bits(words, in_), plane)
    if in_ % 32:
        assert not (words[:, -1] >> np.uint32(in_ % 32)).any(), "padding bits must be 0"


@pytest.mark.parametrize("out,in_", SHAPES + [(576, 1536), (11, 4097)])
@pytest.mark.parametrize("n_groups", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3])
def test_sage_nbytes_is_what_is_packed(out, in_, n_groups, fraction):
    p = random_packed(out, in_, n_groups, fraction, seed=1)
    assert sage_nbytes(out, in_, n_groups, p.nnz) == p.nbytes == sum(a.nbytes for a in p.arrays().values())


def test_sage_nbytes_matches_pack_sage():
    for out, in_, g, per_row in [(3, 31, 1, 0), (37, 70, 3, 6), (129, 200, 8, 6)]:
        p = pack_sage(**dense_inputs(out, in_, g, per_row, seed=2))
        assert sage_nbytes(out, in_, g, p.nnz) == p.nbytes


def test_random_packed_is_valid_and_plausible():
    p = random_packed(300, 1000, 3, 0.02, seed=0)
    again = PackedSage.from_arrays(p.arrays(), p.shape)
    assert all(np.array_equal(a, b) for a, b in zip(p.arrays().values(), again.arrays().values()))
    assert group_ids(p).max() == 2
    assert 0.01 <= p.alpha.astype(np.float32).min() and p.alpha.astype(np.float32).max() <= 0.05
    assert 0.015 < p.nnz / (300 * 1000) <= 0.02


def test_pack_is_fast_on_a_real_shape():
    rng = np.random.default_rng(0)
    d = dense_inputs(1, 1, 1, 0, seed=0)
    out, in_ = 11008, 4096
    d.update(
        sign=rng.random((out, in_), dtype=np.float32) < 0.5,
        gid=rng.integers(0, 4, size=(out, in_), dtype=np.uint8),
        alpha=np.array([0.01, 0.02, 0.03, 0.04], np.float32),
        sal_ptr=np.zeros(out + 1, np.int32),
        sal_scale=np.zeros(out, np.float32),
    )
    start = time.perf_counter()
    pack_sage(**d)
    assert time.perf_counter() - start < 2.0  # ~0.1 s when the machine is idle


def corrupt(field: str, value) -> tuple[dict, tuple[int, int]]:
    p = random_packed(6, 40, 3, 0.2, seed=3)
    arrays = p.arrays()
    arrays[field] = value(arrays[field].copy()) if callable(value) else value
    return arrays, p.shape


def _set(index, v):
    def f(a):
        a[index] = v
        return a

    return f


CORRUPTIONS = {
    "sign dtype": ("sign", lambda a: a.astype(np.int64)),
    "sign shape": ("sign", lambda a: a[:, :1]),
    "sign padding": ("sign", _set((0, -1), np.uint32(1 << 31))),
    "gid dtype": ("gid", lambda a: a.astype(np.uint16)),
    "gid planes": ("gid", lambda a: a[:1]),
    "gid padding": ("gid", _set((1, 2, -1), np.uint32(1 << 20))),
    "gid id >= G": ("gid", _set((slice(None), 0, 0), np.uint32(0xFFFFFFFF))),
    "alpha dtype": ("alpha", lambda a: a.astype(np.float32)),
    "alpha nan": ("alpha", _set(0, np.nan)),
    "alpha descending": ("alpha", lambda a: a[::-1].copy()),
    "alpha empty": ("alpha", lambda a: a[:0]),
    "alpha too many": ("alpha", lambda a: np.linspace(0, 1, 300).astype(np.float16)),
    "sal_ptr dtype": ("sal_ptr", lambda a: a.astype(np.int64)),
    "sal_ptr shape": ("sal_ptr", lambda a: a[:-1]),
    "sal_ptr start": ("sal_ptr", lambda a: a + 1),
    "sal_ptr not monotone": ("sal_ptr", lambda a: np.concatenate([a[:1], a[2:3], a[1:2], a[3:]])),
    "sal_ptr end": ("sal_ptr", _set(-1, 0)),
    "sal_idx dtype": ("sal_idx", lambda a: a.astype(np.int32)),
    "sal_idx out of range": ("sal_idx", _set(0, 40)),
    "sal_idx not ascending": ("sal_idx", lambda a: a[::-1].copy()),
    "sal_idx length": ("sal_idx", lambda a: a[:-1]),
    "sal_idx 2-d": ("sal_idx", lambda a: a[:, None]),
    "sal_val dtype": ("sal_val", lambda a: a.astype(np.int16)),
    "sal_val length": ("sal_val", lambda a: a[1:]),
    "sal_val -128": ("sal_val", _set(0, -128)),
    "sal_scale dtype": ("sal_scale", lambda a: a.astype(np.float32)),
    "sal_scale negative": ("sal_scale", _set(0, -1.0)),
    "sal_scale inf": ("sal_scale", _set(0, np.inf)),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_from_arrays_rejects_each_corruption(case):
    field, value = CORRUPTIONS[case]
    arrays, shape = corrupt(field, value)
    with pytest.raises(ValueError, match=f"^{field}:"):
        PackedSage.from_arrays(arrays, shape)


def test_from_arrays_rejects_missing_fields_and_bad_shapes():
    p = random_packed(6, 40, 2, 0.2, seed=3)
    arrays = p.arrays()
    del arrays["sal_val"]
    with pytest.raises(ValueError, match="^sal_val:"):
        PackedSage.from_arrays(arrays, p.shape)
    with pytest.raises(ValueError, match="^shape:"):
        PackedSage.from_arrays(p.arrays(), (0, 40))
    with pytest.raises(ValueError, match="^sign:"):
        PackedSage.from_arrays(p.arrays(), (6, 70))


def test_pack_sage_rejects_bad_inputs():
    d = dense_inputs(4, 10, 2, 3, seed=4)
    with pytest.raises(ValueError, match="^gid:"):
        pack_sage(**{**d, "gid": np.full((4, 10), 2, np.uint8)})
    with pytest.raises(ValueError, match="^sal_idx:"):
        pack_sage(**{**d, "sal_idx": d["sal_idx"] + 10})

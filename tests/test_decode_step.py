"""The fused CPU decode step (sagekit/kernels/decode_step.py, fed by sagekit/model/decode_plan.py) against the
layer-by-layer forward pass it replaces at one token: tiny random models compressed to free-level grids (level
kernel) and to vq codebooks and 1-bit grids (codebook kernel), heads of 16 and 64 dims, an intermediate size that
leaves a partial 16-row block, one thread and two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from numba import njit
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.kernels import cpu, decode_step, tiles
from sagekit.kernels.codebook_intrinsics import BYTE_SLOTS, table_run_bytes
from sagekit.kernels.llvm_intrinsics import AVX512_BF16, AVX512_VBMI
from sagekit.model.linear import DenseLinear
from sagekit.model.llama import STEPWISE_TOKENS
from sagekit.model.load import load_model

pytestmark = pytest.mark.skipif(not cpu.AVX512, reason="the level kernel's decode needs AVX-512")


@njit
def _byte_lookup(acc, cw, x, b, d, codes, c0, blocks):
    table_run_bytes(acc, cw, x, np.int64(b), np.int64(d), codes, np.int64(c0), np.int64(blocks))


def _compressed(tmp_path: Path, *args: str, **config) -> Path:
    src = write_random_checkpoint(tmp_path / "src", tiny_config(**config), seed=5, std=0.05)
    r = CliRunner().invoke(app, ["compress", str(src), str(tmp_path / "out"), "--device", "cpu", *args])
    assert r.exit_code == 0, r.output
    return tmp_path / "out"


def _decode(model, tokens: np.ndarray, prompt: int) -> np.ndarray:
    """Logits of each token after the prompt, fed one at a time."""
    model.forward(tokens[:prompt])
    return np.stack([model.forward(tokens[i:i + 1], i)[0] for i in range(prompt, len(tokens))])


@pytest.mark.parametrize("config", [
    {},  # head_dim 16: the scalar attention loops
    dict(hidden_size=256, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2),  # head_dim 64
])
@pytest.mark.parametrize("args, kinds", [
    (("--bits", "2"), {"level"}), (("--bits", "3"), {"level"}), (("--bits", "5"), {"level"}),
    (("--bits", "1"), {"book"}),  # 1-bit grids: 8 codes a byte on the codebook kernel
    (("--recipe", "vq"), {"book"}), (("--recipe", "vq", "--dim", "2"), {"book"}), (("--recipe", "vq", "--dim", "8"), {"book"}),
])
def test_the_fused_step_is_the_layer_by_layer_step(tmp_path, config, args, kinds):
    model = load_model(_compressed(tmp_path, *args, **config), get_backend("cpu"), 64)
    assert model.decode_plan is not None
    assert {lin.kernel for lin in model.decode_plan.linears} == kinds
    tokens = np.arange(3, 40) % model.config.vocab_size
    fused = _decode(model, tokens, 20)
    model.decode_plan = None
    ref = _decode(model, tokens, 20)
    # codebook tables are read as bfloat16 where the CPU has AVX-512 BF16: 2^-9 of each entry; measured 0.2-0.35%
    # of the largest logit on these models
    bound = 1e-2 if "book" in kinds and AVX512_BF16 else 1e-5
    np.testing.assert_allclose(fused, ref, rtol=0, atol=bound * np.abs(ref).max())


def _bf16(t: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16, to nearest even, as float32."""
    bits = t.view(np.uint32).astype(np.uint64)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16).view(np.float32)


def test_the_byte_lookups_slots_are_a_permutation_of_each_group():
    assert sorted(BYTE_SLOTS) == list(range(64)) and list(BYTE_SLOTS[:4]) == [0, 16, 1, 17]


@pytest.mark.skipif(not (AVX512_BF16 and AVX512_VBMI), reason="needs AVX-512 BF16 and VBMI")
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7, 36])
@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_the_byte_lookup_adds_each_row_its_table_entry_rounded_to_nearest_even(blocks, d):
    """Codewords and inputs are small integers times powers of two, so every table entry is exact in float32
    whatever the order of its sum, and the rounding to bfloat16 (of entries up to 9 bits) is what is tested."""
    rng = np.random.default_rng(10 * blocks + d)
    cw = (rng.integers(-300, 300, (8, 256)) * 2.0 ** rng.integers(-8, 8, (8, 1))).astype(np.float32)
    cw[0, :3] = [257, 259, -257]  # ties go to even
    x = rng.integers(-3, 4, 20).astype(np.float32)
    x[5] = 1
    table = (x[5:5 + d, None].astype(np.float64) * cw[:d]).sum(0).astype(np.float32)
    if d == 1:
        assert list(_bf16(table[:3])) == [256, 260, -256]
    codes = rng.integers(0, 256, 16 * blocks + 24).astype(np.uint8)
    acc = rng.standard_normal(64 * -(-blocks // 4)).astype(np.float32)
    rows = np.arange(16 * blocks)
    slots = rows // 64 * 64 + BYTE_SLOTS[rows % 64]
    expected = acc.copy()
    expected[slots] += _bf16(table)[codes[8:8 + 16 * blocks]]
    _byte_lookup(acc, cw, x, 5, d, codes, 8, blocks)
    np.testing.assert_array_equal(acc[slots], expected[slots])


@njit
def _runs(run, acc, cw, x, d, codes, blocks):
    tab = np.empty(256, dtype=np.float32)
    for j in range(codes.size // (16 * blocks)):
        run(acc, cw, x, j * d, d, tab, codes, j * 16 * blocks, blocks)
    return acc


@pytest.mark.skipif(not (AVX512_BF16 and AVX512_VBMI), reason="needs AVX-512 BF16 and VBMI")
def test_the_float32_runs_other_cpus_take_give_the_byte_runs_sums_in_row_order():
    """_run_f32 (tables in memory, float32 entries) is what AVX-512 CPUs without BF16 or VBMI run; here it is
    checked against the byte lookups, whose entries are rounded to bfloat16."""
    rng, blocks, d, runs = np.random.default_rng(3), 7, 4, 36
    cw = rng.standard_normal((d, 256)).astype(np.float32)
    x = rng.standard_normal(d * runs).astype(np.float32)
    codes = rng.integers(0, 256, 16 * blocks * runs).astype(np.uint8)
    f32 = _runs(decode_step._run_f32, np.zeros(16 * blocks, np.float32), cw, x, d, codes, blocks)
    rows = np.arange(16 * blocks)
    slots = rows // 64 * 64 + BYTE_SLOTS[rows % 64]
    got = _runs(decode_step._run_bytes, np.zeros(64 * 2, np.float32), cw, x, d, codes, blocks)[slots]
    exact = sum(cw[:, codes[16 * blocks * j:16 * blocks * (j + 1)]].T @ x[d * j:d * (j + 1)] for j in range(runs))
    np.testing.assert_allclose(f32, exact, rtol=0, atol=1e-4 * np.abs(exact).max())
    np.testing.assert_allclose(got, exact, rtol=0, atol=2 ** -8 * np.abs(exact).max())


def test_one_thread_and_two_give_the_same_bits(tmp_path):
    """The threads split rows and heads; no sum changes order, so the result does not depend on the split."""
    model = load_model(_compressed(tmp_path, "--bits", "3"), get_backend("cpu"), 64)
    plan, tokens = model.decode_plan, np.arange(5, 30) % model.config.vocab_size
    runs = []
    for n in (1, 2):
        plan.threads = n
        runs.append(_decode(model, tokens, 12))
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("n", [2, STEPWISE_TOKENS, STEPWISE_TOKENS + 1])
def test_a_short_prompt_runs_through_the_fused_step_a_token_at_a_time(tmp_path, monkeypatch, n):
    """Prompts up to STEPWISE_TOKENS take the fused step per token; every position's logits match the batched
    layer-by-layer pass, and so does the cache the next token reads (that pass at float32: from 32 tokens on
    it would multiply at int8, tests/test_int8_gemm.py)."""
    monkeypatch.setattr(tiles, "INT8", False)
    model = load_model(_compressed(tmp_path, "--bits", "3"), get_backend("cpu"), 64)
    tokens = np.arange(4, 5 + n) % model.config.vocab_size
    plan_type, steps = type(model.decode_plan), []
    call = plan_type.__call__

    def counted(plan, h, state, start):
        steps.append(start)
        return call(plan, h, state, start)

    monkeypatch.setattr(plan_type, "__call__", counted)
    fused = np.concatenate([model.forward(tokens[:n], 0), model.forward(tokens[n:], n)])
    assert steps == (list(range(n + 1)) if n <= STEPWISE_TOKENS else [n])
    model.decode_plan = None
    ref = np.concatenate([model.forward(tokens[:n], 0), model.forward(tokens[n:], n)])
    np.testing.assert_allclose(fused, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_a_layer_swapped_after_loading_runs_layer_by_layer(tmp_path):
    model = load_model(_compressed(tmp_path, "--bits", "3"), get_backend("cpu"), 64)
    tokens = np.arange(2, 12) % model.config.vocab_size
    before = _decode(model, tokens, 5)
    L = model.layers[1]
    L.down = DenseLinear(np.zeros((L.down.out_features, L.down.in_features), dtype=np.float32))
    assert not model.decode_plan.fits(model.layers)
    after = _decode(model, tokens, 5)
    model.decode_plan = None
    np.testing.assert_array_equal(after, _decode(model, tokens, 5))
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("args", [("--bits", "3", "--levels", "symmetric"), ("--bits", "6"), ("--recipe", "paper")])
def test_models_off_the_level_and_codebook_kernels_get_no_plan(tmp_path, args):
    model = load_model(_compressed(tmp_path, *args), get_backend("cpu"), 64)
    assert model.decode_plan is None


def test_a_step_splits_over_the_pool_under_openmp():
    import numba

    n = decode_step.threads()
    assert n == (numba.get_num_threads() if numba.threading_layer() == "omp" else 1)

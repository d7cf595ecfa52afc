"""Matmul kernels on packed weights against the dense reference x @ unpack_sage(p).T."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sagekit.format.sage import PackedSage, random_packed, unpack_sage
from sagekit.kernels import cpu, cuda, half_matmul, lut_matmul, transformer_ops

SHAPES = [(37, 70), (129, 200), (576, 1536), (16, 32)]
KERNEL_DIR = Path(cpu.__file__).resolve().parent


def reference(x: np.ndarray, p) -> tuple[np.ndarray, np.ndarray]:
    """(exact product in float64, a bound on float32 rounding: |x| @ |W|^T)."""
    w = unpack_sage(p).astype(np.float64)
    return x.astype(np.float64) @ w.T, np.abs(x.astype(np.float64)) @ np.abs(w).T


def assert_matches(y: np.ndarray, x: np.ndarray, p, rel: float) -> None:
    ref, scale = reference(x, p)
    assert y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= rel * scale + 1e-30).all(), f"max error {err.max():.3g}, bound {rel} x |x||W|"


@pytest.mark.parametrize("out,in_", SHAPES)
@pytest.mark.parametrize("n_groups", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("salient", [0.0, 0.03])
def test_cpu_matmul_matches_dense(out, in_, n_groups, salient):
    p = random_packed(out, in_, n_groups, salient, seed=out + in_ + n_groups)
    k = cpu.prepare(p)
    rng = np.random.default_rng(0)
    for n_tok in (1, 3, 20, 65):  # decode, small batches (one, two), and a prefill long enough for BLAS tiles
        x = rng.standard_normal((n_tok, in_)).astype(np.float32)
        assert_matches(cpu.sage_matmul(x, k), x, p, rel=1e-5)


@pytest.mark.parametrize("n_par", [1, 2, 3])
def test_decode_salient_pass_with_rows_of_every_length(n_par):
    """Rows with 0, 1..SHORT_ROW and more corrections in one matrix: decode groups the short ones by count
    and splits every group between the parallel parts."""
    out, in_ = 300, 200
    base = random_packed(out, in_, 2, 0.0, seed=11)
    rng = np.random.default_rng(11)
    counts = rng.choice([0, 1, 2, 3, 5, cpu.SHORT_ROW, cpu.SHORT_ROW + 1, 40], size=out)
    cols = [np.sort(rng.choice(in_, c, replace=False)) for c in counts]
    p = PackedSage.from_arrays({
        "sign": base.sign, "gid": base.gid, "alpha": base.alpha.astype(np.float16),
        "sal_ptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
        "sal_idx": np.concatenate(cols).astype(np.uint16),
        "sal_val": (rng.integers(1, 8, counts.sum()) * rng.choice([-1, 1], counts.sum())).astype(np.int8),
        "sal_scale": np.where(counts > 0, rng.uniform(0.005, 0.02, out), 0.0).astype(np.float16),
    }, (out, in_))
    k = cpu.prepare(p)
    assert k.long_rows.size == (counts > cpu.SHORT_ROW).sum()
    assert k.short_rows.size == ((counts > 0) & (counts <= cpu.SHORT_ROW)).sum()
    x = rng.standard_normal((1, in_)).astype(np.float32)
    y = np.full((1, out), np.nan, dtype=np.float32)
    (lut_matmul._lut_matmul_serial if n_par == 1 else lut_matmul._lut_matmul)(x, *k.kernel_args, y, k.words, n_par)
    assert_matches(y, x, p, rel=1e-5)


def test_cpu_matmul_sixteen_groups_and_no_more():
    p = random_packed(70, 100, 16, 0.03, seed=6)
    x = np.random.default_rng(2).standard_normal((3, 100)).astype(np.float32)
    assert_matches(cpu.sage_matmul(x[:1], p), x[:1], p, rel=1e-5)
    assert_matches(cpu.sage_matmul(x, p), x, p, rel=1e-5)
    with pytest.raises(ValueError, match="^alpha:"):
        cpu.prepare(random_packed(20, 40, 17, 0.0, seed=6))


def test_cpu_matmul_takes_packed_and_checks_x():
    p = random_packed(20, 50, 2, 0.1, seed=5)
    x = np.random.default_rng(1).standard_normal((2, 50)).astype(np.float64)
    assert_matches(cpu.sage_matmul(x, p), x.astype(np.float32), p, rel=1e-5)
    with pytest.raises(ValueError, match="^x:"):
        cpu.sage_matmul(np.zeros((2, 49), np.float32), p)


@pytest.mark.parametrize("parallel, serial", [(lut_matmul._lut_matmul, lut_matmul._lut_matmul_serial),
                                              (half_matmul._half_matmul, half_matmul._half_matmul_serial)])
def test_serial_twins_have_cache_entries_of_their_own(parallel, serial):
    """Numba keys its on-disk cache by function name: a twin sharing its parallel kernel's name loaded the
    parallel build, and every small decode GEMV paid the thread pool's wake-up (16 us a call)."""
    assert parallel.targetoptions.get("parallel") and not serial.targetoptions.get("parallel")
    assert parallel._cache._cache_file._index_name != serial._cache._cache_file._index_name


@pytest.mark.parametrize("n_tok", [1, 3, 16])
def test_half_matmul_reads_fp16_bits_exactly(n_tok):
    """Every kind of half: zeros of both signs, subnormals, the largest, the smallest normal, ordinary values;
    the result must equal float32 arithmetic on the upcast weights."""
    rng = np.random.default_rng(n_tok)
    w = (rng.standard_normal((203, 77)) * 0.05).astype(np.float16)
    w[0, :9] = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504, -65504, 2.0 ** -14, -3e-6], dtype=np.float16)
    w[1] = np.arange(77, dtype=np.uint16).view(np.float16)  # the 77 smallest subnormals, bit for bit
    x = rng.standard_normal((n_tok, 77)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    y = cpu.half_matmul(x, w)
    assert y.dtype == np.float32 and y.shape == (n_tok, 203)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(y[:, 1], ref[:, 1], atol=1e-5 * np.abs(ref[:, 1]).max())  # subnormals not flushed
    with pytest.raises(ValueError, match="expected"):
        cpu.half_matmul(x[:, :5], w)


@pytest.mark.parametrize("n_heads, n_kv, length, d", [(9, 3, 1, 64), (9, 3, 37, 64), (4, 4, 130, 64), (8, 1, 17, 64),
                                                    (4, 2, 33, 128), (4, 2, 33, 80), (4, 2, 33, 72)])
def test_decode_attention_matches_softmax_attention(n_heads, n_kv, length, d):
    """GQA, MHA and MQA; a cache longer than the valid prefix (its tail must be ignored); head sizes that take
    the blocked paths (multiples of 64, of 16) and the plain loops."""
    rng = np.random.default_rng(length)
    s_max = 160
    q = (rng.standard_normal((n_heads, d)) / np.sqrt(d)).astype(np.float32)
    keys = rng.standard_normal((n_kv, s_max, d)).astype(np.float32)
    values = rng.standard_normal((n_kv, s_max, d)).astype(np.float32)
    keys[:, length:] = 1e4  # garbage past the valid positions
    out = np.empty((n_heads, d), np.float32)
    cpu.decode_attention(q, keys, values, length, out)
    rep = n_heads // n_kv
    k = np.repeat(keys[:, :length], rep, axis=0).astype(np.float64)
    scores = np.einsum("hd,hsd->hs", q, k)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    ref = np.einsum("hs,hsd->hd", p / p.sum(axis=1, keepdims=True), np.repeat(values[:, :length], rep, axis=0))
    np.testing.assert_allclose(out, ref, atol=2e-6)


@pytest.mark.parametrize("b, tb, n", [(3, 5, 5), (9, 7, 40), (2, 1, 1), (4, 16, 150)])
def test_causal_softmax_matches_masked_softmax(b, tb, n):
    """A block's last tb queries of n positions: query i sees keys < n - tb + i + 1, whatever the scores past
    them hold; rows of every length mod 8 (the eight running maxima and their tail), the largest score anywhere."""
    rng = np.random.default_rng(n)
    scores = (rng.standard_normal((b, tb, n)) * 4).astype(np.float32)
    seen = np.arange(n)[None, :] < (n - tb + np.arange(tb) + 1)[:, None]
    scores[:, ~seen] = 1e4  # garbage the mask must hide
    s64 = np.where(seen, scores.astype(np.float64), -np.inf)
    ref = np.exp(s64 - s64.max(axis=-1, keepdims=True))
    got = scores.copy()
    sums = cpu.causal_softmax(got)
    assert sums.shape == (b, tb, 1)
    np.testing.assert_allclose(got, ref, atol=2e-7)
    np.testing.assert_allclose(sums, ref.sum(axis=-1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("t", [1, 7])
def test_rmsnorm_and_rope_kernels_match_their_formulas(t):
    """The Numba RMSNorm and RoPE the CPU model uses, against the NumPy formulas in float64."""
    rng = np.random.default_rng(t)
    x = (rng.standard_normal((t, 96)) * 3).astype(np.float32)
    w = rng.uniform(0.5, 2, 96).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(cpu.rmsnorm(x, w, 1e-5), ref, rtol=2e-6, atol=1e-6)
    h = rng.standard_normal((t, 3, 16)).astype(np.float32)
    angles = rng.uniform(0, 50, (t, 8))
    cos, sin = (np.concatenate([f(angles)] * 2, axis=1).astype(np.float32) for f in (np.cos, np.sin))
    rotated = np.concatenate([-h[..., 8:], h[..., :8]], axis=-1).astype(np.float64)
    ref = h * cos[:, None, :].astype(np.float64) + rotated * sin[:, None, :]
    np.testing.assert_allclose(cpu.rope(h, cos, sin), ref, rtol=1e-6, atol=1e-6)


def test_exp_without_libm_is_accurate_for_softmax_weights():
    x = np.concatenate([-np.geomspace(1e-6, 87, 2001), [0.0, -100.0]]).astype(np.float32)
    got = np.array([transformer_ops._exp_nonpositive(v) for v in x], dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want)) < 1.2e-7
    small = x > -10
    assert np.max(np.abs(got - want)[small] / want[small]) < 1e-6


def test_walsh_coefficients_rebuild_alpha():
    alpha = np.array([0.01, 0.02, 0.035], np.float32)  # G = 3: id 3 never occurs
    beta = cpu.walsh_beta(alpha, 2).astype(np.float64)
    for g in range(3):
        for sign in (0, 1):
            value = 0.0
            for a in range(4):
                bit = sign ^ (bin(a & g).count("1") % 2)  # plane A = sign XOR the id bits i in A
                value += beta[a] * (2 * bit - 1)
            assert value == pytest.approx((2 * sign - 1) * alpha[g], abs=1e-8)


PORTABLE = """
import numpy as np
from sagekit.format.sage import random_packed, unpack_sage
from sagekit.kernels import cpu
assert not cpu.AVX512
for g in (1, 4):
    p = random_packed(129, 200, g, 0.03, seed=g)
    x = np.random.default_rng(0).standard_normal((3, 200)).astype(np.float32)
    for t in (1, 3):
        ref = x[:t].astype(np.float64) @ unpack_sage(p).T.astype(np.float64)
        assert np.abs(cpu.sage_matmul(x[:t], p) - ref).max() < 1e-4, g
from sagekit.format.sage_vq import pack_vq
rng = np.random.default_rng(1)
v = pack_vq(rng.integers(0, 256, (37, 12)), np.ones(37), rng.standard_normal((256, 4)), None)
xv = rng.standard_normal((1, 48)).astype(np.float32)
ref = xv.astype(np.float64) @ v.rotated().T.astype(np.float64)
assert np.abs(cpu.codebook_matmul(xv, cpu.prepare_codebook(v)) - ref).max() < 1e-4
"""


def test_cpu_matmul_without_avx512(tmp_path):
    """The portable lookups and gathers (what CPUs without AVX-512 run), compiled fresh in a child process."""
    env = {**os.environ, "SAGEKIT_NO_AVX512": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", PORTABLE], check=True, env=env, timeout=300)


@pytest.mark.parametrize("source", sorted(p.name for p in KERNEL_DIR.glob("*.cu")))
def test_cuda_sources_compile(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-arch=sm_80", "-std=c++17", "-DSAGE_INSTANTIATE_ALL", f"-I{KERNEL_DIR}", "-c"]
    cmd += [str(KERNEL_DIR / source), "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


def test_cuda_module_imports_without_cupy():
    assert cuda.KERNEL_DIR == KERNEL_DIR and (KERNEL_DIR / "sage_decode.cu").is_file()


def _gpu():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except cp.cuda.runtime.CUDARuntimeError as e:
        pytest.skip(f"no usable CUDA GPU: {e}")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("out,in_", SHAPES + [(256, 4096), (100, 1000)])
@pytest.mark.parametrize("n_groups", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("salient", [0.0, 0.03])
@pytest.mark.parametrize("n_tok", [1, 3, 65])
def test_gpu_matmul_matches_dense(out, in_, n_groups, salient, n_tok):
    cp = _gpu()
    p = random_packed(out, in_, n_groups, salient, seed=out + in_ + n_groups)
    x = np.random.default_rng(n_tok).standard_normal((n_tok, in_)).astype(np.float16)
    dev = cuda.to_device(p)
    y = cuda.sage_matmul_gpu(cp.asarray(x[0] if n_tok == 1 else x), dev).get()
    y = y.reshape(n_tok, out).astype(np.float32)
    # FP16 output (and FP16 weights in the GEMM's tiles): a few FP16 ulps of the magnitudes involved
    assert_matches(y, x.astype(np.float32), p, rel=4e-3)

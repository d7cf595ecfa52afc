"""Baselines rtn, q1, billm, pbllm: honest bits, lossless packing, validation, error compensation, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.eval.perplexity import evaluate
from sagekit.format.sign_scale import PackedRTN
from sagekit.io.safetensors import SafetensorsFile, write_safetensors
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.generate import generate
from sagekit.model.load import load_model
from sagekit.quant import billm, gptq, pbllm, q1, rtn

from conftest import tiny_config

runner = CliRunner()
METHODS = ("rtn", "q1", "billm", "pbllm", "gptq")
MODULES = {"rtn": rtn, "q1": q1, "billm": billm, "pbllm": pbllm, "gptq": gptq}
CALIBRATED = ("billm", "pbllm", "gptq")


def calibration_text(path: Path, words: int = 1500, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    vocab = ["the", "of", "a", "model", "weight", "bit", "layer", "token", "quant", "loss", "in", "is", "and"]
    path.write_text(" ".join(rng.choice(vocab, size=words)) + "\n")
    return path


def correlated_inputs(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Activations shaped like an LLM's: a few shared directions, outlier channels, so H is far from diagonal."""
    rng = np.random.default_rng(seed)
    low_rank = rng.standard_normal((n, 8)) @ rng.standard_normal((8, dim))
    x = 0.5 * rng.standard_normal((n, dim)) + low_rank
    x[:, rng.choice(dim, size=max(1, dim // 32), replace=False)] *= 8.0
    return x.astype(np.float32)


def hessian(x: np.ndarray) -> np.ndarray:
    return (2.0 / len(x) * x.astype(np.float64).T @ x.astype(np.float64)).astype(np.float32)


def stored_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor, straight from the safetensors headers' offsets."""
    out = {}
    for shard in folder.glob("*.safetensors"):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        for name, e in json.loads(raw[8:8 + n]).items():
            if name != "__metadata__":
                out[name] = e["data_offsets"][1] - e["data_offsets"][0]
    return out


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", tiny_config(), seed=11, std=0.05)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    return calibration_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def compress_args(method: str, src: Path, out: Path, calib: Path) -> list[str]:
    args = ["compress", str(src), str(out), "--method", method, "--device", "cpu"]
    if method in CALIBRATED:
        args += ["--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "32"]
    return args


@pytest.fixture(scope="module")
def packed_dirs(tiny_src, calib_file, tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for m in METHODS:
        out = tmp_path_factory.mktemp(m) / "out"
        r = runner.invoke(app, compress_args(m, tiny_src, out, calib_file))
        assert r.exit_code == 0, r.output
        dirs[m] = out
    return dirs


@pytest.mark.parametrize("method", METHODS)
def test_true_bits_equal_the_stored_bytes(packed_dirs, method):
    folder = packed_dirs[method]
    report = json.loads((folder / "report.json").read_text())
    modules = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    stored = stored_bytes(folder)
    assert report["method"] == method and len(report["matrices"]) == len(modules) == 14
    weights = total = 0
    for m in report["matrices"]:
        assert modules[m["name"]] == {"method": method, "layout": method, "shape": m["shape"]}
        nbytes = sum(v for k, v in stored.items() if k.startswith(m["name"] + "."))
        n = m["shape"][0] * m["shape"][1]
        assert m["nbytes"] == nbytes
        assert m["true_bits"] == pytest.approx(8 * nbytes / n, rel=1e-12)
        in_ = m["shape"][1]
        if method == "rtn":  # tiny in_ are multiples of 32: no padding
            assert m["true_bits"] == pytest.approx(1 + 16 / in_, rel=1e-12)
        if method == "q1":
            assert m["true_bits"] == pytest.approx(1 + 16 * -(-in_ // 128) / in_, rel=1e-12)
        weights, total = weights + n, total + nbytes
    t = report["totals"]
    assert t["linear_true_bpw"] == pytest.approx(8 * total / weights, rel=1e-12)
    assert t["file_bytes"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert t["linear_paper_bits"] + t["linear_paper_scale_bits"] <= t["linear_true_bpw"] + 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_packed_folder_loads_evaluates_and_generates(packed_dirs, tiny_src, method):
    be = get_backend("cpu")
    model = load_model(packed_dirs[method], be, 64)
    dense = load_model(tiny_src, be, 64)
    tokens = np.random.default_rng(0).integers(0, 300, 128)
    r = evaluate(model, tokens, 32, reference=dense)
    assert np.isfinite(r.ppl) and r.kl > 0 and 0 <= r.top1 <= 1
    g = generate(model, [1, 2, 3], 5, temperature=0.0)
    assert len(g.tokens) == 5
    assert model.weight_bytes < dense.weight_bytes


def test_q1_is_exactly_1_125_bits_on_whole_blocks():
    w = np.random.default_rng(0).standard_normal((8, 384)).astype(np.float32)
    packed, stats = q1.quantize(w)
    assert stats.true_bits == 8 * packed.nbytes / w.size == 1.125
    assert stats.paper_bits + stats.paper_scale_bits == 1.125


def _fit(method: str, w: np.ndarray, h: np.ndarray, **kw):
    return MODULES[method].fit(w, h if method in CALIBRATED else None, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(5, 40), (37, 200), (16, 256)])
def test_unpack_gives_the_quantizers_own_w_hat(method, shape):
    rng = np.random.default_rng(1)
    w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    packed, w_hat = _fit(method, w, hessian(correlated_inputs(512, shape[1])))
    again = type(packed).from_arrays({k: v.copy() for k, v in packed.arrays().items()}, packed.shape)
    np.testing.assert_array_equal(again.unpack(), w_hat)
    assert again.nbytes == packed.nbytes == sum(a.nbytes for a in packed.arrays().values())
    assert np.abs(w_hat - w).mean() < np.abs(w).mean()


def test_pbllm_stores_the_smaller_of_bitmap_and_index_list():
    rng = np.random.default_rng(2)
    w = (0.05 * rng.standard_normal((32, 256))).astype(np.float32)
    h = hessian(correlated_inputs(512, 256))
    sparse, w_sparse = pbllm.fit(w, h, fraction=0.02)
    dense, w_dense = pbllm.fit(w, h, fraction=0.2)
    assert "sal_idx" in sparse.arrays() and "sal_mask" not in sparse.arrays()
    assert "sal_mask" in dense.arrays() and "sal_idx" not in dense.arrays()
    for packed, w_hat, fraction in ((sparse, w_sparse, 0.02), (dense, w_dense, 0.2)):
        np.testing.assert_array_equal(packed.unpack(), w_hat)
        assert packed.salient().sum() == round(fraction * w.size)
        bitmap, csr = 4 * 32 * 8, 4 * 33 + 2 * packed.sal_val.size
        positions = sum(a.nbytes for k, a in packed.arrays().items() if k in ("sal_mask", "sal_ptr", "sal_idx"))
        assert positions == min(bitmap, csr)


def test_billm_salient_columns_and_groups():
    rng = np.random.default_rng(3)
    w = (0.05 * rng.standard_normal((24, 300))).astype(np.float32)
    packed, _ = billm.fit(w, hessian(correlated_inputs(1024, 300)))
    cols = packed.salient_columns
    per_block = [int(cols[s:s + 128].sum()) for s in range(0, 300, 128)]
    assert all(1 <= k <= billm.MAX_COLS - 1 for k in per_block)
    assert packed.sign2.shape == (24, -(-int(cols.sum()) // 32))
    assert packed.group.shape == (24, -(-(300 - int(cols.sum())) // 32))


@pytest.mark.parametrize("method", ["billm", "pbllm"])
def test_error_compensation_lowers_the_output_error(method):
    rng = np.random.default_rng(4)
    x = correlated_inputs(2048, 256, seed=5)
    w = (0.05 * rng.standard_normal((64, 256))).astype(np.float32)
    h = hessian(x)
    _, with_comp = _fit(method, w, h)
    _, without = _fit(method, w, h, propagate=False)
    err = lambda w_hat: np.linalg.norm(x @ w.T - x @ w_hat.T)  # noqa: E731
    assert err(with_comp) < 0.95 * err(without)


CORRUPTIONS = [
    ("rtn", "scale", lambda a: a.astype(np.float32)),
    ("rtn", "sign", lambda a: a[:, :-1]),
    ("rtn", "scale", lambda a: -np.abs(a) - 1),
    ("rtn", "sign", lambda a: a | np.uint32(1 << 31)),  # in = 40: bit 8 of the last word and up is padding
    ("q1", "scale", lambda a: a[:-1]),
    ("q1", "scale", lambda a: np.full_like(a, np.inf)),
    ("billm", "sal_cols", lambda a: a | np.uint32(1 << 31)),  # a flag beyond column 40
    ("billm", "group", lambda a: a.astype(np.int32)),
    ("billm", "sal_scale", lambda a: -np.abs(a) - 1),
    ("billm", "sal_mean", lambda a: np.full_like(a, np.nan)),
    ("pbllm", "sal_val", lambda a: a.astype(np.int16)),
    ("pbllm", "sal_zero", lambda a: a.astype(np.int8)),
    ("pbllm", "scale", lambda a: np.full_like(a, np.nan)),
    ("pbllm", "sal_ptr", lambda a: a[::-1].copy()),
    ("pbllm", "sal_idx", lambda a: np.full_like(a, 40)),
    ("gptq", "zero", lambda a: np.full_like(a, 16)),  # 4 bits: zero points 0..15
    ("gptq", "perm", lambda a: np.zeros_like(a)),
    ("gptq", "scale", lambda a: np.full_like(a, np.nan)),
    ("gptq", "codes", lambda a: a[:, :, :-1]),
]


@pytest.mark.parametrize("method,field,corrupt", CORRUPTIONS)
def test_from_arrays_names_the_corrupt_field(method, field, corrupt):
    rng = np.random.default_rng(6)
    w = (0.05 * rng.standard_normal((6, 40))).astype(np.float32)
    knobs = {"fraction": 0.02} if method == "pbllm" else {}  # 0.02: the CSR store, whose fields are checked too
    packed, _ = _fit(method, w, hessian(correlated_inputs(256, 40)), **knobs)
    arrays = packed.arrays()
    arrays[field] = corrupt(arrays[field])
    with pytest.raises(ValueError, match=field):
        type(packed).from_arrays(arrays, packed.shape)


def test_missing_and_unknown_fields_are_refused():
    packed, _ = rtn.fit(np.ones((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="scale"):
        PackedRTN.from_arrays({"sign": packed.sign}, (2, 8))
    with pytest.raises(ValueError, match="extra"):
        PackedRTN.from_arrays({**packed.arrays(), "extra": packed.sign}, (2, 8))


def test_corrupt_folder_gives_a_one_line_error(packed_dirs, tmp_path):
    src = packed_dirs["pbllm"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in src.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = next(bad.glob("*.safetensors"))
    with SafetensorsFile(shard) as f:
        tensors = {n: np.array(f.raw(n)) for n in f.keys()}
    tensors["model.layers.1.mlp.up_proj.mean"] = tensors["model.layers.1.mlp.up_proj.mean"][:-1]
    write_safetensors(shard, tensors)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    r = runner.invoke(app, ["eval", str(bad), "--text", str(text), "--seqlen", "16", "--device", "cpu"])
    assert r.exit_code == 1 and "up_proj is corrupt (mean:" in r.output


@pytest.mark.parametrize("args,message", [
    (["--method", "billm"], "needs calibration text"),
    (["--method", "pbllm"], "--calib FILE"),
    (["--method", "rtn", "--calib", "CALIB"], "--calib applies to sage --recipe grid, sage --recipe vq, billm, pbllm, gptq"),
    (["--method", "rtn", "--bits", "3"], "--bits applies to --method sage --recipe grid"),
    (["--recipe", "paper", "--no-rotate"], "--rotate applies"),
    (["--levels", "kmeans"], "--levels must be lloyd, uniform, symmetric"),
    (["--recipe", "paper", "--calib", "CALIB"], "--method sage --recipe paper uses the weights only"),  # the paper recipe is data-free
    (["--method", "q1", "--target-bpw", "1.5"], "sage only"),
    (["--method", "awq"], "unknown method"),
    (["--method", "gptq"], "needs calibration text"),
    (["--recipe", "paper", "--saliency", "hessian"], "needs calibration text"),
    (["--saliency", "hessian"], "--saliency applies to --method sage --recipe paper, not to --method sage --recipe grid"),
    (["--rate-penalty", "0.1"], "--rate-penalty applies to --method sage --recipe paper"),
    (["--method", "rtn", "--seed", "1"], "--seed applies to --method sage --recipe grid, sage --recipe paper"),
    (["--method", "billm", "--recipe", "grid"], "--recipe applies to --method sage"),
    (["--method", "gptq", "--pbllm-fraction", "0.2"], "--pbllm-fraction applies to --method pbllm"),
    (["--recipe", "paper", "--bits", "3"], "--bits applies"),
    (["--recipe", "binary"], "--recipe must be grid or paper"),
    (["--target-bpw", "1.01"], "ask for at least"),
    (["--recipe", "paper", "--saliency", "hessian", "--calib", "CALIB", "--target-bpw", "1.5"], "use --rate-penalty"),
    (["--recipe", "paper", "--saliency", "gradient"], "--saliency must be magnitude or hessian"),
])
def test_bad_method_options_are_one_line_errors(tiny_src, calib_file, tmp_path, args, message):
    args = [str(calib_file) if a == "CALIB" else a for a in args]
    r = runner.invoke(app, ["compress", str(tiny_src), str(tmp_path / "out"), *args])
    assert r.exit_code == 1 and message in r.output
    assert not (tmp_path / "out").exists()


def test_skipped_linears_stay_fp16_under_calibration(tiny_src, calib_file, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, compress_args("pbllm", tiny_src, out, calib_file) + ["--skip", r"layers\.0\.mlp", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["matrices"]) == 11 and len(report["totals"]["skipped"]) == 3
    assert report["calibration"]["calib_samples"] == 4 and report["calibration"]["forward_seconds"] > 0
    stored = stored_bytes(out)
    assert stored["model.layers.0.mlp.up_proj.weight"] == 2 * 160 * 64
    load_model(out, get_backend("cpu"), 32).forward(np.arange(10), 0)


def test_gptq_bits_and_error_feedback():
    """B + 24/64 bits per weight plus the act-order; error feedback beats the same grids without it."""
    rng = np.random.default_rng(7)
    x = correlated_inputs(2048, 256, seed=8)
    w = (0.05 * rng.standard_normal((64, 256))).astype(np.float32)
    packed, w_hat = gptq.fit(w, hessian(x), bits=3)
    assert 8 * packed.nbytes / w.size == pytest.approx(3 + 24 / 64 + 16 / 64)
    perm = packed.perm.astype(np.int64)
    plain = np.empty_like(w)
    for g in range(4):  # the same min-max grids, each on the original weights of its group, no feedback
        cols = perm[64 * g:64 * (g + 1)]
        lo, hi = np.minimum(w[:, cols].min(1), 0), np.maximum(w[:, cols].max(1), 0)
        s = ((hi - lo) / 7)[:, None]
        z = np.round(-lo[:, None] / s)
        plain[:, cols] = s * (np.clip(np.round(w[:, cols] / s + z), 0, 7) - z)
    err = lambda w_hat: np.linalg.norm(x @ w.T - x @ w_hat.T)  # noqa: E731
    assert err(w_hat) < 0.8 * err(plain)

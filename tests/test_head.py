"""--head-bits (issue 14): the token embedding and lm_head packed with the grid recipe, looked up and run as
stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.eval.speed import load_pair
from sagekit.format.architecture import EMBED, HEAD
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.inspect import packed_bits
from sagekit.io.packed import read_packed
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.kernels import tiles
from sagekit.model.generate import generate
from sagekit.model.load import load_model

from conftest import tiny_config
from test_baselines import stored_bytes

runner = CliRunner()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def src(request, tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=request.param)
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", cfg, seed=3, std=0.05)


def compress(src, out, *args):
    r = runner.invoke(app, ["compress", str(src), str(out), "--device", "cpu", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text())


def test_a_packed_head_counts_its_bytes_and_shrinks_the_file(src, tmp_path):
    fp16, packed = compress(src, tmp_path / "fp16"), compress(src, tmp_path / "h4", "--head-bits", "4")
    names = [EMBED] if Checkpoint(src).config.tie_embeddings else [EMBED, HEAD]
    stored = stored_bytes(tmp_path / "h4")
    assert [h["name"] for h in packed["head"]] == names
    assert packed["totals"]["head_bytes"] == sum(v for k, v in stored.items() if k.rsplit(".", 1)[0] in names)
    assert fp16["totals"]["head_bytes"] == sum(v for k, v in stored_bytes(tmp_path / "fp16").items()
                                               if k in {n + ".weight" for n in names})
    assert packed["totals"]["head_bytes"] < 0.3 * fp16["totals"]["head_bytes"]
    assert packed["totals"]["file_bytes"] < fp16["totals"]["file_bytes"]
    assert packed["totals"]["linear_bytes"] == fp16["totals"]["linear_bytes"]
    modules = json.loads((tmp_path / "h4" / "config.json").read_text())["quantization_config"]["modules"]
    assert all(modules[n]["layout"] == "sage-grid" and modules[n]["bits"] == 4 for n in names)
    with Checkpoint(tmp_path / "h4") as ckpt:
        bits = packed_bits(ckpt)
    assert bits["linear_bytes"] == packed["totals"]["linear_bytes"]  # inspect lists the head, apart
    assert {r["name"] for r in bits["matrices"]} >= set(names)


def test_the_packed_head_runs_as_its_dequantised_weights(src, tmp_path):
    """Row lookup and the lm_head GEMV on the packed head match the dense twin built from unpack()."""
    compress(src, tmp_path / "h5", "--head-bits", "5")
    be = get_backend("cpu")
    pair = load_pair(tmp_path / "h5", be, 64)
    with Checkpoint(tmp_path / "h5") as ckpt:
        embed = read_packed(ckpt, EMBED).unpack()
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    np.testing.assert_allclose(pair.packed.weights.embed[tokens], embed[tokens], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(pair.packed.forward(tokens), pair.dense.forward(tokens), rtol=2e-2, atol=2e-2)
    model = load_model(tmp_path / "h5", be, 64)
    assert len(generate(model, [1, 2, 3], 4, temperature=0.0).tokens) == 4


def test_more_head_bits_keep_the_logits_closer(src, tmp_path):
    be = get_backend("cpu")
    tokens = np.arange(1, 40)
    ref = load_model(src, be, 64).forward(tokens)
    errs = []
    for bits in ("3", "6"):
        compress(src, tmp_path / bits, "--head-bits", bits, "--bits", "8")
        errs.append(float(np.abs(load_model(tmp_path / bits, be, 64).forward(tokens) - ref).mean()))
    assert errs[1] < 0.5 * errs[0]


@pytest.mark.parametrize("bits", ["1", "12"])
def test_bad_head_bits_are_one_line_errors(src, tmp_path, bits):
    r = runner.invoke(app, ["compress", str(src), str(tmp_path / "out"), "--head-bits", bits])
    assert r.exit_code == 1 and "--head-bits must be 2 to 8, or 16" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_a_calibrated_head_fits_the_lm_head_inputs(src, tmp_path):
    """With --calib the lm_head (the tied embedding) is rounded under the Hessian of its inputs, which the
    pass records after the last layer: its logit error on those inputs beats the data-free head's."""
    from sagekit.quant.calibration import CalibOptions, LayerwiseCalibration, calibration_windows
    from sagekit.quant.head import lm_head_name
    from test_baselines import calibration_text

    text = calibration_text(tmp_path / "calib.txt")
    calib = ["--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32"]
    compress(src, tmp_path / "free", "--head-bits", "3", "--bits", "8")
    compress(src, tmp_path / "cal", "--head-bits", "3", "--bits", "8", *calib)
    with Checkpoint(src) as ckpt:
        name, w = lm_head_name(ckpt.config), None
        w = ckpt.float32(name + ".weight")
        wins = calibration_windows(ckpt.folder, CalibOptions(text, 4, 32))
        run = LayerwiseCalibration(ckpt, get_backend("cpu"), wins, head=True)
        for _ in run.run(set(), lambda n: ckpt.float32(n + ".weight"), lambda n, w, h: (None, None)):
            pass
    h = run.head_hessian
    assert h.shape == (w.shape[1],) * 2 and np.allclose(h, h.T, atol=1e-5 * np.abs(h).max())

    def logit_error(folder):
        with Checkpoint(folder) as ckpt:
            d = read_packed(ckpt, name).unpack() - w
        return float(np.einsum("ij,jk,ik->", d, h, d))

    assert logit_error(tmp_path / "cal") < 0.9 * logit_error(tmp_path / "free")
    if name == HEAD:  # untied: the embedding is no lm_head and stays data-free
        with Checkpoint(tmp_path / "cal") as a, Checkpoint(tmp_path / "free") as b:
            np.testing.assert_array_equal(read_packed(a, EMBED).unpack(), read_packed(b, EMBED).unpack())


def test_the_default_head_is_5_bits_calibrated_and_fp16_data_free(src, tmp_path):
    from test_baselines import calibration_text

    calib = ["--calib", str(calibration_text(tmp_path / "c.txt")), "--calib-samples", "2", "--calib-seqlen", "32"]
    assert compress(src, tmp_path / "cal", "--bits", "4", *calib)["totals"]["head_bits"] == 5
    assert compress(src, tmp_path / "free", "--bits", "4")["totals"]["head_bits"] == 16
    assert compress(src, tmp_path / "kept", "--bits", "4", "--head-bits", "16", *calib)["totals"]["head_bits"] == 16


@pytest.mark.skipif(not tiles.INT8, reason="prefill products run at int8 only with AVX-512 VNNI")
def test_the_packed_head_keeps_its_prefill_products_at_float32(src, tmp_path, monkeypatch):
    """The body's prefill products may run at int8; the head's logits do not (they cost perplexity there):
    40 tokens of logits are the same with the int8 GEMM allowed or not."""
    compress(src, tmp_path / "h5", "--head-bits", "5")
    head = load_model(tmp_path / "h5", get_backend("cpu"), 64).weights.lm_head
    assert head.kernel in {"level", "book"}
    x = np.random.default_rng(0).standard_normal((tiles.INT8_MIN_TOKENS + 8, head.in_features)).astype(np.float32)
    allowed = head(x)
    monkeypatch.setattr(tiles, "INT8", False)
    np.testing.assert_array_equal(allowed, head(x))

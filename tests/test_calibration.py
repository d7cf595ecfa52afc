"""Calibration: seeded windows, layer Hessians equal to those of the recorded inputs, KL against a reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.errors import SagekitError
from sagekit.format.architecture import LLAMA_LAYER
from sagekit.format.config import LlamaConfig
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.linear import DequantLinear
from sagekit.model.load import load_model
from sagekit.model.tokenizer import load_tokenizer
from sagekit.quant import rtn
from sagekit.quant.calibration import CalibOptions, LayerwiseCalibration, calibration_windows
from sagekit.quant.compress import linear_names
from sagekit.quant.hessian import drift_target

from conftest import tiny_config
from test_baselines import calibration_text

runner = CliRunner()
ATTRS = {t.attr: t.suffix for t in LLAMA_LAYER.linears}  # attribute of a Layer -> HF suffix


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", tiny_config(), seed=3, std=0.05)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    return calibration_text(tmp_path_factory.mktemp("calib") / "calib.txt", seed=1)


def test_windows_are_seeded_slices_of_the_tokenised_text(tiny_src, calib_file):
    ids = np.asarray(load_tokenizer(tiny_src).encode(calib_file.read_text()).ids)
    a = calibration_windows(tiny_src, CalibOptions(calib_file, samples=5, seqlen=40, seed=0))
    b = calibration_windows(tiny_src, CalibOptions(calib_file, samples=5, seqlen=40, seed=0))
    c = calibration_windows(tiny_src, CalibOptions(calib_file, samples=5, seqlen=40, seed=1))
    assert a.shape == (5, 40) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    text = ids.tobytes()
    for w in a:  # each window is a contiguous run of the text's tokens
        assert w.tobytes() in text


def test_too_short_calibration_text_is_refused(tiny_src, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few tokens")
    with pytest.raises(SagekitError, match="--calib-seqlen"):
        calibration_windows(tiny_src, CalibOptions(short, samples=2, seqlen=64))


class Capture:
    """A linear that keeps a float64 copy of every input it is given (independent of HessianAccumulator)."""

    def __init__(self, inner, store: list):
        self.inner, self.store = inner, store
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def __call__(self, x):
        self.store.append(np.array(x, dtype=np.float64))
        return self.inner(x)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


def recorded_hessians(model, layer: int, windows: np.ndarray) -> dict[str, np.ndarray]:
    """2/n sum x x^T of every input each linear of `layer` sees while the model runs the windows."""
    return {suffix: 2.0 / len(x) * x.T @ x for suffix, x in recorded_inputs(model, layer, windows).items()}


def recorded_inputs(model, layer: int, windows: np.ndarray) -> dict[str, np.ndarray]:
    """Every input (rows, in) each linear of `layer` sees while the model runs the windows, in order."""
    inputs = {suffix: [] for suffix in ATTRS.values()}
    L = model.layers[layer]
    originals = {attr: getattr(L, attr) for attr in ATTRS}
    for attr, suffix in ATTRS.items():
        setattr(L, attr, Capture(originals[attr], inputs[suffix]))
    for w in windows:
        model.forward(w, 0)
    for attr, lin in originals.items():
        setattr(L, attr, lin)
    return {suffix: np.concatenate(xs) for suffix, xs in inputs.items()}


def test_layer_hessians_equal_those_of_the_inputs_the_quantised_model_feeds(tiny_src, calib_file):
    be = get_backend("cpu")
    windows = calibration_windows(tiny_src, CalibOptions(calib_file, samples=3, seqlen=32, seed=0))
    seen, packed = {}, {}

    def quantize(name: str, w: np.ndarray, h: np.ndarray):
        seen[name] = h
        packed[name], stats = rtn.quantize(w, None, name)
        return packed[name], stats

    names, _ = linear_names(LlamaConfig.from_hf(tiny_config()), None)
    with Checkpoint(tiny_src) as ckpt:
        out = list(LayerwiseCalibration(ckpt, be, windows).run(set(names), lambda n: ckpt.float32(n + ".weight"),
                                                               quantize))
    assert [s.name for _, s in out] == names

    dense = load_model(tiny_src, be, 32)
    reference = {i: recorded_hessians(dense, i, windows) for i in (0, 1)}
    model = load_model(tiny_src, be, 32)  # layer 0 quantised as the pass quantised it: layer 1's true inputs
    for attr, suffix in ATTRS.items():
        setattr(model.layers[0], attr, DequantLinear(packed[f"model.layers.0.{suffix}"], be))
    expected = {0: reference[0], 1: recorded_hessians(model, 1, windows)}
    for i in (0, 1):
        for suffix, h in expected[i].items():
            got = seen[f"model.layers.{i}.{suffix}"]
            assert got.dtype == np.float32 and got.shape == h.shape
            np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-5 * np.abs(h).max())
    # layer 1 must see the quantised layer 0, not the dense one
    h_dense = reference[1]["mlp.down_proj"]
    assert not np.allclose(seen["model.layers.1.mlp.down_proj"], h_dense, rtol=1e-2, atol=1e-3 * np.abs(h_dense).max())


def test_drift_target_solves_the_asymmetric_least_squares_problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 12))  # the FP16 model's inputs
    x_q = x + 0.3 * rng.standard_normal(x.shape)  # what the quantised layers before feed instead
    w = rng.standard_normal((5, 12))
    h, cross = 2 / len(x) * x_q.T @ x_q, 2 / len(x) * x.T @ x_q
    best = np.linalg.lstsq(x_q, x @ w.T, rcond=None)[0].T  # argmin ||x_q Q^T - x W^T||
    np.testing.assert_allclose(drift_target(w, h, cross, damp=0.0), best, rtol=1e-4, atol=1e-4)
    assert not np.allclose(best, w, atol=0.05)
    np.testing.assert_allclose(drift_target(w, h, h), w, rtol=1e-6)  # no drift: the weight itself
    damped = drift_target(w, h, cross, damp=10.0)  # heavy damping shrinks the correction towards W
    assert np.linalg.norm(damped - w) < 0.5 * np.linalg.norm(best - w)


def test_fp_targets_quantise_towards_the_fp16_models_outputs(tiny_src, calib_file):
    be = get_backend("cpu")
    windows = calibration_windows(tiny_src, CalibOptions(calib_file, samples=3, seqlen=32, seed=0))
    given, packed = {}, {}

    def quantize(name: str, w: np.ndarray, h: np.ndarray):
        given[name] = w, h
        packed[name], stats = rtn.quantize(w, None, name)
        return packed[name], stats

    names, _ = linear_names(LlamaConfig.from_hf(tiny_config()), None)
    with Checkpoint(tiny_src) as ckpt:
        list(LayerwiseCalibration(ckpt, be, windows, fp_targets=True).run(
            set(names), lambda n: ckpt.float32(n + ".weight"), quantize))
        original = {n: ckpt.float32(n + ".weight") for n in names}
    for suffix in ATTRS.values():  # layer 0 sees the FP16 inputs: nothing drifted yet
        name = f"model.layers.0.{suffix}"
        np.testing.assert_allclose(given[name][0], original[name], rtol=1e-4, atol=1e-6)
    dense_inputs = recorded_inputs(load_model(tiny_src, be, 32), 1, windows)
    model = load_model(tiny_src, be, 32)
    for attr, suffix in ATTRS.items():
        setattr(model.layers[0], attr, DequantLinear(packed[f"model.layers.0.{suffix}"], be))
    quant_inputs = recorded_inputs(model, 1, windows)
    for suffix in ("self_attn.q_proj", "mlp.down_proj"):
        x, x_q = dense_inputs[suffix], quant_inputs[suffix]
        h, cross = 2 / len(x) * x_q.T @ x_q, 2 / len(x) * x.T @ x_q
        w, got_h = given[f"model.layers.1.{suffix}"]
        np.testing.assert_allclose(got_h, h, rtol=1e-4, atol=1e-5 * np.abs(h).max())
        expected = drift_target(original[f"model.layers.1.{suffix}"], h, cross)
        np.testing.assert_allclose(w, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
        assert not np.allclose(w, original[f"model.layers.1.{suffix}"], rtol=1e-3, atol=1e-4)


def test_fp_targets_need_calibration_and_are_recorded(tiny_src, calib_file, tmp_path):
    r = runner.invoke(app, ["compress", str(tiny_src), str(tmp_path / "x"), "--fp-targets", "--bits", "2"])
    assert r.exit_code != 0 and "--calib" in r.output and not (tmp_path / "x").exists()
    shards = {}
    for flag in ("--fp-targets", "--no-fp-targets"):
        out = tmp_path / flag
        r = runner.invoke(app, ["compress", str(tiny_src), str(out), "--bits", "2", "--calib", str(calib_file),
                                "--calib-samples", "2", "--calib-seqlen", "32", flag, "--device", "cpu"])
        assert r.exit_code == 0, r.output
        shards[flag] = b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))
        q = json.loads((out / "config.json").read_text())["quantization_config"]
        assert q.get("calib_fp_targets", False) is (flag == "--fp-targets")
    assert shards["--fp-targets"] != shards["--no-fp-targets"]


def test_a_resumed_pass_skips_the_hessians_of_stored_layers_only(tiny_src, calib_file):
    be = get_backend("cpu")
    windows = calibration_windows(tiny_src, CalibOptions(calib_file, samples=2, seqlen=16))
    names, _ = linear_names(LlamaConfig.from_hf(tiny_config()), None)
    layer0 = {n for n in names if n.startswith("model.layers.0.")}

    def run(stored: set[str], packed: dict) -> dict:
        seen = {}

        def quantize(name, w, h):
            seen[name] = h
            if name in stored:
                return packed[name], None
            packed[name], stats = rtn.quantize(w, None, name)
            return packed[name], stats

        with Checkpoint(tiny_src) as ckpt:
            list(LayerwiseCalibration(ckpt, be, windows).run(set(names), lambda n: ckpt.float32(n + ".weight"),
                                                             quantize, stored))
        return seen

    packed = {}
    fresh = run(set(), packed)
    resumed = run(layer0, packed)
    assert all(resumed[n] is None for n in layer0) and all(fresh[n] is not None for n in layer0)
    for n in set(names) - layer0:  # layer 1 sees the stored layer 0 exactly as the fresh pass left it
        np.testing.assert_array_equal(resumed[n], fresh[n])


def test_q_k_v_and_gate_up_share_one_hessian(tiny_src, calib_file):
    be = get_backend("cpu")
    windows = calibration_windows(tiny_src, CalibOptions(calib_file, samples=2, seqlen=16))
    seen = {}

    def quantize(name, w, h):
        seen[name] = h
        return rtn.quantize(w, None, name)

    with Checkpoint(tiny_src) as ckpt:
        list(LayerwiseCalibration(ckpt, be, windows).run({f"model.layers.0.{s}" for s in ATTRS.values()},
                                                         lambda n: ckpt.float32(n + ".weight"), quantize))
    p = "model.layers.0."
    assert seen[p + "self_attn.q_proj"] is seen[p + "self_attn.k_proj"] is seen[p + "self_attn.v_proj"]
    assert seen[p + "mlp.gate_proj"] is seen[p + "mlp.up_proj"]
    assert seen[p + "mlp.down_proj"].shape == (160, 160)


def test_calibrated_compress_is_deterministic(tiny_src, calib_file, tmp_path):
    outs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        r = runner.invoke(app, ["compress", str(tiny_src), str(out), "--method", "pbllm", "--calib", str(calib_file),
                                "--calib-samples", "3", "--calib-seqlen", "32", "--calib-seed", seed,
                                "--device", "cpu"])
        assert r.exit_code == 0, r.output
        outs.append(b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors"))))
    assert outs[0] == outs[1] != outs[2]
    q = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert q["method"] == "pbllm" and q["calib_samples"] == 3 and q["knobs"] == {"fraction": 0.1, "damp": 0.01}


def test_sage_with_hessian_saliency_calibrates_and_differs_from_magnitude(tiny_src, calib_file, tmp_path):
    """`--saliency hessian` runs sage inside the layer-by-layer pass: deterministic, recorded in the config,
    a different salient set from the paper's magnitude ranking, and a folder that loads and runs."""
    outs = []
    for name, extra in (("h1", ["--saliency", "hessian", "--calib", str(calib_file), "--calib-samples", "3",
                                "--calib-seqlen", "32"]),
                        ("h2", ["--saliency", "hessian", "--calib", str(calib_file), "--calib-samples", "3",
                                "--calib-seqlen", "32"]),
                        ("mag", [])):
        out = tmp_path / name
        r = runner.invoke(app, ["compress", str(tiny_src), str(out), "--device", "cpu", "--recipe", "paper", "--rate-penalty", "0.01",
                                "--json", *extra])
        assert r.exit_code == 0, r.output
        outs.append(out)
    shards = [b"".join(p.read_bytes() for p in sorted(o.glob("*.safetensors"))) for o in outs]
    assert shards[0] == shards[1] != shards[2]
    q = json.loads((outs[0] / "config.json").read_text())["quantization_config"]
    assert q["method"] == "sage-paper" and q["knobs"]["saliency"] == "hessian" and q["calib_samples"] == 3
    report = json.loads((outs[0] / "report.json").read_text())
    assert report["calibration"]["forward_seconds"] > 0
    with Checkpoint(outs[0]) as a, Checkpoint(outs[2]) as b:
        name = "model.layers.1.mlp.down_proj.sal_idx"
        assert not np.array_equal(a.raw(name), b.raw(name))
    model = load_model(outs[0], get_backend("cpu"), 16)
    assert np.isfinite(model.forward(np.arange(8), 0)).all()


def test_kl_of_a_model_against_itself_is_zero(tiny_src, tmp_path):
    text = tmp_path / "t.txt"
    calibration_text(text, words=300, seed=4)
    r = runner.invoke(app, ["eval", str(tiny_src), "--text", str(text), "--seqlen", "64", "--max-windows", "3",
                            "--reference", str(tiny_src), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["windows"] == 3
    assert abs(result["kl"]) < 1e-9 and result["top1"] == 1.0

"""The architecture table: a Mistral checkpoint is a row of it (same tensors, same model as Llama), a sliding
window longer contexts would cross is refused in one line, and the model and loader follow the table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.api import load
from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.errors import SagekitError
from sagekit.format.architecture import ARCHITECTURES, LLAMA_LAYER, architecture_of
from sagekit.format.config import LlamaConfig
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.llama import Layer
from sagekit.model.load import load_model

from conftest import tiny_config
from test_bad_input import assert_nothing_left, cli_error
from test_baselines import calibration_text

runner = CliRunner()
MISTRAL = dict(architectures=["MistralForCausalLM"], model_type="mistral")


def _mistral(folder: Path, **config) -> Path:
    """The tiny Llama checkpoint of seed 3 (the same tensors, drawn alike) with a Mistral config.json."""
    return write_random_checkpoint(folder, tiny_config(**MISTRAL, **config), seed=3, std=0.2)


def test_the_model_layer_is_the_tables_layer():
    assert [f.name for f in dataclasses.fields(Layer)] == ["attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up",
                                                           "down"]
    assert {f.name for f in dataclasses.fields(Layer)} == {t.attr for t in (*LLAMA_LAYER.norms, *LLAMA_LAYER.linears)}
    assert LLAMA_LAYER.inputs() == {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o_proj", "gate": "gate_up",
                                    "up": "gate_up", "down": "down_proj"}


def test_rows_are_found_by_model_type_or_by_class():
    assert architecture_of({"model_type": "mistral"}).name == "Mistral"
    assert architecture_of({"architectures": ["LlamaForCausalLM"]}).name == "Llama"
    with pytest.raises(SagekitError, match="model_type 'qwen2'"):
        architecture_of({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    assert [a.model_type for a in ARCHITECTURES] == ["llama", "mistral"]


def test_a_mistral_checkpoint_runs_as_the_llama_with_its_tensors(tmp_path):
    llama = write_random_checkpoint(tmp_path / "llama", tiny_config(), seed=3, std=0.2)
    mistral = _mistral(tmp_path / "mistral", sliding_window=None)
    assert (llama / "model.safetensors").read_bytes() == (mistral / "model.safetensors").read_bytes()
    tokens = np.random.default_rng(1).integers(0, 300, 40)
    be = get_backend("cpu")
    np.testing.assert_array_equal(load_model(mistral, be, 64).forward(tokens), load_model(llama, be, 64).forward(tokens))
    r = runner.invoke(app, ["inspect", str(mistral), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["architecture"]["model_type"] == "mistral"


def test_a_mistral_checkpoint_compresses_to_the_llama_bytes(tmp_path):
    outs = {}
    for name, cfg in (("llama", tiny_config()), ("mistral", tiny_config(**MISTRAL, sliding_window=4096))):
        src = write_random_checkpoint(tmp_path / name, cfg, seed=3, std=0.05)
        r = runner.invoke(app, ["compress", str(src), str(tmp_path / f"{name}-out"), "--bits", "3"])
        assert r.exit_code == 0, r.output
        outs[name] = b"".join(p.read_bytes() for p in sorted((tmp_path / f"{name}-out").glob("*.safetensors")))
    assert outs["llama"] == outs["mistral"]
    assert LlamaConfig.load(tmp_path / "mistral-out" / "config.json").sliding_window == 4096


def test_a_context_past_the_sliding_window_is_refused_in_one_line(tmp_path):
    m = _mistral(tmp_path / "m", sliding_window=32)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    line = cli_error(["eval", m, "--text", text, "--seqlen", "64", "--device", "cpu"])
    assert "sliding_window of 32" in line and "at most 32 tokens" in line
    r = runner.invoke(app, ["eval", str(m), "--text", str(text), "--seqlen", "32", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert np.isfinite(json.loads(r.stdout)["ppl"])
    assert load(m, "cpu").context_length == 32  # the API's default context stops at the window
    with pytest.raises(SagekitError, match="sliding_window"):
        load(m, "cpu", context_length=64)
    calib = calibration_text(tmp_path / "calib.txt", seed=1)  # calibration runs windows of its own length
    line = cli_error(["compress", m, tmp_path / "out", "--bits", "2", "--calib", calib, "--calib-samples", "2",
                      "--calib-seqlen", "64", "--device", "cpu"])
    assert "sliding_window of 32" in line
    assert_nothing_left(tmp_path, {"m", "t.txt", "calib.txt"})


def test_a_llama_config_ignores_a_sliding_window_key(tmp_path):
    """HF's Llama has no sliding window: the key means nothing there, as before the table had a Mistral row."""
    assert LlamaConfig.from_hf(tiny_config(sliding_window=8)).sliding_window is None

"""The method registry: a method is one module plus one line of sagekit.quant.registry.MODULES."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.load import load_model
from sagekit.quant import registry
from sagekit.quant.compress import CompressOptions, compress

from conftest import tiny_config
from toy_method import ToyKnobs

runner = CliRunner()


@pytest.fixture
def toy(monkeypatch) -> None:
    monkeypatch.setitem(registry.MODULES, "toy", "toy_method")  # the one registry line


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", tiny_config(), seed=5, std=0.05)


def test_a_toy_method_compresses_loads_evaluates_and_generates(toy, tiny_src, tmp_path):
    out = tmp_path / "toy"
    r = runner.invoke(app, ["compress", str(tiny_src), str(out), "--method", "toy", "--json"])
    assert r.exit_code == 0, r.output
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["method"] == "toy" and q["knobs"] == {"shrink": 0.8}
    assert {m["layout"] for m in q["modules"].values()} == {"rtn"}
    name = "model.layers.1.mlp.up_proj"
    with Checkpoint(tiny_src) as src, Checkpoint(out) as packed:
        w = src.float32(name + ".weight")
        scale = packed.raw(name + ".scale").astype(np.float32)
    np.testing.assert_allclose(scale, 0.8 * np.sqrt(np.mean(w * w, axis=1)), rtol=1e-3)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 30)
    r = runner.invoke(app, ["eval", str(out), "--text", str(text), "--seqlen", "16", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert np.isfinite(json.loads(r.output.strip().splitlines()[-1])["ppl"])
    r = runner.invoke(app, ["generate", str(out), "--prompt", "the quick", "-n", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_a_methods_knobs_reach_its_quantize(toy, tiny_src, tmp_path):
    shards = []
    for shrink in (0.8, 0.5):
        out = tmp_path / str(shrink)
        compress(tiny_src, out, CompressOptions(method="toy", knobs=ToyKnobs(shrink=shrink)))
        shards.append(b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors"))))
        assert np.isfinite(load_model(out, get_backend("cpu"), 16).forward(np.arange(6), 0)).all()
    assert shards[0] != shards[1]


def test_options_a_method_does_not_take_are_refused_by_name(toy, tiny_src, tmp_path):
    r = runner.invoke(app, ["compress", str(tiny_src), str(tmp_path / "x"), "--method", "toy", "--bits", "2"])
    assert r.exit_code == 1 and "--bits applies to --method sage --recipe grid, gptq, not to --method toy" in r.output
    assert not (tmp_path / "x").exists()


def test_every_registered_method_declares_what_compress_needs():
    for name in registry.MODULES:
        m = registry.get(name)
        assert m.name == name and m.calibration in ("none", "optional", "required")
        assert callable(m.module().quantize)
        m.knobs()  # defaults for every knob
    assert registry.resolve("sage", None) == "sage-grid" and registry.resolve("sage", "paper") == "sage-paper"
    assert registry.get("sage").name == "sage-paper"  # folders from before the registry say "sage"

"""End-to-end SAGE compression on tiny random checkpoints: honest bits, determinism, lossless format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.backend import get_backend
from sagekit.cli import app
from sagekit.format.sage import PackedSage, unpack_sage
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.safetensors import SafetensorsFile, write_safetensors
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.load import load_model
from sagekit.quant.compress import CompressOptions, compress

from conftest import tiny_config, write_chat_model

runner = CliRunner()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    # heavy-tailed weights so that salient weights exist and the threshold search has something to find
    path = write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", tiny_config(), seed=11, std=0.05)
    return path


@pytest.fixture(scope="module")
def packed_dir(tiny_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "out"
    r = runner.invoke(app, ["compress", str(tiny_src / "model.safetensors"), str(out), "--recipe", "paper", "--rate-penalty", "0.02"])
    assert r.exit_code == 0, r.output
    return out


def test_true_bits_equal_the_stored_bytes(packed_dir):
    report = json.loads((packed_dir / "report.json").read_text())
    shards = sorted(packed_dir.glob("*.safetensors"))
    stored: dict[str, int] = {}
    for s in shards:  # bytes per tensor straight from each header's offsets
        raw = s.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        for name, e in json.loads(raw[8:8 + n]).items():
            if name != "__metadata__":
                stored[name] = e["data_offsets"][1] - e["data_offsets"][0]
    total_weights = total_bytes = 0
    for m in report["matrices"]:
        nbytes = sum(v for k, v in stored.items() if k.startswith(m["name"] + "."))
        n = m["shape"][0] * m["shape"][1]
        assert m["true_bits"] == pytest.approx(8 * nbytes / n, rel=1e-12)
        total_weights, total_bytes = total_weights + n, total_bytes + nbytes
    t = report["totals"]
    assert t["linear_true_bpw"] == pytest.approx(8 * total_bytes / total_weights, rel=1e-12)
    assert t["file_bytes"] == sum(s.stat().st_size for s in shards)
    assert any(m["salient_fraction"] > 0 for m in report["matrices"])
    assert t["linear_paper_bits"] < t["linear_true_bpw"]


def test_no_weight_sized_float_tensor_is_stored(packed_dir):
    with Checkpoint(packed_dir) as ckpt:
        modules = ckpt.quantization["modules"]
        assert len(modules) == 2 * 7
        for name in ckpt.names():
            f = ckpt.file_of(name)
            prefix = name.rsplit(".", 1)[0]
            if prefix in modules and f.dtype(name) in ("F16", "F32", "BF16"):
                out, in_ = modules[prefix]["shape"]
                assert np.prod(f.shape(name)) < out * in_ / 8, name


def test_inspect_reports_the_same_bits(packed_dir):
    r = runner.invoke(app, ["inspect", str(packed_dir), "--json"])
    assert r.exit_code == 0, r.output
    bits = json.loads(r.stdout)["bits"]
    t = json.loads((packed_dir / "report.json").read_text())["totals"]
    for k in ("linear_true_bpw", "linear_paper_bits", "linear_paper_scale_bits", "file_true_bpw"):
        assert bits[k] == pytest.approx(t[k], rel=1e-12)


def test_same_seed_gives_identical_bytes_and_workers_do_not_matter(tiny_src, packed_dir, tmp_path):
    out = tmp_path / "again"
    r = runner.invoke(app, ["compress", str(tiny_src), str(out), "--recipe", "paper", "--rate-penalty", "0.02", "--workers", "2"])
    assert r.exit_code == 0, r.output
    a, b = digest(packed_dir), digest(out)
    a.pop("report.json"), b.pop("report.json")  # it records wall-clock seconds
    assert a == b
    r = runner.invoke(app, ["compress", str(tiny_src), str(tmp_path / "seed1"), "--recipe", "paper", "--rate-penalty", "0.02",
                            "--seed", "1", "--n-sub", "64"])
    assert r.exit_code == 0


def _dequantized_dense_copy(packed: Path, dst: Path) -> Path:
    """A plain FP32 checkpoint holding exactly the weights the packed folder describes."""
    tensors = {}
    with Checkpoint(packed) as ckpt:
        modules = ckpt.quantization["modules"]
        for name in ckpt.names():
            if name.rsplit(".", 1)[0] not in modules:
                tensors[name] = ckpt.float32(name)
        for prefix, info in modules.items():
            arrays = {f: np.array(ckpt.raw(f"{prefix}.{f}")) for f in
                      ("sign", "gid", "alpha", "sal_ptr", "sal_idx", "sal_val", "sal_scale")}
            tensors[prefix + ".weight"] = unpack_sage(PackedSage.from_arrays(arrays, tuple(info["shape"])))
        cfg = {k: v for k, v in ckpt.config.raw.items() if k != "quantization_config"}
    dst.mkdir()
    write_safetensors(dst / "model.safetensors", tensors)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "tokenizer.json").write_text((packed / "tokenizer.json").read_text())
    return dst


def test_packed_model_equals_dense_model_with_the_same_weights(packed_dir, tmp_path):
    dense = _dequantized_dense_copy(packed_dir, tmp_path / "dense")
    tokens = np.random.default_rng(0).integers(0, 300, 48)
    be = get_backend("cpu")
    a = load_model(packed_dir, be, 64).forward(tokens, 0)
    b = load_model(dense, be, 64).forward(tokens, 0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_target_bpw_lands_near_the_target(tiny_src, tmp_path):
    report = compress(tiny_src, tmp_path / "t", CompressOptions(method="sage-paper", target_bpw=2.5))
    assert report["totals"]["linear_true_bpw"] == pytest.approx(2.5, abs=0.1)
    assert any(m["groups"] > 1 for m in report["matrices"]), "2.5 bits are out of reach without G > 1"


def test_failed_compress_leaves_no_output(tmp_path):
    src = write_random_checkpoint(tmp_path / "m", tiny_config(), seed=1)
    with SafetensorsFile(src / "model.safetensors") as f:
        tensors = {n: f.float32(n) for n in f.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    write_safetensors(src / "model.safetensors", tensors)
    r = runner.invoke(app, ["compress", str(src), str(tmp_path / "out")])
    assert r.exit_code != 0 and "NaN" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_existing_output_is_refused_unless_forced(tiny_src, packed_dir):
    r = runner.invoke(app, ["compress", str(tiny_src), str(packed_dir)])
    assert r.exit_code != 0 and "--force" in r.output


def test_demo_says_what_runs_after_its_summary(tmp_path, monkeypatch):
    """The demo on a tiny stand-in for the demo model (already imported into the cache): between the compress
    summary and the side-by-side table, a line says what the slow part is doing."""
    monkeypatch.setenv("SAGEKIT_CACHE", str(tmp_path / "cache"))
    write_chat_model(tmp_path / "cache" / "smollm2-135m-instruct")
    r = runner.invoke(app, ["demo", str(tmp_path / "out"), "--max-new-tokens", "2", "--seqlen", "16",
                            "--max-windows", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    summary, running, table = (r.output.find(s) for s in ("true bits / weight", "running both models", "decode tok/s"))
    assert -1 < summary < running < table, r.output
    assert "both models run" in r.output  # the progress bar's last state

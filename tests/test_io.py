"""safetensors reading/writing, checkpoint discovery, and the one-line errors for bad input."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.cli import app
from sagekit.errors import SagekitError
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.safetensors import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors
from sagekit.io.synthetic import write_random_checkpoint

from conftest import tiny_config

runner = CliRunner()


def test_roundtrip_all_float_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((7, 5)).astype(np.float32)
    tensors = {"a": a32, "b": a32.astype(np.float16), "c": np.arange(10, dtype=np.uint32), "d": np.int8([-3, 4])}
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"k": "v"})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.metadata == {"k": "v"}
        for k, v in tensors.items():
            assert f.raw(k).dtype == v.dtype and np.array_equal(f.raw(k), v)
    write_safetensors(tmp_path / "y.safetensors", {"a": a32}, bf16=True)
    with SafetensorsFile(tmp_path / "y.safetensors") as f:
        assert f.dtype("a") == "BF16"
        np.testing.assert_allclose(f.float32("a"), a32, rtol=2 ** -8)


def _rss_file_kib() -> int:
    """Pages of mapped files resident in this process (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("read, first", [("float32", 1.0), ("float16", 1.0), ("copy", 0x3F80)])
def test_streaming_reads_do_not_keep_the_file_resident(tmp_path, read, first):
    """Reading every tensor of a 64 MiB BF16 file one at a time must not leave 64 MiB of it resident:
    a 13 GB checkpoint would otherwise count in full against the 4 GB compress budget, and a packed model's
    file pages against its generation's peak memory (copy: how packed tensors are read)."""
    tensors = {f"w{i}": np.ones((1024, 4096), np.float32) for i in range(8)}
    write_safetensors(tmp_path / "m.safetensors", tensors, bf16=True)
    with SafetensorsFile(tmp_path / "m.safetensors") as f:
        before = _rss_file_kib()
        kept = [getattr(f, read)(name) for name in f.keys()]
        grown = _rss_file_kib() - before
        assert all(a.shape == (1024, 4096) and a[0, 0] == first for a in kept)
    assert grown < 16 * 1024, f"{grown} KiB of the file stayed resident"
    assert kept[-1][-1, -1] == first  # copies: still readable after the file closed


def test_bf16_rounds_to_nearest_even():
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7 (odd mantissa): ties go to the even neighbour 1.0;
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): it goes up.
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 1.0 + 2 ** -7], dtype=np.float32)
    want = np.array([1.0, 1.0, 1.0 + 2 ** -6, -2.5, 1.0 + 2 ** -7], dtype=np.float32)
    assert np.array_equal(bf16_to_f32(f32_to_bf16(x)), want)


def test_files_interoperate_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    a = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float16)
    write_safetensors(tmp_path / "ours.safetensors", {"w": a})
    assert np.array_equal(st.load_file(str(tmp_path / "ours.safetensors"))["w"], a)
    st.save_file({"w": a}, str(tmp_path / "theirs.safetensors"))
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert np.array_equal(f.raw("w"), a)


def _cli_error(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code != 0, r.output
    assert "error:" in r.output
    assert "Traceback" not in r.output
    return " ".join(r.output.split())


def _corrupt(path, data: bytes):
    path.write_bytes(data)


@pytest.mark.parametrize("damage, words", [
    ("truncate", "truncated"),
    ("empty", "truncated"),
    ("header_json", "not valid JSON"),
    ("header_len", "header length"),
    ("offsets_lie", "do not match its shape"),
])
def test_corrupt_safetensors_is_a_clean_error(tiny_model, damage, words):
    f = tiny_model / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b"abc"
    elif damage == "header_json":
        data = data[:8] + b"{" + b"\x00" * (n - 1) + data[8 + n:]
    elif damage == "header_len":
        data = struct.pack("<Q", 2 ** 40) + data[8:]
    else:
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        data = struct.pack("<Q", len(head)) + head + data[8 + n:]
    _corrupt(f, data)
    msg = _cli_error(["inspect", str(tiny_model)])
    assert words in msg


def test_unsupported_architecture(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    assert "unsupported architecture" in _cli_error(["inspect", str(tiny_model)])


def test_missing_config_key(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    del cfg["intermediate_size"]
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    assert "intermediate_size" in _cli_error(["inspect", str(tiny_model)])


def test_shape_that_disagrees_with_config(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", tiny_config())
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    msg = _cli_error(["inspect", str(path)])
    assert "mlp.gate_proj.weight" in msg and "do not belong together" in msg


def test_missing_tokenizer(tiny_model):
    os.remove(tiny_model / "tokenizer.json")
    assert "no tokenizer.json" in _cli_error(["generate", str(tiny_model), "--prompt", "hi", "-n", "2"])


def test_missing_shard(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", tiny_config(), shards=2)
    os.remove(path / "model-00002-of-00002.safetensors")
    assert "missing" in _cli_error(["inspect", str(path)])


def test_not_a_model(tmp_path):
    assert "does not exist" in _cli_error(["inspect", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "no .safetensors" in _cli_error(["inspect", str(tmp_path / "empty")])


def test_single_safetensors_path_with_config_beside_it(tiny_model):
    with Checkpoint(tiny_model / "model.safetensors") as ckpt:
        assert ckpt.config.n_layers == 2
    r = runner.invoke(app, ["generate", str(tiny_model / "model.safetensors"), "--prompt", "ab", "-n", "3",
                            "--temperature", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["tokens"]) == 3


def test_eval_json_on_a_tiny_model(tiny_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 40)
    r = runner.invoke(app, ["eval", str(tiny_model), "--text", str(text), "--seqlen", "64", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"ppl", "nll", "tokens", "windows", "seqlen", "seconds"} <= set(res)
    assert res["windows"] == len("hello world, " * 40) // 64 and res["tokens"] == res["windows"] * 63
    assert np.isclose(res["ppl"], np.exp(res["nll"]))


def test_text_shorter_than_a_window(tiny_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("short")
    assert "fewer than one window" in _cli_error(["eval", str(tiny_model), "--text", str(text), "--seqlen", "64"])


def test_unknown_device_and_cuda_without_gpu(tiny_model):
    from sagekit.backend import get_backend, gpu_available

    with pytest.raises(SagekitError):
        get_backend("tpu")
    if not gpu_available():
        assert "no usable CUDA GPU" in _cli_error(["generate", str(tiny_model), "-p", "x", "--device", "cuda"])


def test_import_gguf_refuses_bad_input_and_unwritable_output(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    assert "not a readable GGUF" in _cli_error(["import-gguf", str(bad), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert "does not exist" in _cli_error(["import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o2")])


def test_output_folder_checks(tmp_path):
    from sagekit.io.atomic import atomic_folder

    (tmp_path / "exists").mkdir()
    with pytest.raises(SagekitError, match="already exists"):
        with atomic_folder(tmp_path / "exists"):
            pass
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SagekitError, match="is a file, not a folder"):
        with atomic_folder(tmp_path / "a_file" / "out"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "fails") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "fails").exists()
    assert not any(p.name.startswith(".fails") for p in tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits, so no folder is unwritable")
def test_unwritable_output_folder(tmp_path):
    from sagekit.io.atomic import atomic_folder

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SagekitError, match="no write permission"):
            with atomic_folder(ro / "out"):
                pass
    finally:
        ro.chmod(0o700)

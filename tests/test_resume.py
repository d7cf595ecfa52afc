"""Resume: compress killed (SIGKILL) at random points and rerun ends byte-identical to one clean run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sagekit.cli import app
from sagekit.io.partial import partial_path
from sagekit.io.synthetic import write_random_checkpoint

from conftest import WIKI_VALID, tiny_config

runner = CliRunner()
ARGS = ["--recipe", "paper", "--n-sub", "256"]
N_LAYERS = 6


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    cfg = tiny_config(num_hidden_layers=N_LAYERS, hidden_size=128, intermediate_size=352)
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", cfg, seed=3, std=0.05)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    r = runner.invoke(app, ["compress", str(src), str(out), *ARGS])
    assert r.exit_code == 0, r.output
    return out


def _without_seconds(x):
    if isinstance(x, dict):
        return {k: _without_seconds(v) for k, v in x.items() if not k.endswith("seconds") and k != "resumed_matrices"}
    if isinstance(x, list):
        return [_without_seconds(v) for v in x]
    return x


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file; report.json compared without its wall-clock fields."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "report.json":
            data = json.dumps(_without_seconds(json.loads(data))).encode()
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def _finished(out: Path) -> int:
    return len(list(partial_path(out).glob("*.safetensors")))


def _kill_after(src: Path, out: Path, k: int, workers: int, args: list[str] = ARGS) -> int:
    """Start `sagekit compress` and SIGKILL it once k matrices are stored; returns how many were."""
    cmd = [sys.executable, "-m", "sagekit", "compress", str(src), str(out), *args, "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and _finished(out) < k and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()  # the main process only: its pool workers must notice and exit (else communicate times out)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -9, f"compress ended before it could be killed: {stderr.decode()[-500:]}"
    return _finished(out)


def test_killed_three_times_then_resumed_is_byte_identical(src, clean, tmp_path):
    out = tmp_path / "out"
    n = 7 * N_LAYERS
    kill_points = sorted(np.random.default_rng().choice(np.arange(1, n * 3 // 4), size=3, replace=False))
    stored = [_kill_after(src, out, int(k), workers) for k, workers in zip(kill_points, (1, 2, 1))]
    assert not out.exists(), "a killed run must not leave OUT_DIR"
    assert 0 < stored[0] <= stored[-1] < n, (kill_points, stored)
    r = runner.invoke(app, ["compress", str(src), str(out), *ARGS])
    assert r.exit_code == 0, r.output
    assert f"resuming: {stored[-1]} of {n} matrices" in r.output
    assert digest(out) == digest(clean), f"kill points {kill_points}"
    assert json.loads((out / "report.json").read_text())["resumed_matrices"] == stored[-1]
    assert not partial_path(out).exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_changed_knobs_start_over_and_say_why(src, clean, tmp_path):
    out = tmp_path / "out"
    _kill_after(src, out, 3, 1)
    r = runner.invoke(app, ["compress", str(src), str(out), "--recipe", "paper", "--n-sub", "128"])
    assert r.exit_code == 0, r.output
    assert "starting over" in r.output and "knobs" in r.output
    assert json.loads((out / "report.json").read_text())["resumed_matrices"] == 0


def test_a_copied_input_resumes_and_a_changed_one_starts_over(src, clean, tmp_path):
    """The store trusts the inputs' bytes, not their mtimes: a re-mounted data folder must not cost the work."""
    copy = tmp_path / "m"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())  # new mtimes, same bytes
    out = tmp_path / "out"
    _kill_after(src, out, 3, 1)
    r = runner.invoke(app, ["compress", str(copy), str(out), *ARGS])
    assert r.exit_code == 0 and "resuming: 3 of" in r.output, r.output
    assert digest(out) == digest(clean)

    out2, weights = tmp_path / "out2", copy / "model.safetensors"
    _kill_after(copy, out2, 3, 1)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: same size, and the mtime is put back
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    r = runner.invoke(app, ["compress", str(copy), str(out2), *ARGS])
    assert r.exit_code == 0 and "starting over" in r.output and "inputs" in r.output, r.output


def test_a_damaged_stored_matrix_is_computed_again(src, clean, tmp_path):
    out = tmp_path / "out"
    _kill_after(src, out, 4, 1)
    victim = sorted(partial_path(out).glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-7])  # e.g. a disk that lost the tail of the file
    r = runner.invoke(app, ["compress", str(src), str(out), *ARGS])
    assert r.exit_code == 0, r.output
    assert digest(out) == digest(clean)


def test_orphaned_temporary_folders_of_killed_runs_are_removed(src, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".out.tmp-{int(dead.stdout)}"
    orphan.mkdir()
    (orphan / "model-00001.safetensors").write_bytes(b"half")
    r = runner.invoke(app, ["compress", str(src), str(tmp_path / "out"), *ARGS])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_calibrated_method_resumes_from_its_stored_layers(src, tmp_path):
    """billm reuses the stored matrices and runs the calibration pass on them: same bytes as a clean run."""
    if not WIKI_VALID.exists():
        pytest.skip(f"{WIKI_VALID} not found (the shared data folder sits beside the checkout)")
    args = ["--method", "billm", "--calib", str(WIKI_VALID), "--calib-samples", "4", "--calib-seqlen", "32"]
    clean = tmp_path / "clean"
    assert runner.invoke(app, ["compress", str(src), str(clean), *args]).exit_code == 0
    out = tmp_path / "out"
    stored = _kill_after(src, out, 10, 1, args)
    r = runner.invoke(app, ["compress", str(src), str(out), *args])
    assert r.exit_code == 0, r.output
    assert f"resuming: {stored} of" in r.output
    assert digest(out) == digest(clean)

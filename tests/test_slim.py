"""The slim runtime: generate, eval and inspect must work with scipy unimportable; compress must say which
extra it needs.

scipy is needed by compression only (spectral clustering, the threshold search, GPTQ-style Hessian
updates) and comes with the `compress` extra; a machine that only runs packed models should not need it.
Each command runs in a fresh interpreter whose `sys.modules["scipy"] = None` makes every `import scipy...`
raise ImportError, so a module-level scipy import anywhere on the inference path fails the test. Models are
prepared in this process, where scipy is available.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sagekit.io.synthetic import write_random_checkpoint
from sagekit.quant.compress import CompressOptions, compress
from sagekit.quant.sage import SageKnobs

from conftest import tiny_config

NO_SCIPY = "import sys; sys.modules['scipy'] = None; from sagekit.cli import app; app()"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slim")
    dense = write_random_checkpoint(root / "dense", tiny_config(), seed=3)
    compress(dense, root / "sage", CompressOptions(method="sage-paper", knobs=SageKnobs(n_sub=64)))
    compress(dense, root / "rtn", CompressOptions(method="rtn"))
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return {"dense": dense, "sage": root / "sage", "rtn": root / "rtn", "text": root / "text.txt"}


def _run_without_scipy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_SCIPY, *args], capture_output=True, text=True, timeout=300)


def _without_scipy(*args: str) -> dict:
    r = _run_without_scipy(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["dense", "sage", "rtn"])
def test_runtime_commands_need_no_scipy(models, kind):
    model = str(models[kind])
    g = _without_scipy("generate", model, "--prompt", "The fox", "-n", "4", "--temperature", "0", "--json")
    assert len(g["tokens"]) == 4
    e = _without_scipy("eval", model, "--text", str(models["text"]), "--seqlen", "64", "--json")
    assert e["windows"] >= 1 and e["ppl"] > 1
    i = _without_scipy("inspect", model, "--json")
    assert i["architecture"]["layers"] == 2


@pytest.mark.parametrize("method", [[], ["--recipe", "paper"], ["--method", "rtn"]])
def test_compress_without_scipy_names_the_extra(models, tmp_path, method):
    """One line naming the extra, before any work: no traceback, no output folder, no partial store."""
    r = _run_without_scipy("compress", str(models["dense"]), str(tmp_path / "out"), *method)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "error: compressing needs SciPy, which this install lacks: pip install 'sagekit[compress]'"]
    assert list(tmp_path.iterdir()) == []

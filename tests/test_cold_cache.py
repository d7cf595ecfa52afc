"""A kernel compiled fresh and the same kernel loaded from Numba's cache give the same bits.

Numba builds a parallel kernel twice: the process that compiles it runs one build, and the build it caches has
been optimised again (numba/numba#10617). Under reassociating fast math the two summed in different orders,
so a compress or a generation differed between its first run and the next (sagekit/kernels/fastmath.py).
Each run here is a child process with its own NUMBA_CACHE_DIR: the first compiles every kernel, the second
reads them all from the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from numba import njit
from typer.testing import CliRunner

from sagekit.cli import app
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.kernels.fastmath import ordered_dot, ordered_sum

# a prefill past 32 positions (the softmax sums' lanes), then decode steps; the hits show which build ran
RUN = """
import sys
from pathlib import Path
import numpy as np
from sagekit.backend import get_backend
from sagekit.kernels import transformer_ops
from sagekit.model.load import load_model
logits = []
for folder in sys.argv[2:]:
    model = load_model(Path(folder), get_backend("cpu"), 96)
    tokens = np.arange(3, 80) % model.config.vocab_size
    logits.append(np.asarray(model.forward(tokens[:70], 0)).ravel())
    logits += [np.asarray(model.forward(tokens[i:i + 1], i)).ravel() for i in range(70, 77)]
np.save(sys.argv[1], np.concatenate(logits))
print(sum(transformer_ops.causal_softmax.stats.cache_hits.values()))
"""


def _run(out: Path, folders: list[Path], cache: Path) -> tuple[np.ndarray, int]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-c", RUN, str(out), *map(str, folders)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out), int(r.stdout.split()[-1])


def test_the_cached_build_gives_the_fresh_builds_bits(tmp_path):
    cfg = tiny_config(hidden_size=256, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2)
    src = write_random_checkpoint(tmp_path / "src", cfg, seed=5, std=0.05)
    folders = [src]
    for name, args in {"grid": ["--bits", "2"], "vq": ["--recipe", "vq"], "paper": ["--recipe", "paper"]}.items():
        r = CliRunner().invoke(app, ["compress", str(src), str(tmp_path / name), "--device", "cpu", *args])
        assert r.exit_code == 0, r.output
        folders.append(tmp_path / name)
    fresh, hits = _run(tmp_path / "fresh.npy", folders, tmp_path / "numba")
    cached, cached_hits = _run(tmp_path / "cached.npy", folders, tmp_path / "numba")
    assert hits == 0 and cached_hits > 0, "the first run should compile, the second read the cache"
    assert np.isfinite(fresh).all()
    np.testing.assert_array_equal(cached, fresh)


@njit
def _ordered(a, b, n):
    return ordered_dot(a, b, n), ordered_sum(a, n)


@pytest.mark.parametrize("n", [0, 5, 32, 100, 576])
def test_the_ordered_sums_are_the_sums(n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal(n + 3).astype(np.float32), rng.standard_normal(n + 3).astype(np.float32)
    dot, total = _ordered(a, b, n)
    assert abs(dot - a[:n].astype(np.float64) @ b[:n]) < 1e-5 * max(1.0, np.abs(a[:n] * b[:n]).sum())
    assert abs(total - a[:n].astype(np.float64).sum()) < 1e-5 * max(1.0, np.abs(a[:n]).sum())

"""The thread-pool settings `import sagekit` makes before NumPy and Numba load their pools (sagekit/__init__.py):
neither pool spins on a core the other needs, and a value the user set wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = "import os, sagekit; print(__import__('json').dumps({k: os.environ.get(k) for k in %r}))"
NAMES = ["OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"]


def _settings(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in NAMES}
    out = subprocess.run([sys.executable, "-c", PROBE % NAMES], env={**base, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_import_sets_both_pools_to_stop_spinning():
    assert _settings() == {"OMP_WAIT_POLICY": "passive", "OPENBLAS_THREAD_TIMEOUT": "16"}


def test_a_value_the_user_set_wins():
    assert _settings(OMP_WAIT_POLICY="active", OPENBLAS_THREAD_TIMEOUT="28") == {
        "OMP_WAIT_POLICY": "active", "OPENBLAS_THREAD_TIMEOUT": "28"}


def test_openblas_reads_it_when_numpy_loads():
    """The setting is only worth making before NumPy's import: sagekit's own modules import NumPy after it."""
    code = "import sys, sagekit; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

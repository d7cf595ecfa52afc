"""LLVM's pages leave the process after each compile (sagekit.kernels.compiler_pages), and compiling still works.

Each check runs in a fresh interpreter: the listener is process-wide, and what is resident depends on history.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")

RESIDENT = '''
import json, sys
from numba import njit
from sagekit.kernels import compiler_pages

def llvm_kib():
    """KiB of libllvmlite resident in this process."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for row in map(str.split, smaps):
            if "-" in row[0] and not row[0].endswith(":"):
                inside = len(row) > 5 and compiler_pages.LIBRARY in row[5]
            elif inside and row[0] == "Rss:":
                total += int(row[1])
    return total

@njit
def plus(x):
    return x + 1

out = {"plus": plus(1), "compiled": llvm_kib()}
'''

RELEASE = RESIDENT + '''
out["advised"] = compiler_pages.release()
out["released"] = llvm_kib()

@njit
def times(x):
    return x * 3

out["times"] = times(2)
out["compiled_again"] = llvm_kib()
compiler_pages.keep_released()

@njit
def minus(x):
    return x - 1

out["minus"] = minus(5)
out["after_listener"] = llvm_kib()
print(json.dumps(out))
'''

GENERATE = RESIDENT + '''
import sagekit
model = sagekit.load(sys.argv[1], device="cpu")
out["text"] = model.generate("ab", max_new_tokens=4, temperature=0.0)
out["after_generate"] = llvm_kib()
print(json.dumps(out))
'''


def _run(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@linux_only
def test_released_pages_leave_and_compiles_bring_them_back():
    out = _run(RELEASE)
    if out["advised"] == 0:
        pytest.skip("this kernel takes no madvise advice on libllvmlite's mappings")
    assert out["compiled"] > 16 * 1024  # LLVM set up its target: tens of MiB of its code resident
    assert out["released"] < out["compiled"] / 3
    assert (out["plus"], out["times"], out["minus"]) == (2, 6, 4)  # LLVM still compiles after a release
    assert out["compiled_again"] > out["released"] + 4 * 1024  # and a compile maps its pages back in
    assert out["after_listener"] < out["compiled"] / 3  # the listener released them after that compile


@linux_only
def test_loading_a_model_on_the_cpu_leaves_llvm_released(tiny_model: Path):
    out = _run(GENERATE, str(tiny_model))
    assert out["text"]
    assert out["after_generate"] < out["compiled"] / 3


def test_without_madvise_nothing_is_touched(monkeypatch):
    """Off Linux (no madvise to call) release advises nothing and no listener is installed."""
    from sagekit.kernels import compiler_pages

    monkeypatch.setattr(compiler_pages, "_MADVISE", None)
    monkeypatch.setattr(compiler_pages, "_LISTENER", None)
    assert compiler_pages.release() == 0 and compiler_pages.library_maps() == []
    compiler_pages.keep_released()
    assert compiler_pages._LISTENER is None

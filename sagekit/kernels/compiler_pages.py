"""LLVM's pages, handed back to the system between compiles.

Numba needs LLVM (libllvmlite, about 170 MiB of library) only while it compiles a kernel or loads one from its
cache; a model that generates text runs machine code and never calls into LLVM. Yet each page of the library that
LLVM's set-up touched stays resident: 60-70 MiB on the 2-core machine, more than the weights of a 2-bit demo
model, and more than a third of what llama.cpp's whole process holds. Once the outermost compile or cache load
ends, sagekit's runtime unmaps those pages from the process with madvise (Linux; elsewhere this does nothing):
  - read-only mappings with no written page (the code and constants, 66 of the 69 MiB) take MADV_DONTNEED: the
    pages stay in the page cache, and the next compile maps them back with minor faults (after MADV_PAGEOUT it
    read them from disk: 100 ms more to the first token);
  - the rest take MADV_PAGEOUT (Linux 5.4+), which reclaims clean pages and keeps the dynamic linker's written
    ones (relocations): MADV_DONTNEED would drop those writes.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

from numba.core import event

MADV_DONTNEED, MADV_PAGEOUT = 4, 21  # linux/mman.h
LIBRARY = "libllvmlite"


def _madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def library_maps(name: str = LIBRARY) -> list[tuple[int, int]]:
    """(start, end) of each mapping of a shared library whose path contains `name`."""
    out = []
    if _MADVISE is not None:
        with open("/proc/self/maps") as maps:
            for row in map(str.split, maps):
                if len(row) > 5 and name in row[5]:
                    start, end = (int(a, 16) for a in row[0].split("-"))
                    out.append((start, end))
    return out


def clean_maps(name: str = LIBRARY) -> set[int]:
    """Start addresses of the library's read-only mappings without a written page: MADV_DONTNEED unmaps their
    pages, and the next fault maps them back from the page cache. The others hold what the dynamic linker wrote
    (relocations), which MADV_DONTNEED would drop; they take MADV_PAGEOUT, which never drops a write."""
    clean, start, read_only = set(), 0, False
    with open("/proc/self/smaps") as smaps:
        for row in map(str.split, smaps):
            if "-" in row[0] and not row[0].endswith(":"):
                start = int(row[0].split("-")[0], 16)
                read_only = len(row) > 5 and name in row[5] and "w" not in row[1]
            elif read_only and row[0] == "Private_Dirty:" and row[1] == "0":
                clean.add(start)
    return clean


def release(clean: set[int] | None = None) -> int:
    """Unmap LLVM's resident pages from this process; the bytes of mapping the kernel took the advice for (0 off
    Linux)."""
    if _MADVISE is None:
        return 0
    clean = clean_maps() if clean is None else clean
    done = 0
    for start, end in library_maps():
        advice = MADV_DONTNEED if start in clean else MADV_PAGEOUT
        done += (end - start) * (_MADVISE(start, end - start, advice) == 0)
    return done


class _ReleaseAfterCompiles(event.Listener):
    """Numba takes its compiler lock for every compile and every cache load, and broadcasts each acquire and
    release; when no thread holds or waits for the lock any more, LLVM's pages go."""

    def __init__(self) -> None:
        self.depth = 0
        self.lock = threading.Lock()
        self.clean = clean_maps()

    def on_start(self, ev: event.Event) -> None:
        with self.lock:
            self.depth += 1

    def on_end(self, ev: event.Event) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                release(self.clean)


_LISTENER: _ReleaseAfterCompiles | None = None


def keep_released() -> None:
    """From now on, release LLVM's pages after every compile and cache load in this process (once is enough)."""
    global _LISTENER
    if _LISTENER is None and _MADVISE is not None:
        _LISTENER = _ReleaseAfterCompiles()
        event.register("numba:compiler_lock", _LISTENER)
        release(_LISTENER.clean)

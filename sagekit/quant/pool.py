"""The compress worker pool: matrices are independent, so processes share them, each with its own open checkpoint.

Results come back in submission order, so the output bytes do not depend on the worker count; Numba gets the
cores split between the workers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.io.checkpoint import Checkpoint

_worker: dict[str, Any] = {}


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def init_worker(src: str, threads: int | None) -> None:
    """Open the checkpoint once per process; `threads` is given in pool workers only."""
    if threads:
        import numba

        numba.set_num_threads(threads)
        # a worker must not outlive a parent killed with SIGKILL
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _worker["ckpt"] = Checkpoint(src)


def read_weight(name: str) -> np.ndarray:
    """A decoder linear's weight as float32, from this process's checkpoint (Checkpoint.float32 refuses NaN/Inf)."""
    return _worker["ckpt"].float32(name + ".weight")


def worker_checkpoint() -> Checkpoint:
    return _worker["ckpt"]


def _apply(job: tuple[Callable, str, Any]) -> Any:
    fn, name, arg = job
    return fn(read_weight(name), name, arg)


def map_weights(fn: Callable, items: list[tuple[str, Any]], src: Path, workers: int) -> Iterator:
    """fn(weight, name, arg) for each (name, arg), in order, in this process or a pool of `workers`."""
    jobs = [(fn, name, arg) for name, arg in items]
    if workers <= 1:
        init_worker(str(src), None)
        yield from map(_apply, jobs)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, initializer=init_worker, initargs=(str(src), threads)) as pool:
        yield from pool.map(_apply, jobs)

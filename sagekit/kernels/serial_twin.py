"""Serial builds of parallel Numba kernels, for products too small to be worth waking the thread pool."""

from __future__ import annotations

from types import FunctionType

from numba import njit
from numba.core.registry import CPUDispatcher


def serial_twin(kernel: CPUDispatcher) -> CPUDispatcher:
    """The kernel's source compiled without a parallel region, under a name of its own: Numba's cache keys
    entries by function name and argument types only, so a twin sharing the name would load (or overwrite)
    the parallel build and pay the thread pool's wake-up on every call."""
    f = kernel.py_func
    twin = FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    return njit(cache=True, fastmath=kernel.targetoptions.get("fastmath", False))(twin)

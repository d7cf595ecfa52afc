"""Pick the array module: NumPy on the CPU, CuPy on a CUDA GPU. Model code is written once against `xp`."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from sagekit.errors import SagekitError


@dataclass(frozen=True)
class Backend:
    """The array module plus the dtype activations and dense weights are kept in.

    The CPU computes in float32 (NumPy has no fast float16 matmul); the GPU in float16 with float32
    accumulation inside cuBLAS and float32 for norms and softmax.
    """

    name: str
    xp: ModuleType
    dtype: Any

    @property
    def is_gpu(self) -> bool:
        return self.name == "cuda"

    def asarray(self, a: np.ndarray, dtype: Any = None) -> Any:
        return self.xp.asarray(a, dtype=dtype or self.dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zeroed array whose memory becomes resident only where it is written, on the CPU: an anonymous map,
        4 KiB pages, where NumPy asks for 2 MiB pages above 4 MiB. A KV cache sized for 512 tokens then holds
        the pages of the tokens written, not all of them from the first token on."""
        if self.is_gpu:
            return self.xp.zeros(shape, dtype=dtype)
        dtype, count = np.dtype(dtype), int(np.prod(shape))
        pages = mmap.mmap(-1, max(1, count * dtype.itemsize))
        return np.frombuffer(pages, dtype=dtype, count=count).reshape(shape)

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.get() if self.is_gpu else np.asarray(a)

    def synchronize(self) -> None:
        if self.is_gpu:
            self.xp.cuda.Device().synchronize()

    def describe(self) -> str:
        if not self.is_gpu:
            return "cpu (numpy float32)"
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        return f"cuda ({props['name'].decode()}, cupy float16)"


def _cupy_or_none() -> ModuleType | None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no cupy, no driver, or no device: all mean "no GPU here"
        return None
    return None


def gpu_available() -> bool:
    return _cupy_or_none() is not None


def get_backend(device: str = "auto") -> Backend:
    """`auto` takes the GPU when CuPy imports and sees one, else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise SagekitError(f"unknown device '{device}': use auto, cpu or cuda")
    if device == "cpu":
        return Backend("cpu", np, np.float32)
    cupy = _cupy_or_none()
    if cupy is None:
        if device == "cuda":
            raise SagekitError(
                "--device cuda: no usable CUDA GPU (install sagekit[cuda12] or sagekit[cuda13] "
                "and check nvidia-smi), or use --device cpu"
            )
        return Backend("cpu", np, np.float32)
    return Backend("cuda", cupy, cupy.float16)

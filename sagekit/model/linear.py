"""The one interface every linear layer of the model goes through: `y = layer(x)` with x of shape (T, in).

Dense weights and packed quantised weights both satisfy it, so the forward pass never knows which it has.
"""

from __future__ import annotations

from typing import Any, Protocol


class Linear(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: Any) -> Any: ...

    @property
    def nbytes(self) -> int: ...


class DenseLinear:
    """A weight held as an (out, in) array in the backend's dtype; the matmul is the BLAS/cuBLAS one."""

    def __init__(self, weight: Any):
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: Any) -> Any:
        return x @ self.weight.T

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)


class SageLinear:
    """A SAGE-packed weight. Until the packed kernels take over, it unpacks itself for the one call only,
    so the model never holds more than one dense layer at a time."""

    def __init__(self, packed: Any, backend: Any):
        self.packed, self.backend = packed, backend
        self.out_features, self.in_features = packed.shape

    def __call__(self, x: Any) -> Any:
        from sagekit.quant.pack import unpack_sage

        w = self.backend.asarray(unpack_sage(self.packed))
        return x @ w.T

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes)


class DequantLinear:
    """A packed weight of a method without a kernel of its own (the baselines): `packed.unpack()` gives the
    float32 weight, made for the one call only so the model never holds more than one dense layer."""

    def __init__(self, packed: Any, backend: Any):
        self.packed, self.backend = packed, backend
        self.out_features, self.in_features = packed.shape

    def __call__(self, x: Any) -> Any:
        return x @ self.backend.asarray(self.packed.unpack()).T

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes)

"""The one interface every linear layer of the model goes through: `y = layer(x)` with x of shape (T, in).

Dense weights and packed quantised weights both satisfy it, so the forward pass never knows which it has.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Linear(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: Any) -> Any: ...

    @property
    def nbytes(self) -> int: ...


def run_shared(x: Any, *linears: Linear) -> tuple[Any, ...]:
    """Each linear's product with the one input x (q|k|v, gate|up). Grid and vq matrices that read one input
    share the seed of its rotation (the quantiser derives it from the input's name), so R x is made once for all
    of them: a decode step makes 90 rotations instead of 210."""
    seed = getattr(linears[0], "rotation_seed", None)
    if seed is not None and all(getattr(lin, "rotation_seed", None) == seed for lin in linears[1:]):
        rx = linears[0].rotate(x)
        return tuple(lin.rotated_matmul(rx) for lin in linears)
    return tuple(lin(x) for lin in linears)


class DenseLinear:
    """A weight held as an (out, in) array in the backend's dtype; the matmul is the BLAS/cuBLAS one.

    One token goes through GEMV (W @ x): OpenBLAS's threaded GEMM for a (1, in) x stalled for whole time
    slices when the two cores were shared (7.7 ms against 0.03 ms for the 1536x576 GEMV), its GEMV did not. On the
    GPU one token goes through sagekit's FP16 GEMV kernel instead of cuBLAS, so the step can be captured in a CUDA
    graph (sagekit.model.decode_graph)."""

    def __init__(self, weight: Any):
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self._gemv = None
        if not isinstance(weight, np.ndarray) and weight.dtype == np.float16 and weight.flags.c_contiguous:
            from sagekit.kernels import dense_cuda

            self._gemv = dense_cuda.gemv

    def __call__(self, x: Any) -> Any:
        if x.ndim == 2 and x.shape[0] == 1:
            return (self.weight @ x[0] if self._gemv is None else self._gemv(self.weight, x[0]))[None]
        return x @ self.weight.T

    @property
    def capturable(self) -> bool:
        """Whether a decode step through this matrix can be captured in a CUDA graph (the GPU's own GEMV)."""
        return self._gemv is not None

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)


class HalfLinear:
    """An FP16 weight kept as FP16 on the CPU (NumPy has no fast float16 matmul): the Numba kernel reads
    the half bits directly, so the tied embedding / lm_head of a compressed model costs its file bytes."""

    def __init__(self, weight: Any):
        from sagekit.kernels import cpu

        self.weight, self._matmul = weight, cpu.half_matmul
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: Any) -> Any:
        return self._matmul(x, self.weight)

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)


class GridLinear:
    """The `sage-grid` and `sage-vq` layouts, fed R x (the rotation: two small matmuls per input).

    `kernel` names what runs the product. On the GPU every such matrix runs on the codebook RawKernels
    (sagekit.kernels.codebook_cuda) at one byte a run of weights ("gpu"). On the CPU:
      * "lut": grid levels mirrored about 0 (`--levels symmetric`), on the packed `sage` LUT kernel: the codes
        as a sign plane and magnitude-id planes (PackedGrid.as_sage), y scaled per row after;
      * "level": other 2- to 5-bit grids (free levels), on the level kernel at their stored bits (AVX-512);
      * "book": vq codebooks and 1-bit grids, on the codebook kernel at one byte per run of weights;
      * "half": the rest (grids of 6+ bits, or free levels without AVX-512), decoded once to FP16 at load,
        y = (s * levels[codes]) (R x) in the FP16 kernel, 2 bytes a weight.
    "level" and "book" run a prefill's product at int8 where the CPU has AVX-512 VNNI (kernels/tiles.py);
    int8_prefill=False keeps float32 (the head: load.load_embedding).
    """

    def __init__(self, packed: Any, backend: Any, int8_prefill: bool = True):
        from sagekit.format import rotation
        from sagekit.kernels import cpu

        self.out_features, self.in_features = packed.shape
        seed = self.rotation_seed = None if packed.rot is None else int(packed.rot[0])
        if backend.is_gpu:
            from sagekit.kernels import codebook_cuda

            self.kernel, self._weights = "gpu", codebook_cuda.to_device(packed)
            self._matmul = codebook_cuda.codebook_matmul_gpu
            self._rotate = (lambda x: x) if seed is None else (lambda x: codebook_cuda.rotate(x, seed))
            return
        self._rotate = (lambda x: x) if seed is None else (lambda x: rotation.rotate(x, seed))
        sage = packed.as_sage() if hasattr(packed, "as_sage") else None
        if sage is not None and sage.n_groups <= cpu.MAX_GROUPS:
            self.kernel, self._weights = "lut", SageLinear(sage, backend)
            scale = self._scale = packed.scale.astype(np.float32)
            self._matmul = lambda x, w: w(x) * scale
        elif hasattr(packed, "levels") and packed.bits in cpu.LEVEL_BITS and cpu.AVX512:
            self.kernel, self._weights = "level", cpu.prepare_levels(packed)
            self._matmul = lambda x, w: cpu.level_matmul(x, w, int8_prefill)
        elif cpu.run_length(packed) >= cpu.MIN_RUN:
            self.kernel, self._weights = "book", cpu.prepare_codebook(packed)
            self._matmul = lambda x, w: cpu.codebook_matmul(x, w, int8_prefill)
        else:
            self.kernel, self._weights = "half", HalfLinear(packed.rotated().astype(np.float16))
            self._matmul = lambda x, w: w(x)

    def __call__(self, x: Any) -> Any:
        return self._matmul(self._rotate(x), self._weights)

    @property
    def capturable(self) -> bool:
        """Whether a decode step through this matrix can be captured in a CUDA graph (no cuBLAS at one token)."""
        return self.kernel == "gpu"

    def rotate(self, x: Any) -> Any:
        """R x, what the kernel reads."""
        return self._rotate(x)

    def rotated_matmul(self, rx: Any) -> Any:
        """The product from R x (made by rotate, perhaps for another linear of the same rotation)."""
        return self._matmul(rx, self._weights)

    @property
    def cpu_arrays(self) -> Any:
        """The CPU kernel's arrays (a LevelCPU or CodebookCPU) when this matrix runs on the level or codebook
        kernel, else None: the fused decode step (sagekit.model.decode_plan) reads them."""
        return self._weights if self.kernel in ("level", "book") else None

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """float32 rows of the stored W R^T (the embedding lookup of a packed head)."""
        from sagekit.kernels import cpu

        if self.kernel == "gpu":
            raise NotImplementedError("row lookups of a GPU codebook: the GPU embedding is dequantised at load")
        if self.kernel == "level":
            return cpu.level_rows(self._weights, idx)
        if self.kernel == "book":
            return cpu.decode_rows(self._weights, idx)
        if self.kernel == "half":
            return self._weights.weight[idx].astype(np.float32)
        return self._weights.rows(idx) * self._scale[idx, None]

    @property
    def nbytes(self) -> int:
        return int(self._weights.nbytes + (self._scale.nbytes if self.kernel == "lut" else 0))


class GridEmbedding:
    """Token rows of a packed embedding (sagekit.quant.head) read from its GridLinear: rows of W R^T, the
    rotation undone per row looked up. Tied to lm_head, the two share one copy of the weights."""

    def __init__(self, lin: GridLinear, seed: int | None):
        self.lin, self.seed = lin, seed

    def __getitem__(self, tokens: Any) -> np.ndarray:
        from sagekit.format import rotation

        rows = self.lin.rows(np.asarray(tokens))
        return rows if self.seed is None else rotation.unrotate(rows, self.seed)

    def dense(self) -> np.ndarray:
        """float32 (vocab, dim): every row, for a dense twin."""
        return self[np.arange(self.lin.out_features)]

    @property
    def nbytes(self) -> int:
        return self.lin.nbytes


class SageLinear:
    """A SAGE-packed weight run by the packed kernels (Numba on CPU, CUDA on GPU); never made dense.

    The planes are re-laid for the kernel once, at load time; `nbytes` counts what the kernel's layout holds.
    """

    def __init__(self, packed: Any, backend: Any):
        self.backend = backend
        self.out_features, self.in_features = packed.shape
        if backend.is_gpu:
            from sagekit.kernels import cuda

            self._weights, self._matmul = cuda.to_device(packed), cuda.sage_matmul_gpu
        else:
            from sagekit.kernels import cpu

            self._weights, self._matmul = cpu.prepare(packed), cpu.sage_matmul
        self.nbytes = int(self._weights.nbytes)

    def __call__(self, x: Any) -> Any:
        return self._matmul(x, self._weights)

    @property
    def capturable(self) -> bool:
        """Whether a decode step through this matrix can be captured in a CUDA graph (the GEMV kernel, no cuBLAS)."""
        return self.backend.is_gpu

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """float32 rows of the weight, decoded from the CPU kernel's planes."""
        from sagekit.kernels import cpu

        return cpu.unpack_rows(self._weights, idx)


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

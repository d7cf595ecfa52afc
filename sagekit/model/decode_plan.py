"""The fused CPU decode step (sagekit.kernels.decode_step) fed from a model's layers: the sizes and addresses
of every linear's kernel arrays, gathered into the two tables the step reads (the arrays are not copied).

A model gets a plan on an AVX-512 CPU (float32 activations) when every linear of every layer runs on the level
kernel (free-level grids of 2-5 bits) or the codebook kernel with 256 codewords (vq, 1-bit grids), and the linears that
read one input share its rotation, as the quantiser makes them. Other models, and a model whose linears were
swapped after loading, take `block` layer by layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sagekit.format import rotation
from sagekit.format.config import LlamaConfig
from sagekit.kernels import cpu, decode_step
from sagekit.kernels.codebook_matmul import CodebookCPU
from sagekit.kernels.level_matmul import LevelCPU
from sagekit.model.linear import GridLinear

_NONE = np.zeros((1, 1), dtype=np.float32)  # the factors of a product without a rotation


def _factors(n: int, seed: int | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(left, right, a, b) with R x = left X right, X = x as (a, b); a = 0 without a rotation."""
    if seed is None:
        return _NONE, _NONE, 0, 0
    left, right = rotation.factors_as(n, seed, np.dtype(np.float32))
    return left, right, len(left), len(right)


def _address(a: np.ndarray) -> int:
    """Where a C-contiguous array's data starts (decode_step reads it there)."""
    if not a.flags.c_contiguous:
        raise ValueError("the decode step reads C-contiguous arrays only")
    return int(a.ctypes.data)


class DecodePlan:
    """What decode_step.decode_layers reads (meta, addresses, norms) and the linears and rotation factors it
    points into, which it keeps alive."""

    def __init__(self, layers: list[Any], config: LlamaConfig):
        self.config = config
        self.linears = [getattr(L, name) for L in layers for name in decode_step.MATRICES]
        meta, at, self.factors = [], [], {}
        for lin in self.linears:
            w = lin.cpu_arrays
            key = (lin.in_features, lin.rotation_seed)
            if key not in self.factors:
                self.factors[key] = _factors(*key)
            left, right, a, b = self.factors[key]
            if isinstance(w, LevelCPU):
                meta.append((lin.out_features, w.chunks, w.bits, a, b, decode_step.LEVEL, 0, w.codes.size,
                             w.table.size))
                table = w.table
            else:
                terms, k = w.codewords_t.shape
                meta.append((lin.out_features, w.runs, w.dim, a, b, decode_step.BOOK, k, w.codes.size, terms))
                table = w.codewords_t
            at.append([_address(arr) for arr in (w.codes, table, w.scale, left, right)])
        self.meta, self.at = np.asarray(meta, dtype=np.int64), np.asarray(at, dtype=np.int64)
        self.norms = np.stack([np.stack([L.attn_norm, L.ffn_norm]) for L in layers]).astype(np.float32)
        self.threads = decode_step.threads()

    def fits(self, layers: list[Any]) -> bool:
        """Whether the layers still hold the linears the plan was gathered from."""
        now = (getattr(L, name) for L in layers for name in decode_step.MATRICES)
        return all(a is b for a, b in zip(self.linears, now, strict=True))

    def __call__(self, h: np.ndarray, state: Any, start: int) -> np.ndarray:
        """The residual stream (1, dim) after every layer for one token at `start`, filling the cache."""
        c = self.config
        out = decode_step.decode_layers(
            np.array(h[0], dtype=np.float32), self.meta, self.at, self.norms, np.float32(c.norm_eps), state.cache_k,
            state.cache_v, state.cos[start], state.sin[start], start, c.n_heads, self.threads)
        return out[None]


def _runs_in_step(w: Any) -> bool:
    """Whether the step runs a matrix of these kernel arrays: level ones, and codebooks of 256 codewords (its
    table lookup holds 256 entries in registers)."""
    return isinstance(w, LevelCPU) or (isinstance(w, CodebookCPU) and w.codewords_t.shape[1] == 256)


def plan(layers: list[Any], config: LlamaConfig, backend: Any) -> DecodePlan | None:
    """A DecodePlan when every layer qualifies (module docstring), else None."""
    if backend.is_gpu or backend.dtype != np.float32 or not cpu.AVX512 or not layers:
        return None
    for L in layers:
        lins = [getattr(L, name) for name in decode_step.MATRICES]
        if not all(isinstance(lin, GridLinear) and _runs_in_step(lin.cpu_arrays) for lin in lins):
            return None
        q, k, v, _, gate, up, _ = lins
        if not (q.rotation_seed == k.rotation_seed == v.rotation_seed and gate.rotation_seed == up.rotation_seed):
            return None
    return DecodePlan(layers, config)

"""The fused CPU decode step (sagekit.kernels.decode_step) fed from a model's layers: the kernel arrays of
every linear gathered, by reference, into the lists the step reads.

A model gets a plan on an AVX-512 CPU (float32 activations) when every linear of every layer runs on the level
kernel (free-level grids of 2-5 bits) or the codebook kernel with 256 codewords (vq, 1-bit grids), and the linears that
read one input share its rotation, as the quantiser makes them. Other models, and a model whose linears were
swapped after loading, take `block` layer by layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba.typed import List

from sagekit.format import rotation
from sagekit.format.config import LlamaConfig
from sagekit.kernels import cpu, decode_step
from sagekit.kernels.codebook_matmul import CodebookCPU
from sagekit.kernels.level_matmul import LevelCPU
from sagekit.model.linear import GridLinear

# placeholders for the lists of the kind a matrix is not, and for a product without a rotation
_NONE = _WORDS = np.zeros((1, 1), dtype=np.float32)
_BYTES, _WORDS32, _ONE = np.zeros(1, dtype=np.uint8), np.zeros(1, dtype=np.uint32), np.zeros(1, dtype=np.float32)


def _factors(n: int, seed: int | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(left, right, a, b) with R x = left X right, X = x as (a, b); a = 0 without a rotation."""
    if seed is None:
        return _NONE, _NONE, 0, 0
    a, b = rotation.factors(n, seed)
    return a.astype(np.float32), np.ascontiguousarray(b.T, dtype=np.float32), len(a), len(b)


class DecodePlan:
    """What decode_step.decode_layers reads (its `w` and norms), and the linears it was gathered from."""

    def __init__(self, layers: list[Any], config: LlamaConfig):
        self.config = config
        self.linears = [getattr(L, name) for L in layers for name in decode_step.MATRICES]
        lists = [List() for _ in range(7)]  # codes, tables, bcodes, words, scales, lefts, rights
        meta, factors = [], {}
        for lin in self.linears:
            w = lin.cpu_arrays
            key = (lin.in_features, lin.rotation_seed)
            left, right, a, b = factors[key] if key in factors else factors.setdefault(key, _factors(*key))
            if isinstance(w, LevelCPU):
                row = (lin.out_features, w.chunks, w.bits, a, b, decode_step.LEVEL, 0)
                arrays = (w.codes, w.table, _BYTES, _WORDS)
            else:
                row = (lin.out_features, w.runs, w.dim, a, b, decode_step.BOOK, w.codewords_t.shape[1])
                arrays = (_WORDS32, _ONE, w.codes, w.codewords_t)
            for lst, arr in zip(lists, (*arrays, w.scale, left, right), strict=True):
                lst.append(arr)
            meta.append(row)
        self.w = (*lists, np.asarray(meta, dtype=np.int64))
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
            np.array(h[0], dtype=np.float32), *self.w, self.norms, np.float32(c.norm_eps), state.cache_k,
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

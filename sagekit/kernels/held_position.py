"""The decode step's ops at a position held in an int32 array of one element rather than a Python int: the KV
store and single-query attention.

The GPU's graphed decode step (sagekit.model.decode_graph) is captured once and replayed at every position, so
the position must be read on the device at run time (a slice `cache[:, start]` would bake the capture's position
into the graph), and nothing in it may call cuBLAS (CuPy refuses cuBLAS calls while a stream is captured). On
the GPU both ops are kernels of their own; NumPy runs the same math, so CI checks it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from sagekit.kernels.cuda import KERNEL_DIR, cupy_module

ATTENTION_THREADS = 256  # 8 warps a block, one block per query head
MAX_HEAD_DIM = 256  # held_attention.cu: MAX_PAIRS pairs of a row per lane
DEFAULT_SHARED = 48 * 1024  # dynamic shared memory a kernel gets without asking
STATIC_SHARED = 4 * 32  # held_attention.cu's reduction slots, one float per warp (32 at most)


@functools.cache
def _store_kernel() -> Any:
    """One thread per (head, d) of the new row. Memory layout: slot (KV, S, D) row-major (one layer's cache),
    src (KV, D), pos int32 [1]; src[h, d] goes to slot[h, pos[0], d]."""
    return cupy_module().ElementwiseKernel(
        "S src, raw int32 pos, int32 seq, int32 dim", "raw T slot",
        "slot[(i / dim) * seq * dim + pos[0] * dim + i % dim] = (T)src",
        "sagekit_store_at")


@functools.cache
def _attention_kernel() -> Any:
    return cupy_module().RawKernel((KERNEL_DIR / "held_attention.cu").read_text(), "held_attention",
                                   options=("--std=c++17",))


def store_at(slot: Any, src: Any, pos: Any) -> None:
    """slot[:, pos[0]] = src for slot (KV, S, D) C-contiguous, src (KV, D)."""
    if isinstance(slot, np.ndarray):
        slot[:, int(pos[0])] = src
        return
    if not slot.flags.c_contiguous:
        raise ValueError("store_at writes into a C-contiguous (KV, S, D) cache slot")
    _, seq, dim = slot.shape
    _store_kernel()(src, pos, np.int32(seq), np.int32(dim), slot)


@functools.cache
def _shared_limit() -> int:
    """Shared memory a block may opt in to on this device (227 KiB on an H100 or H200, 64 KiB on a T4)."""
    return int(cupy_module().cuda.Device().attributes.get("MaxSharedMemoryPerBlockOptin", DEFAULT_SHARED))


def _dynamic_shared(seq: int, dim: int) -> int:
    """Bytes of held_attention.cu's dynamic shared memory: the query, the scores and each warp's partial output."""
    return 4 * (dim * (1 + ATTENTION_THREADS // 32) + seq)


def takes(seq: int, dim: int) -> bool:
    """Whether the GPU attention kernel takes a cache of seq positions at head size dim: an even dim up to
    MAX_HEAD_DIM, and its shared memory (dynamic plus STATIC_SHARED) within what a block may opt in to."""
    return dim % 2 == 0 and dim <= MAX_HEAD_DIM and _dynamic_shared(seq, dim) + STATIC_SHARED <= _shared_limit()


def attention(q: Any, keys: Any, values: Any, pos: Any) -> Any:
    """Softmax(q K^T) V of one query per head (H, D) float32, already scaled, over the positions 0..pos[0] of a
    cache slot (KV, S, D); query head h reads KV head h // (H / KV). (H, D) float32."""
    if isinstance(keys, np.ndarray):
        return _attention_numpy(q, keys, values, pos)
    cp = cupy_module()
    (heads, dim), (kv, seq, _) = q.shape, keys.shape
    if not takes(seq, dim):
        raise ValueError(f"the GPU's held attention takes even head sizes up to {MAX_HEAD_DIM} and caches that fit "
                         f"its shared memory, not {dim} x {seq} positions")
    shared = _dynamic_shared(seq, dim)
    kernel = _attention_kernel()
    if shared > DEFAULT_SHARED:
        kernel.max_dynamic_shared_size_bytes = shared
    out = cp.empty((heads, dim), dtype=cp.float32)
    kernel((heads,), (ATTENTION_THREADS,),
           (cp.ascontiguousarray(q, dtype=cp.float32), keys, values, pos, out, np.int32(seq), np.int32(dim),
            np.int32(heads // kv)), shared_mem=shared)
    return out


def _attention_numpy(q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The kernel's math over every slot, those past the position masked."""
    kv, _, dim = keys.shape
    qg = q.reshape(kv, -1, dim)  # (KV, rep, D)
    scores = qg @ keys.astype(np.float32).transpose(0, 2, 1)  # (KV, rep, S)
    scores = np.where(np.arange(scores.shape[-1]) <= pos[0], scores, np.float32(-np.inf))
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    out = (scores @ values.astype(np.float32)) / scores.sum(axis=-1, keepdims=True)
    return out.reshape(q.shape).astype(np.float32)

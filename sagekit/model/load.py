"""Build a Llama in memory from a checkpoint on disk, one tensor at a time, onto the chosen backend.

The tensor names come from the config's row of sagekit.format.architecture; `load_layer` is the one place a
decoder layer is assembled (calibration loads its layers through it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sagekit.backend import Backend
from sagekit.format.architecture import EMBED, FINAL_NORM, HEAD, layer_prefix
from sagekit.format.sage import PackedSage
from sagekit.format.sage_grid import PackedGrid
from sagekit.format.sage_vq import PackedVQ
from sagekit.io import packed
from sagekit.io.checkpoint import Checkpoint
from sagekit.kernels import compiler_pages, decode_step
from sagekit.model.linear import (
    DenseLinear,
    DequantLinear,
    GridEmbedding,
    GridLinear,
    HalfLinear,
    Linear,
    SageLinear,
)
from sagekit.model.llama import Layer, Llama, Weights


def _linear(ckpt: Checkpoint, prefix: str, backend: Backend, kernels: bool, int8_prefill: bool = True) -> Linear:
    """kernels=False dequantises packed weights on use instead of running the kernels (the reference path);
    `sage`, `sage-grid` and `sage-vq` have packed kernels on both backends, the other layouts always dequantise.
    int8_prefill: GridLinear's (False for the head, as load_embedding says)."""
    if packed.is_packed(ckpt, prefix):
        layout = packed.read_packed(ckpt, prefix)
        if kernels and isinstance(layout, PackedSage):
            return SageLinear(layout, backend)
        if kernels and isinstance(layout, (PackedGrid, PackedVQ)):
            return GridLinear(layout, backend, int8_prefill)
        return DequantLinear(layout, backend)
    return DenseLinear(backend.asarray(ckpt.float32(prefix + ".weight")))


def _vector(ckpt: Checkpoint, name: str, backend: Backend) -> Any:
    """A norm weight: float32 on the backend whatever the model's dtype."""
    return backend.xp.asarray(ckpt.float32(name), dtype=backend.xp.float32)


def load_layer(ckpt: Checkpoint, i: int, backend: Backend, kernels: bool = True) -> Layer:
    """Decoder layer i: its norms and its linears (dense, or packed as `_linear` runs them)."""
    p, spec = layer_prefix(i), ckpt.config.arch.layer
    norms = {t.attr: _vector(ckpt, p + t.suffix + ".weight", backend) for t in spec.norms}
    return Layer(**norms, **{t.attr: _linear(ckpt, p + t.suffix, backend, kernels) for t in spec.linears})


def load_embedding(ckpt: Checkpoint, backend: Backend) -> Any:
    """The embedding table; a compressed model keeps its FP16 embedding as FP16 on the CPU too (the GPU
    backend does anyway). A packed one (--head-bits) is a GridEmbedding on the CPU, dequantised on the GPU.
    Tied to the head, its products stay float32: at int8 (its levels rounded at one scale) they cost vq203 +0.24%
    perplexity, and a prefill computes the last token's logits only."""
    if packed.is_packed(ckpt, EMBED):
        layout = packed.read_packed(ckpt, EMBED)
        if backend.is_gpu or not isinstance(layout, PackedGrid):
            return backend.asarray(layout.unpack().astype(np.float32))
        lin = GridLinear(layout, backend, int8_prefill=False)
        return GridEmbedding(lin, None if layout.rot is None else int(layout.rot[0]))
    if ckpt.quantization is not None and not backend.is_gpu:
        return ckpt.float16(f"{EMBED}.weight")
    return backend.asarray(ckpt.float32(f"{EMBED}.weight"))


def start_kernels(backend: Backend) -> None:
    """On the CPU, set Numba up now and keep LLVM's pages released after every compile (compiler_pages).

    Numba's first call sets up LLVM's CPU target and the thread pool: +44 MiB, most of it LLVM's pages. Made
    before the tokenizer and the weights arrive, and released at once, it no longer adds to them at the peak.
    """
    if not backend.is_gpu:
        compiler_pages.keep_released()
        decode_step.threads()  # its first parallel call: the CPU target and the thread pool come up here


def load_model(path: str | Path, backend: Backend, max_seq_len: int, kernels: bool = True) -> Llama:
    """A dense or packed model from any path the checkpoint loader accepts.

    kernels=False runs packed layers by dequantising each on use: the reference the kernels are tested against.
    """
    start_kernels(backend)
    with Checkpoint(path) as ckpt:
        c = ckpt.config
        # the embedding and the head before the layers: re-laying a packed head holds the file's codes and the
        # kernel's words at once (17 MiB each for the demo's), which on top of every layer set the peak
        embed = load_embedding(ckpt, backend)
        half = ckpt.quantization is not None and not backend.is_gpu  # FP16 stays FP16, as the embedding
        if c.tie_embeddings and isinstance(embed, GridEmbedding):
            lm_head = embed.lin
        elif c.tie_embeddings:
            lm_head = HalfLinear(embed) if half else DenseLinear(embed)
        elif half and not packed.is_packed(ckpt, HEAD):
            lm_head = HalfLinear(ckpt.float16(f"{HEAD}.weight"))
        else:
            lm_head = _linear(ckpt, HEAD, backend, kernels, int8_prefill=False)
        layers = [load_layer(ckpt, i, backend, kernels) for i in range(c.n_layers)]
        weights = Weights(embed, layers, _vector(ckpt, f"{FINAL_NORM}.weight", backend), lm_head)
        return Llama(c, backend, weights, max_seq_len)

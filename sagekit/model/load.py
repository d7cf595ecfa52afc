"""Build a Llama in memory from a checkpoint on disk, one tensor at a time, onto the chosen backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sagekit.backend import Backend
from sagekit.format.sage import PackedSage
from sagekit.format.sage_grid import PackedGrid
from sagekit.format.sage_vq import PackedVQ
from sagekit.io import packed
from sagekit.io.checkpoint import Checkpoint
from sagekit.model.linear import DenseLinear, DequantLinear, GridLinear, HalfLinear, Linear, SageLinear
from sagekit.model.llama import Layer, Llama


def _linear(ckpt: Checkpoint, prefix: str, backend: Backend, kernels: bool) -> Linear:
    """kernels=False dequantises packed weights on use instead of running the kernels (the reference path);
    `sage` has packed kernels, `sage-grid` and `sage-vq` an FP16 runtime on the CPU, the other layouts always dequantise."""
    if packed.is_packed(ckpt, prefix):
        layout = packed.read_packed(ckpt, prefix)
        if kernels and isinstance(layout, PackedSage):
            return SageLinear(layout, backend)
        if kernels and isinstance(layout, (PackedGrid, PackedVQ)) and not backend.is_gpu:
            return GridLinear(layout)
        return DequantLinear(layout, backend)
    return DenseLinear(backend.asarray(ckpt.float32(prefix + ".weight")))


def load_model(path: str | Path, backend: Backend, max_seq_len: int, kernels: bool = True) -> Llama:
    """A dense or packed model from any path the checkpoint loader accepts.

    kernels=False runs packed layers by dequantising each on use: the reference the kernels are tested against.
    """
    with Checkpoint(path) as ckpt:
        c, xp = ckpt.config, backend.xp
        vec = lambda name: xp.asarray(ckpt.float32(name), dtype=xp.float32)  # noqa: E731
        layers = []
        for i in range(c.n_layers):
            p = f"model.layers.{i}."
            lin = {n: _linear(ckpt, p + n, backend, kernels) for n in (
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
            layers.append(Layer(
                attn_norm=vec(p + "input_layernorm.weight"), q=lin["self_attn.q_proj"], k=lin["self_attn.k_proj"],
                v=lin["self_attn.v_proj"], o=lin["self_attn.o_proj"], ffn_norm=vec(p + "post_attention_layernorm.weight"),
                gate=lin["mlp.gate_proj"], up=lin["mlp.up_proj"], down=lin["mlp.down_proj"]))
        if ckpt.quantization is not None and not backend.is_gpu:
            # a compressed model keeps its FP16 embedding / lm_head as FP16 (the GPU backend does anyway)
            embed = ckpt.float32("model.embed_tokens.weight").astype(np.float16)
            half = lambda name: HalfLinear(ckpt.float32(name).astype(np.float16))  # noqa: E731
        else:
            embed = backend.asarray(ckpt.float32("model.embed_tokens.weight"))
            half = None
        if c.tie_embeddings:
            lm_head = HalfLinear(embed) if half else DenseLinear(embed)
        elif half and not packed.is_packed(ckpt, "lm_head"):
            lm_head = half("lm_head.weight")
        else:
            lm_head = _linear(ckpt, "lm_head", backend, kernels)
        return Llama(c, backend, embed, layers, vec("model.norm.weight"), lm_head, max_seq_len)

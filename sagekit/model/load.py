"""Build a Llama in memory from a checkpoint on disk, one tensor at a time, onto the chosen backend."""

from __future__ import annotations

from pathlib import Path

from sagekit.backend import Backend
from sagekit.io import packed
from sagekit.io.checkpoint import Checkpoint
from sagekit.model.linear import DenseLinear, Linear
from sagekit.model.llama import Layer, Llama


def _linear(ckpt: Checkpoint, prefix: str, backend: Backend, kernels: bool) -> Linear:
    if packed.is_packed(ckpt, prefix):
        return packed.read_linear(ckpt, prefix, backend, kernels)
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
        embed = backend.asarray(ckpt.float32("model.embed_tokens.weight"))
        lm_head = DenseLinear(embed) if c.tie_embeddings else _linear(ckpt, "lm_head", backend, kernels)
        return Llama(c, backend, embed, layers, vec("model.norm.weight"), lm_head, max_seq_len)

"""A minimal Llama forward pass, written once against the array module `xp` (NumPy or CuPy).

Read top to bottom: embed -> for each layer (RMSNorm, attention with RoPE and a preallocated KV cache,
RMSNorm, SwiGLU MLP) -> final RMSNorm -> lm_head. Batch size is 1. The residual stream, norms, softmax
and logits are float32; linear inputs are cast to the backend dtype (float16 on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sagekit.backend import Backend
from sagekit.model.config import LlamaConfig
from sagekit.model.linear import Linear

ATTN_CHUNK = 128  # queries per attention block: keeps the scores in cache and skips the masked upper blocks


@dataclass
class Layer:
    attn_norm: Any
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ffn_norm: Any
    gate: Linear
    up: Linear
    down: Linear

    def linears(self) -> dict[str, Linear]:
        return {"self_attn.q_proj": self.q, "self_attn.k_proj": self.k, "self_attn.v_proj": self.v,
                "self_attn.o_proj": self.o, "mlp.gate_proj": self.gate, "mlp.up_proj": self.up,
                "mlp.down_proj": self.down}


class Llama:
    def __init__(self, config: LlamaConfig, backend: Backend, embed: Any, layers: list[Layer], norm: Any,
                 lm_head: Linear, max_seq_len: int):
        self.config, self.backend, self.xp = config, backend, backend.xp
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.max_seq_len = max_seq_len
        xp, c = self.xp, config
        inv_freq = np.asarray(c.rope_inv_freq(), dtype=np.float64)
        angles = np.outer(np.arange(max_seq_len, dtype=np.float64), inv_freq)
        angles = np.concatenate([angles, angles], axis=1)  # HF layout: rotate_half pairs i with i + D/2
        self.cos = xp.asarray(np.cos(angles), dtype=xp.float32)
        self.sin = xp.asarray(np.sin(angles), dtype=xp.float32)
        cache_shape = (c.n_layers, max_seq_len, c.n_kv_heads, c.head_dim)
        self.cache_k = xp.zeros(cache_shape, dtype=backend.dtype)
        self.cache_v = xp.zeros(cache_shape, dtype=backend.dtype)
        tri = np.triu(np.full((ATTN_CHUNK, ATTN_CHUNK), -np.inf, dtype=np.float32), k=1)
        self.causal_mask = xp.asarray(tri)  # added to a block's diagonal square of scores

    def rmsnorm(self, x: Any, weight: Any) -> Any:
        xp = self.xp
        return x * (1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + self.config.norm_eps)) * weight

    def rope(self, x: Any, start: int) -> Any:
        """x: (T, heads, D) float32, rotated by the angles of positions start..start+T-1."""
        t, half = x.shape[0], x.shape[-1] // 2
        cos, sin = self.cos[start:start + t, None, :], self.sin[start:start + t, None, :]
        rotated = self.xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, layer: int, q: Any, start: int) -> Any:
        """Causal grouped-query attention of T new queries over the cache up to start + T. q: (T, H, D).

        Queries go in blocks small enough that the scores stay in cache; a block sees only keys up to its
        last query, so only its diagonal square needs the causal mask. Softmax runs in place and the
        normalisation is applied to the (much smaller) output instead of the probabilities.
        """
        xp, c = self.xp, self.config
        t, kv, rep, d = q.shape[0], c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
        q = q * (1.0 / float(np.sqrt(d)))
        out = xp.empty((t, c.n_heads, d), dtype=xp.float32)
        keys = self.cache_k[layer, :start + t].astype(xp.float32).transpose(1, 2, 0)  # (KV, D, S)
        vals = self.cache_v[layer, :start + t].astype(xp.float32).transpose(1, 0, 2)  # (KV, S, D)
        for t0 in range(0, t, ATTN_CHUNK):
            t1 = min(t, t0 + ATTN_CHUNK)
            tb, s = t1 - t0, start + t1
            qb = q[t0:t1].reshape(tb, kv, rep, d).transpose(1, 2, 0, 3).reshape(kv, rep * tb, d)
            scores = (qb @ keys[:, :, :s]).reshape(kv, rep, tb, s)
            scores[..., s - tb:] += self.causal_mask[:tb, :tb]
            scores -= scores.max(axis=-1, keepdims=True)
            xp.exp(scores, out=scores)
            denom = scores.sum(axis=-1, keepdims=True).reshape(kv, rep * tb, 1)
            ob = (scores.reshape(kv, rep * tb, s) @ vals[:, :s]) / denom  # (KV, rep*Tb, D)
            out[t0:t1] = ob.reshape(kv, rep, tb, d).transpose(2, 0, 1, 3).reshape(tb, c.n_heads, d)
        return out.reshape(t, c.n_heads * d)

    def forward(self, tokens: np.ndarray, start: int = 0, last_only: bool = False) -> Any:
        """Logits (float32) for tokens placed at positions start.., filling the KV cache as it goes."""
        xp, c, dt = self.xp, self.config, self.backend.dtype
        t = len(tokens)
        if start + t > self.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the cache of {self.max_seq_len}")
        h = self.embed[xp.asarray(tokens)].astype(xp.float32)  # (T, dim) residual stream
        for i, L in enumerate(self.layers):
            x = self.rmsnorm(h, L.attn_norm).astype(dt)
            q = L.q(x).astype(xp.float32).reshape(t, c.n_heads, c.head_dim)
            k = L.k(x).astype(xp.float32).reshape(t, c.n_kv_heads, c.head_dim)
            v = L.v(x).reshape(t, c.n_kv_heads, c.head_dim)
            self.cache_k[i, start:start + t] = self.rope(k, start)
            self.cache_v[i, start:start + t] = v
            a = self.attention(i, self.rope(q, start), start)
            h = h + L.o(a.astype(dt)).astype(xp.float32)
            x = self.rmsnorm(h, L.ffn_norm).astype(dt)
            g = L.gate(x).astype(xp.float32)
            m = (g / (1.0 + xp.exp(-g))) * L.up(x).astype(xp.float32)
            h = h + L.down(m.astype(dt)).astype(xp.float32)
        if last_only:
            h = h[-1:]
        return self.lm_head(self.rmsnorm(h, self.norm).astype(dt)).astype(xp.float32)

    def linears(self) -> dict[str, Linear]:
        """Every linear layer by its HF name (without .weight), in model order."""
        out = {f"model.layers.{i}.{n}": lin for i, L in enumerate(self.layers) for n, lin in L.linears().items()}
        out["lm_head"] = self.lm_head
        return out

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held in memory (embedding, norms, linears), without the KV cache."""
        lin = sum(l.nbytes for n, l in self.linears().items() if not (n == "lm_head" and self.config.tie_embeddings))
        norms = sum(int(L.attn_norm.nbytes + L.ffn_norm.nbytes) for L in self.layers) + int(self.norm.nbytes)
        return lin + norms + int(self.embed.nbytes)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_k.nbytes + self.cache_v.nbytes)

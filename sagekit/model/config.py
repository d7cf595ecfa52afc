"""The Llama architecture description, read from an HF config.json and checked before any weight is read."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagekit.errors import SagekitError

SUPPORTED_MODEL_TYPES = ("llama",)
REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SagekitError(
                f"unsupported architecture: model_type '{model_type}' (sagekit supports Llama-family "
                "models with model_type 'llama')"
            )
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise SagekitError(f"config.json is missing {', '.join(missing)}: it is not a complete Llama config")
        n_heads = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        dim = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        if n_heads % n_kv:
            raise SagekitError(f"config.json: {n_heads} attention heads is not a multiple of {n_kv} KV heads")
        if head_dim % 2:
            raise SagekitError(f"config.json: head_dim {head_dim} is odd; RoPE needs an even head size")
        scaling = cfg.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise SagekitError(f"config.json: rope_scaling type '{kind}' is not supported (llama3, linear)")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            dim=dim,
            hidden_dim=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=int(cfg["vocab_size"]),
            head_dim=head_dim,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=cfg,
        )

    @classmethod
    def load(cls, path: Path) -> LlamaConfig:
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except FileNotFoundError:
            raise SagekitError(f"{path} not found: a model needs its config.json beside the weights") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SagekitError(f"{path} is not valid JSON ({e}); re-export the model's config.json") from None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint must hold, with its HF name and shape."""
        d, h, kv = self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
        q = self.n_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, d), "model.norm.weight": (d,)}
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (h, d),
                p + "mlp.up_proj.weight": (h, d),
                p + "mlp.down_proj.weight": (d, h),
            }
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def rope_inv_freq(self) -> list[float]:
        """Per-pair rotation frequencies, with Llama-3.1 / linear scaling applied as HF does."""
        half = self.head_dim // 2
        inv = [1.0 / self.rope_theta ** (2 * i / self.head_dim) for i in range(half)]
        s = self.rope_scaling
        if not s:
            return inv
        kind = s.get("rope_type", s.get("type"))
        if kind == "linear":
            return [f / float(s["factor"]) for f in inv]
        if kind == "llama3":
            factor = float(s["factor"])
            low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
            old_ctx = float(s.get("original_max_position_embeddings", 8192))
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            out = []
            for f in inv:
                wavelen = 2 * math.pi / f
                if wavelen < high_wavelen:
                    out.append(f)
                elif wavelen > low_wavelen:
                    out.append(f / factor)
                else:
                    smooth = (old_ctx / wavelen - low) / (high - low)
                    out.append((1 - smooth) * f / factor + smooth * f)
            return out
        return inv

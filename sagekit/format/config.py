"""The sizes of a Llama-family model, read from an HF config.json and checked before any weight is read.

Part of the file format, below io and model: the checkpoint reader validates tensors against it and the
model is built from it. Which tensors there are is the architecture's (sagekit.format.architecture)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagekit.errors import SagekitError
from sagekit.format.architecture import ARCHITECTURES, Architecture, architecture_of, sizes

REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
MAX_LAYERS = 1024  # far above any Llama; a corrupt count must not make expected_shapes() loop for ever
MAX_SIZE = 2 ** 31 - 1


def _int(cfg: dict[str, Any], key: str, default: int | None = None, limit: int = MAX_SIZE) -> int:
    """A positive integer setting (null or absent: the default). Corrupt values must fail here, by name,
    not later as a ZeroDivisionError or a shape error half way through loading."""
    v = default if cfg.get(key) is None else cfg[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
        raise SagekitError(f"config.json: {key} must be an integer from 1 to {limit}, not {v!r}")
    return v


def _float(cfg: dict[str, Any], key: str, default: float | None, where: str = "") -> float:
    """A positive finite number setting (absent: the default)."""
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise SagekitError(f"config.json: {where}{key} must be a positive number, not {v!r}")
    return float(v)


def _token_ids(cfg: dict[str, Any], key: str) -> tuple[int, ...]:
    v = cfg.get(key)
    ids = v if isinstance(v, list) else [] if v is None else [v]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise SagekitError(f"config.json: {key} must be a token id or a list of them, not {v!r}")
    return tuple(ids)


def _check_rope_scaling(scaling: Any) -> None:
    if not isinstance(scaling, dict):
        raise SagekitError(f"config.json: rope_scaling must be an object, not {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("llama3", "linear", "default"):
        raise SagekitError(f"config.json: rope_scaling type '{kind}' is not supported (llama3, linear)")
    if kind == "default":
        return
    _float(scaling, "factor", None, "rope_scaling.")
    if kind == "llama3":
        low = _float(scaling, "low_freq_factor", 1.0, "rope_scaling.")
        high = _float(scaling, "high_freq_factor", 4.0, "rope_scaling.")
        _float(scaling, "original_max_position_embeddings", 8192.0, "rope_scaling.")
        if low >= high:  # rope_inv_freq divides by their difference
            raise SagekitError(f"config.json: rope_scaling low_freq_factor {low} must be below high_freq_factor {high}")


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
    arch: Architecture = ARCHITECTURES[0]  # its row of the architecture table (Llama by default)
    sliding_window: int | None = None  # attention reaches this many tokens back (Mistral v0.1); None: all
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        if not isinstance(cfg, dict):
            raise SagekitError("config.json is not a JSON object: re-export the model's config.json")
        arch = architecture_of(cfg)
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise SagekitError(f"config.json is missing {', '.join(missing)}: it is not a complete Llama config")
        n_heads = _int(cfg, "num_attention_heads")
        n_kv = _int(cfg, "num_key_value_heads", n_heads)
        dim = _int(cfg, "hidden_size")
        head_dim = _int(cfg, "head_dim", dim // n_heads)
        if n_heads % n_kv:
            raise SagekitError(f"config.json: {n_heads} attention heads is not a multiple of {n_kv} KV heads")
        if head_dim % 2:
            raise SagekitError(f"config.json: head_dim {head_dim} is odd; RoPE needs an even head size")
        scaling = cfg.get("rope_scaling")
        if scaling is not None:
            _check_rope_scaling(scaling)
        tie = cfg.get("tie_word_embeddings")
        if tie is not None and not isinstance(tie, bool):
            raise SagekitError(f"config.json: tie_word_embeddings must be true or false, not {tie!r}")
        bos = _token_ids(cfg, "bos_token_id")
        return cls(
            dim=dim,
            hidden_dim=_int(cfg, "intermediate_size"),
            n_layers=_int(cfg, "num_hidden_layers", limit=MAX_LAYERS),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=_int(cfg, "vocab_size"),
            head_dim=head_dim,
            norm_eps=_float(cfg, "rms_norm_eps", 1e-5),
            rope_theta=_float(cfg, "rope_theta", 10000.0),
            rope_scaling=scaling,
            max_seq_len=_int(cfg, "max_position_embeddings", 2048),
            tie_embeddings=bool(tie),
            bos_token_id=bos[0] if len(bos) == 1 else None,
            eos_token_ids=_token_ids(cfg, "eos_token_id"),
            arch=arch,
            sliding_window=None if not arch.has_sliding_window or cfg.get("sliding_window") is None
            else _int(cfg, "sliding_window"),
            raw=cfg,
        )

    @classmethod
    def load(cls, path: Path) -> LlamaConfig:
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except FileNotFoundError:
            raise SagekitError(f"{path} not found: a model needs its config.json beside the weights") from None
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or absurdly deep nesting
            raise SagekitError(f"{path} is not valid JSON ({e}); re-export the model's config.json") from None
        except OSError as e:
            raise SagekitError(f"cannot read {path}: {e.strerror}") from None

    def _sizes(self) -> dict[str, int]:
        return sizes(self.dim, self.hidden_dim, self.n_heads, self.n_kv_heads, self.head_dim, self.vocab_size)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint must hold, with its HF name and shape."""
        return self.arch.expected_shapes(self._sizes(), self.n_layers, self.tie_embeddings)

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """One decoder layer's tensors by HF suffix (self_attn.q_proj, ...), with their shapes."""
        return self.arch.layer.shapes(self._sizes())

    def check_context(self, n_tokens: int) -> None:
        """Refuse a context longer than the sliding window: sagekit attends to the whole context, which is
        the model's own attention only while every key is within the window."""
        w = self.sliding_window
        if w is not None and n_tokens > w:
            raise SagekitError(f"a context of {n_tokens} tokens is longer than this model's sliding_window of {w} "
                               f"(config.json), and sagekit runs no sliding-window attention: use at most {w} "
                               "tokens (--seqlen, --calib-seqlen, --context-length)")

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

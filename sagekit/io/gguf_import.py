"""Turn a Llama GGUF into an HF-style folder (FP16 safetensors, config.json, tokenizer.json, tokenizer_config.json).

Three things undo llama.cpp's conversion: tensors are dequantised with the `gguf` package, the rows of
q_proj and k_proj are un-permuted (llama.cpp interleaves each head's two RoPE halves), and the byte-level
BPE tokenizer is rebuilt from the GGUF vocabulary and merges. The chat template and the special tokens it
names go to tokenizer_config.json, where HF tools (and sagekit's chat) look for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.errors import SagekitError
from sagekit.io.atomic import atomic_folder
from sagekit.io.safetensors import write_safetensors

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        if part not in _LAYER_NAMES:
            raise SagekitError(f"GGUF tensor '{gguf_name}' is not part of a Llama model")
        return f"model.layers.{idx}.{_LAYER_NAMES[part]}.{suffix}"
    if base not in _TOP_NAMES:
        raise SagekitError(f"GGUF tensor '{gguf_name}' is not part of a Llama model")
    return f"{_TOP_NAMES[base]}.{suffix}"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, rows (0, 2, 4, .., 1, 3, ..) back to two halves."""
    out, cols = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tokenizer_json(reader: Any) -> dict[str, Any]:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SagekitError("only GGUF files with a byte-level BPE (gpt2) tokenizer can be imported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, kind in zip(tokens, types) if kind == _CONTROL])
    return json.loads(tok.to_str())


def tokenizer_config(reader: Any) -> dict[str, Any]:
    """tokenizer_config.json's content: the special tokens by text, and the chat template when the GGUF has one."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                           "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False))}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            cfg[name] = tokens[int(i)]
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return cfg


def _config(reader: Any, tied: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise SagekitError(f"GGUF architecture '{arch}' is not supported: only llama GGUFs can be imported")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
        "torch_dtype": "float16",
    }


def open_gguf(src: Path) -> Any:
    """A gguf.GGUFReader on `src`, or a one-line error saying why not."""
    try:
        import gguf
    except ImportError:
        raise SagekitError("importing GGUF needs the gguf package: pip install 'sagekit[demo]'") from None
    try:
        return gguf.GGUFReader(src)
    except FileNotFoundError:
        raise SagekitError(f"{src} does not exist") from None
    except Exception as e:  # gguf raises ValueError/struct errors of many kinds on a bad file
        raise SagekitError(f"{src} is not a readable GGUF file ({e})") from None


def import_gguf(src: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write the HF-style FP16 folder for a Llama GGUF; the folder appears only once it is complete."""
    src, out_dir = Path(src), Path(out_dir)
    reader = open_gguf(src)
    import gguf  # installed: open_gguf has checked
    names = {t.name for t in reader.tensors}
    config = _config(reader, tied="output.weight" not in names)
    tokenizer = _tokenizer_json(reader)
    tok_config = tokenizer_config(reader)
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim > 1 or len(t.shape) > 1 else w.reshape(-1)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, n_kv)
        tensors[_hf_name(t.name)] = w.astype(np.float16)
    with atomic_folder(out_dir, force=force) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt", "source": src.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return out_dir

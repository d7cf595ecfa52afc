"""Random-weight Llama checkpoints of any shape, written like real ones (config, shards, tokenizer).

Tests use tiny ones; tools/make_checkpoint.py writes real-size ones so large-model handling can be
exercised without downloading anything. Weights are written one tensor at a time, so memory stays at
one tensor even for a 7B shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.format.config import LlamaConfig
from sagekit.io.checkpoint import INDEX_NAME
from sagekit.io.safetensors import write_safetensors

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=49152),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5),
}


def llama_config(**overrides: Any) -> dict[str, Any]:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2}
    cfg.update(overrides)
    return cfg


def byte_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer with the 256 byte tokens and no merges (fits any vocab >= 256)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} < 256 byte tokens")
    return tok.to_str()


def write_random_checkpoint(folder: str | Path, config: dict[str, Any], seed: int = 0, bf16: bool = False,
                            shards: int = 1, tokenizer_from: Path | None = None, std: float = 0.02) -> Path:
    """Write config.json, safetensors shard(s) (+ index when sharded) and tokenizer.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig.from_hf(config)
    shapes = cfg.expected_shapes()
    rng = np.random.default_rng(seed)
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for name in names[s * per:(s + 1) * per]:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            else:
                tensors[name] = (std * rng.standard_normal(shape, dtype=np.float32))
            weight_map[name] = fname
        write_safetensors(folder / fname, tensors, metadata={"format": "pt"}, bf16=bf16)
        del tensors
    if shards > 1:
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        shutil.copy2(tokenizer_from / "tokenizer.json", folder / "tokenizer.json")
    else:
        (folder / "tokenizer.json").write_text(byte_tokenizer_json(cfg.vocab_size))
    return folder

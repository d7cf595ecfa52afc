"""What is in a model folder: architecture, parameter counts, dtypes and bytes per tensor group."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np

from sagekit.io.checkpoint import Checkpoint


def tensor_group(name: str) -> str:
    """Collapse per-layer names: model.layers.7.mlp.up_proj.sign -> layers.mlp.up_proj."""
    base = re.sub(r"^model\.layers\.\d+\.", "layers.", name)
    return re.sub(r"\.(weight|sign|gid|alpha|sal_\w+|scale\w*|\w+_plane|mean\w*)$", "", base).removeprefix("model.")


def inspect_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    c = ckpt.config
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "dtypes": set()})
    params = 0
    for name in ckpt.names():
        f = ckpt.file_of(name)
        g = groups[tensor_group(name)]
        g["tensors"] += 1
        g["bytes"] += f.nbytes(name)
        g["dtypes"].add(f.dtype(name))
        if name.endswith(".weight"):
            params += int(np.prod(f.shape(name)))
    dense_params = sum(int(np.prod(s)) for s in c.expected_shapes().values())
    return {
        "path": str(ckpt.path),
        "architecture": {
            "model_type": "llama", "layers": c.n_layers, "dim": c.dim, "hidden_dim": c.hidden_dim,
            "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
            "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tied_embeddings": c.tie_embeddings,
            "max_position_embeddings": c.max_seq_len,
        },
        "parameters": dense_params,
        "stored_float_parameters": params,
        "file_bytes": ckpt.file_bytes,
        "fp16_bytes": 2 * dense_params,
        "quantization": ckpt.quantization,
        "groups": {k: {**v, "dtypes": sorted(v["dtypes"])} for k, v in sorted(groups.items())},
    }

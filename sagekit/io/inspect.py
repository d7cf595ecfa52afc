"""What is in a model folder: architecture, parameter counts, dtypes and bytes per tensor group."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np

from sagekit.format.architecture import EMBED, HEAD
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.packed import layout_name, modules_of


def tensor_group(name: str) -> str:
    """Collapse per-layer names: model.layers.7.mlp.up_proj.sign -> layers.mlp.up_proj."""
    base = re.sub(r"^model\.layers\.\d+\.", "layers.", name)
    return re.sub(r"\.(weight|sign|gid|alpha|sal_\w+|scale\w*|\w+_plane|mean\w*)$", "", base).removeprefix("model.")


def packed_bits(ckpt: Checkpoint) -> dict[str, Any]:
    """True bits of every quantised matrix from the bytes stored in the shards, whatever its method; the
    paper-style bits of `sage` matrices from their salient count and scales (other methods: report.json)."""
    q = ckpt.quantization or {}
    b = int((q.get("knobs") or {}).get("salient_bits", 4))
    rows, n_all, bytes_all, paper_all, scale_all = [], 0, 0, 0.0, 0.0
    for name, info in modules_of(ckpt).items():
        out, in_ = info["shape"]
        n = out * in_
        nbytes = sum(ckpt.file_of(t).nbytes(t) for t in ckpt.names() if t.startswith(name + "."))
        row: dict[str, Any] = {"name": name, "method": info["method"], "layout": layout_name(info),
                               "shape": [out, in_], "true_bits": 8.0 * nbytes / n, "bytes": nbytes}
        if row["layout"] == "sage":
            nnz = int(np.prod(ckpt.file_of(name + ".sal_idx").shape(name + ".sal_idx")))
            groups = int(np.prod(ckpt.file_of(name + ".alpha").shape(name + ".alpha")))
            scales = groups + int(np.count_nonzero(ckpt.raw(name + ".sal_scale")))
            row |= {"groups": groups, "salient_fraction": nnz / n, "paper_bits": 1.0 + nnz / n * (b - 1),
                    "paper_scale_bits": 16.0 * scales / n}
            paper_all, scale_all = paper_all + row["paper_bits"] * n, scale_all + row["paper_scale_bits"] * n
        rows.append(row)
        if name not in (EMBED, HEAD):  # a packed head (--head-bits) is listed, not counted as a decoder linear
            n_all, bytes_all = n_all + n, bytes_all + nbytes
    all_sage = all(r["layout"] == "sage" for r in rows if r["name"] not in (EMBED, HEAD))
    return {"matrices": rows, "linear_weights": n_all, "linear_bytes": bytes_all,
            "linear_true_bpw": 8.0 * bytes_all / max(n_all, 1),
            "linear_paper_bits": paper_all / max(n_all, 1) if all_sage else None,
            "linear_paper_scale_bits": scale_all / max(n_all, 1) if all_sage else None}


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
    bits = packed_bits(ckpt) if ckpt.quantization else None
    if bits:
        bits["file_true_bpw"] = 8.0 * ckpt.file_bytes / dense_params
    return {
        "path": str(ckpt.path),
        "architecture": {
            "model_type": c.arch.model_type, "name": c.arch.name, "layers": c.n_layers, "dim": c.dim, "hidden_dim": c.hidden_dim,
            "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
            "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tied_embeddings": c.tie_embeddings,
            "max_position_embeddings": c.max_seq_len, "sliding_window": c.sliding_window,
        },
        "parameters": dense_params,
        "stored_float_parameters": params,
        "file_bytes": ckpt.file_bytes,
        "fp16_bytes": 2 * dense_params,
        "quantization": None if ckpt.quantization is None else
        {k: v for k, v in ckpt.quantization.items() if k != "modules"},
        "bits": bits,
        "groups": {k: {**v, "dtypes": sorted(v["dtypes"])} for k, v in sorted(groups.items())},
    }

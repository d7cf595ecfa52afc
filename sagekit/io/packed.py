"""The packed folder format (docs/FORMAT.md): sharded safetensors of packed planes + config + report.

Writing goes through ShardWriter (deterministic shard contents and names); reading turns the arrays of one
quantised linear back into its layout object (sagekit.format), validating them first because files can be
damaged; sagekit.model.load makes the Linear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.errors import SagekitError
from sagekit.format.layouts import layout_of
from sagekit.io.checkpoint import INDEX_NAME, Checkpoint
from sagekit.io.safetensors import write_safetensors

QUANT_METHOD = "sage-ptq"
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30
SAGE_FIELDS = ("sign", "gid", "alpha", "sal_ptr", "sal_idx", "sal_val", "sal_scale")


class ShardWriter:
    """Collects tensors and writes them as model-0000k.safetensors shards of about SHARD_BYTES each."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.files: list[Path] = []

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.weight_map or name in self.pending:
            raise ValueError(f"tensor {name} written twice")
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"model-{len(self.files) + 1:05d}.safetensors"
        write_safetensors(path, self.pending, metadata={"format": "sagekit"})
        self.weight_map |= {n: path.name for n in self.pending}
        self.files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Write what is left and the index; returns the bytes of all shards."""
        self.flush()
        total = sum(p.stat().st_size for p in self.files)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return total


def quantization_config(method: str, knobs: dict[str, Any], modules: dict[str, dict[str, Any]],
                        extra: dict[str, Any]) -> dict[str, Any]:
    from sagekit import __version__

    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": method, "knobs": knobs,
            "sagekit_version": __version__, **extra, "modules": modules}


def modules_of(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    q = ckpt.quantization or {}
    if q.get("quant_method") != QUANT_METHOD:
        raise SagekitError(f"{ckpt.path}: quantization method '{q.get('quant_method')}' is not supported "
                           f"(sagekit reads '{QUANT_METHOD}' folders)")
    if q.get("format_version") != FORMAT_VERSION:
        raise SagekitError(f"{ckpt.path}: packed format version {q.get('format_version')} is not readable by this "
                           f"sagekit (it reads version {FORMAT_VERSION}); upgrade sagekit or compress again")
    modules = q.get("modules")
    if not isinstance(modules, dict):
        raise SagekitError(f"{ckpt.path}: config.json quantization_config has no modules table (corrupt folder)")
    return modules


def is_packed(ckpt: Checkpoint, prefix: str) -> bool:
    return ckpt.quantization is not None and prefix in modules_of(ckpt)


def layout_name(info: dict[str, Any]) -> str | None:
    """The stored layout of a module entry; folders written before layouts were named record the method only
    (the old method names are the layout names)."""
    return info.get("layout", info.get("method"))


def read_packed(ckpt: Checkpoint, prefix: str) -> Any:
    """The validated layout object (sagekit.format) of one packed module; the model decides how to run it."""
    info = modules_of(ckpt)[prefix]
    name = layout_name(info)
    try:
        shape = (int(info["shape"][0]), int(info["shape"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise SagekitError(f"{ckpt.path}: module {prefix} has no valid shape in quantization_config") from None
    layout = layout_of(name)
    if layout is None:
        raise SagekitError(f"{ckpt.path}: module {prefix} uses layout '{name}', unknown to this sagekit")
    if name == "sage":
        fields = SAGE_FIELDS
    else:  # baseline layouts may store optional fields: take every tensor of the module, from_arrays judges them
        fields = tuple(n[len(prefix) + 1:] for n in ckpt.names() if n.startswith(prefix + "."))
    arrays = {f: ckpt.copy(f"{prefix}.{f}") for f in fields}  # copies: the file map closes
    try:
        return layout.from_arrays(arrays, shape)
    except ValueError as e:
        raise SagekitError(f"{ckpt.path}: packed weight {prefix} is corrupt ({e}); compress the model again") from None

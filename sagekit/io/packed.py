"""The packed folder format: which tensors of a checkpoint are quantised, and how to read them back."""

from __future__ import annotations

from sagekit.backend import Backend
from sagekit.errors import SagekitError
from sagekit.io.checkpoint import Checkpoint
from sagekit.model.linear import Linear


def is_packed(ckpt: Checkpoint, prefix: str) -> bool:
    return ckpt.quantization is not None and (prefix + ".weight") not in ckpt


def read_linear(ckpt: Checkpoint, prefix: str, backend: Backend) -> Linear:
    raise SagekitError(f"{ckpt.path}: packed weights are not readable by this sagekit version")

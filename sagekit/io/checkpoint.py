"""Find and validate a model on disk: an HF folder (single or sharded safetensors) or one .safetensors file.

Everything is checked against config.json before a weight is read, so a bad checkpoint fails in a second
with a message naming the problem, not half way through a long job.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.errors import SagekitError
from sagekit.format.config import LlamaConfig
from sagekit.io.safetensors import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"


def _shards(path: Path) -> tuple[Path, list[Path]]:
    """(folder, shard files) for a folder or a single .safetensors path."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SagekitError(f"{path} is not a .safetensors file: give a model folder or a .safetensors path")
        return path.parent, [path]
    if not path.is_dir():
        raise SagekitError(f"{path} does not exist: give a model folder or a .safetensors file")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise SagekitError(f"{index} is not a valid safetensors index (no weight_map)") from None
        except OSError as e:
            raise SagekitError(f"cannot read {index}: {e.strerror}") from None
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f]
        if bad:  # a shard is a plain file name beside the index, never a path that leads elsewhere
            raise SagekitError(f"{index} names shard {bad[0]!r}, which is not a file name (corrupt index)")
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise SagekitError(f"{path}: shard {missing[0]} named in {INDEX_NAME} is missing; download it again")
        return path, [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return path, [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise SagekitError(f"{path} holds no .safetensors weights (PyTorch .bin checkpoints are not supported)")
    return path, found


class Checkpoint:
    """An opened model: its config, its shards, and a name -> shard map for reading one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.folder, self.shard_paths = _shards(self.path)
        self.config = LlamaConfig.load(self.folder / "config.json")
        self.quantization: dict[str, Any] | None = self.config.raw.get("quantization_config")
        if self.quantization is not None and not isinstance(self.quantization, dict):
            raise SagekitError(f"{self.folder / 'config.json'}: quantization_config is not a JSON object "
                               "(corrupt folder)")
        self._files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            for p in self.shard_paths:
                self._files.append(SafetensorsFile(p))
            for f in self._files:
                for name in f.keys():
                    if name in self._where:
                        raise SagekitError(f"tensor '{name}' appears in two shards ({self._where[name].path.name}, "
                                           f"{f.path.name}): the checkpoint is inconsistent")
                    self._where[name] = f
            self._check_tensors()
        except BaseException:
            self.close()
            raise

    def _check_tensors(self) -> None:
        """Every tensor config.json implies is there with its shape, or, packed, recorded with that shape.

        A packed folder without a modules table is left to sagekit.io.packed, which names what it lacks.
        """
        modules = {} if self.quantization is None else self.quantization.get("modules")
        if not isinstance(modules, dict):
            return
        for name, shape in self.config.expected_shapes().items():
            prefix = name.removesuffix(".weight")
            if prefix in modules:
                info = modules[prefix]
                if not isinstance(info, dict) or not isinstance(info.get("method"), str):
                    raise SagekitError(f"{self.path}: packed module {prefix} names no method in quantization_config "
                                       "(corrupt folder); compress the model again")
                recorded = info.get("shape")
                if recorded != list(shape):
                    raise SagekitError(f"{self.path}: packed module {prefix} records shape {recorded} but config.json "
                                       f"implies {list(shape)} (corrupt folder); compress the model again")
                continue
            if name not in self._where:
                hint = " (set tie_word_embeddings in config.json?)" if name == "lm_head.weight" else ""
                raise SagekitError(f"{self.path}: tensor '{name}' is missing{hint}")
            got = self._where[name].shape(name)
            if tuple(got) != shape:
                raise SagekitError(f"{self.path}: tensor '{name}' has shape {tuple(got)} but config.json implies "
                                   f"{shape}; the weights and config.json do not belong together")
            if self._where[name].dtype(name) not in ("F32", "F16", "BF16"):
                raise SagekitError(f"{self.path}: tensor '{name}' is {self._where[name].dtype(name)}; "
                                   "weights must be F32, F16 or BF16")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise SagekitError(f"{self.path}: tensor '{name}' is missing")
        return self._where[name]

    def float32(self, name: str) -> np.ndarray:
        """A float tensor as float32. NaN or Inf is refused here: no forward pass recovers from one."""
        w = self.file_of(name).float32(name)
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, which is the answer wanted
            finite = np.isfinite(np.sum(w, dtype=np.float64))  # float64 cannot overflow on finite float32 values
        if not finite:
            raise SagekitError(f"{self.path}: tensor '{name}' holds NaN or Inf values: the checkpoint is damaged; "
                               "fetch it again")
        return w

    def float16(self, name: str) -> np.ndarray:
        """A float tensor as float16 (FP16 files: without a float32 copy), NaN or Inf refused as in float32()."""
        w = self.file_of(name).float16(name)
        with np.errstate(invalid="ignore", over="ignore"):
            finite = np.isfinite(np.sum(w, dtype=np.float64))
        if not finite:
            raise SagekitError(f"{self.path}: tensor '{name}' holds NaN or Inf values: the checkpoint is damaged; "
                               "fetch it again")
        return w

    def raw(self, name: str) -> np.ndarray:
        return self.file_of(name).raw(name)

    def copy(self, name: str) -> np.ndarray:
        """raw() as a fresh array, the file's pages released: what a loaded model keeps of a packed tensor."""
        return self.file_of(name).copy(name)

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shard_paths)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy every tokenizer file a model folder has, so a derived folder is usable on its own."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)

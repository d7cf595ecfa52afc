"""OUT_DIR.partial: what an interrupted `compress` has finished, so that a rerun picks up from there.

Layout: `fingerprint.json` (what the results depend on: every input file's name, size and SHA-256, the
method and all its knobs, the sagekit version), `state.json` (results of whole-model steps, e.g. the lambda of a
bit target), and one `<matrix>.safetensors` per finished matrix holding its packed arrays, with its
statistics as JSON in the header metadata. Each file is written to a temporary name, fsynced and renamed,
so a kill -9 or a power loss leaves either the whole file or none of it. A rerun whose fingerprint differs
starts over and says which part changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.errors import SagekitError
from sagekit.io.atomic import write_error
from sagekit.io.safetensors import SafetensorsFile, write_safetensors

FINGERPRINT = "fingerprint.json"
STATE = "state.json"


def partial_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def file_fingerprint(paths: list[Path]) -> list[dict[str, Any]]:
    """Name, size and SHA-256 of each file. Not the mtime: a copy or a re-mounted data folder keeps the bytes
    but not the mtime, and hours of stored matrices would be thrown away (hashing 13 GB takes about 10 s)."""
    out = []
    for p in sorted(paths):
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        out.append({"file": p.name, "bytes": p.stat().st_size, "sha256": digest.hexdigest()})
    return out


def _fsync_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _readable(path: Path) -> bool:
    """Whether a stored matrix opens cleanly; one that does not is deleted and computed again."""
    try:
        with SafetensorsFile(path) as f:
            json.loads(f.metadata["stats"])
        return True
    except (SagekitError, KeyError, ValueError):
        path.unlink()
        return False


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(keys) or "format"


class PartialStore:
    """The finished matrices of one compress run, keyed by matrix name."""

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any]):
        self.path = partial_path(Path(out_dir))
        self.fingerprint = fingerprint
        self.restart_reason: str | None = None  # set when an existing store was discarded
        self._names: set[str] = set()
        try:
            self._open()
        except OSError as e:
            raise SagekitError(f"cannot use {self.path}: {e.strerror}; remove it or choose another output folder") \
                from None

    def _open(self) -> None:
        if self.path.is_dir():
            try:
                old = json.loads((self.path / FINGERPRINT).read_text())
            except (OSError, ValueError):
                old = None
            if old == self.fingerprint:
                self._names = {p.name.removesuffix(".safetensors") for p in self.path.glob("*.safetensors")
                               if _readable(p)}
                return
            self.restart_reason = ("its fingerprint file is missing or unreadable" if not isinstance(old, dict)
                                   else f"these changed since it was written: {_changed(old, self.fingerprint)}")
            shutil.rmtree(self.path)
        elif self.path.exists():
            raise SagekitError(f"{self.path} is a file, not a folder: remove it or choose another output folder")
        self.path.mkdir(parents=True)
        _fsync_write(self.path / FINGERPRINT, lambda p: p.write_text(json.dumps(self.fingerprint, indent=2)))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def put(self, name: str, arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
        meta = {"stats": json.dumps(stats)}
        try:
            _fsync_write(self.path / f"{name}.safetensors", lambda p: write_safetensors(p, arrays, meta))
        except OSError as e:
            raise write_error(e, self.path) from None
        self._names.add(name)

    def get(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays (copied out of the file) and stats of a finished matrix."""
        with SafetensorsFile(self.path / f"{name}.safetensors") as f:
            return {k: np.array(f.raw(k)) for k in f.keys()}, json.loads(f.metadata["stats"])

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE).read_text())
        except FileNotFoundError:
            return {}

    def save_state(self, state: dict[str, Any]) -> None:
        _fsync_write(self.path / STATE, lambda p: p.write_text(json.dumps(state)))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

"""A strict safetensors reader and writer.

Why our own: the `safetensors` NumPy API has no bfloat16, and a loader for user files must check every
offset in the header before trusting it (truncated downloads and corrupt headers are common). Reading
memory-maps the file, so one tensor at a time is touched and the whole file never sits in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from sagekit.errors import SagekitError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items() if k != "BF16"}
MAX_HEADER = 100 * 1024 * 1024


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen by shifting the bits."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


class SafetensorsFile:
    """An open, validated safetensors file. Tensors come back as read-only memory-mapped views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise SagekitError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self._parse(os.fstat(self._fh.fileno()).st_size)
        except BaseException:  # a bad file must not leak its handle (nor block deleting it on Windows)
            self._fh.close()
            raise

    def _parse(self, size: int) -> None:
        bad = f"{self.path} is not a valid safetensors file"
        if size < 8:
            raise SagekitError(f"{bad}: only {size} bytes (truncated download? fetch it again)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise SagekitError(f"{bad}: header length {n} does not fit in a {size}-byte file (truncated or corrupt)")
        try:
            header = json.loads(self._fh.read(n))
        except (ValueError, RecursionError):  # bad JSON or UTF-8, a huge integer, absurdly deep nesting
            raise SagekitError(f"{bad}: its header is not valid JSON (corrupt file)") from None
        if not isinstance(header, dict):
            raise SagekitError(f"{bad}: its header is not a JSON object (corrupt file)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SagekitError(f"{bad}: its __metadata__ is not a table of strings (corrupt header)")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            e = e if isinstance(e, dict) else {}
            dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
            if not (isinstance(shape, list) and all(_is_int(s) for s in shape)
                    and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
                raise SagekitError(f"{bad}: entry '{name}' is malformed (corrupt header)")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise SagekitError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            if any(s < 0 for s in shape):
                raise SagekitError(f"{bad}: tensor '{name}' has a negative dimension")
            shape, (begin, end) = tuple(shape), offsets
            want = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: a lying shape cannot overflow
            if not 0 <= begin <= end or end - begin != want:
                raise SagekitError(f"{bad}: tensor '{name}' offsets [{begin}, {end}) do not match its shape {shape}")
            if end > data_len:
                raise SagekitError(
                    f"{bad}: tensor '{name}' ends at byte {end} but the data section has {data_len} "
                    "(truncated download? fetch it again)"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def raw(self, name: str) -> np.ndarray:
        """The stored bits, zero-copy (BF16 comes back as uint16)."""
        dtype, shape, begin, end = self._entries[name]
        return np.frombuffer(self._map, dtype=DTYPES[dtype], count=(end - begin) // DTYPES[dtype].itemsize,
                             offset=self._data_start + begin).reshape(shape)

    def float16(self, name: str) -> np.ndarray:
        """A float tensor as a fresh float16 array: an F16 one copied as stored, with no float32 copy of the
        whole (a compressed model's FP16 embedding is the largest tensor it loads: 113 MB in float32)."""
        if self.dtype(name) != "F16":
            return self.float32(name).astype(np.float16)
        return self.copy(name)

    def copy(self, name: str) -> np.ndarray:
        """The stored bits as a fresh array (raw's dtype); its pages of the file map are released afterwards."""
        out = np.array(self.raw(name))
        self._release(name)
        return out

    def float32(self, name: str) -> np.ndarray:
        """Any float tensor as a fresh float32 array; its pages of the file map are released afterwards."""
        dtype = self.dtype(name)
        raw = self.raw(name)
        if dtype == "BF16":
            out = bf16_to_f32(raw)
        elif dtype in ("F32", "F16", "F64"):
            out = raw.astype(np.float32)
        else:
            raise SagekitError(f"{self.path}: tensor '{name}' is {dtype}, expected a float weight")
        del raw
        self._release(name)
        return out

    def _release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (the page cache keeps them): otherwise
        streaming a 13 GB checkpoint would leave every page read counted as resident until the file closes."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self._entries[name]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + end
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        self._map.close()
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      bf16: bool = False) -> int:
    """Write tensors in name order (deterministic bytes). With bf16=True float32 arrays are stored as BF16.

    Returns the bytes written. The caller is responsible for writing to a temporary name and renaming.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs: list[bytes | memoryview] = []
    offset = 0
    for name in sorted(tensors):
        a = tensors[name]
        if bf16 and a.dtype == np.float32:
            a, dtype = f32_to_bf16(a), "BF16"
        else:
            a = np.ascontiguousarray(a)
            dtype = _NAMES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
            if dtype is None:
                raise SagekitError(f"cannot store tensor '{name}' of dtype {a.dtype} in safetensors")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        data = memoryview(a.reshape(-1)).cast("B") if a.size else b""
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    return 8 + len(head) + offset

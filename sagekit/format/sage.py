"""The packed `sage` matrix of docs/FORMAT.md: packing, validation, dequantisation and byte accounting.

Everything here is vectorised NumPy; it runs once per matrix at compression or load time, never per token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from sagekit.format.bits import n_words, pack_bits, unpack_bits
from sagekit.format.checks import check_csr, check_padding, check_shape
from sagekit.format.stored import StoredArrays

MAX_GROUPS = 256  # group ids come from a uint8 plane; also bounds what an untrusted file can make us allocate


def n_id_bits(n_groups: int) -> int:
    """NB = ceil(log2 G): the number of group-id bit planes."""
    return (n_groups - 1).bit_length()


@dataclass
class PackedSage(StoredArrays):
    """One linear weight in the `sage` layout; field names, dtypes and shapes are those of FORMAT.md."""

    sign: np.ndarray  # uint32 (out, WORDS)
    gid: np.ndarray  # uint32 (NB, out, WORDS)
    alpha: np.ndarray  # float16 (G,)
    sal_ptr: np.ndarray  # int32 (out + 1,)
    sal_idx: np.ndarray  # uint16 (nnz,)
    sal_val: np.ndarray  # int8 (nnz,)
    sal_scale: np.ndarray  # float16 (out,)
    shape: tuple[int, int]

    @property
    def n_groups(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.sal_idx.shape[0])


    def unpack(self) -> np.ndarray:
        return unpack_sage(self)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> PackedSage:
        """Build from stored tensors, checking everything a kernel relies on (the file may be hostile)."""
        out, in_ = check_shape(shape)
        names = [f.name for f in fields(cls) if f.name != "shape"]
        if missing := [n for n in names if n not in arrays]:
            raise ValueError(f"{missing[0]}: missing")
        a = {n: np.ascontiguousarray(arrays[n]) for n in names}
        words = n_words(in_)
        g = a["alpha"].shape[0] if a["alpha"].ndim == 1 else 0
        if not 1 <= g <= MAX_GROUPS:
            raise ValueError(f"alpha: need 1..{MAX_GROUPS} groups, got shape {a['alpha'].shape}")
        expect = {
            "sign": (np.uint32, (out, words)),
            "gid": (np.uint32, (n_id_bits(g), out, words)),
            "alpha": (np.float16, (g,)),
            "sal_ptr": (np.int32, (out + 1,)),
            "sal_scale": (np.float16, (out,)),
            "sal_idx": (np.uint16, None),
            "sal_val": (np.int8, None),
        }
        for name, (dtype, shp) in expect.items():
            if shp is None:  # nnz: the length idx and val agree on, else the one sal_ptr names
                lengths = {a["sal_idx"].shape, a["sal_val"].shape}
                shp = lengths.pop() if len(lengths) == 1 and a["sal_idx"].ndim == 1 else (int(a["sal_ptr"][-1]),)
            if a[name].dtype != dtype or a[name].shape != shp:
                raise ValueError(f"{name}: expected {np.dtype(dtype).name} {shp}, got {a[name].dtype} {a[name].shape}")
        _check_planes(a["sign"], a["gid"], in_, g)
        _check_salient(a["sal_ptr"], a["sal_idx"], a["sal_val"], in_)
        alpha = a["alpha"].astype(np.float32)
        if not np.isfinite(alpha).all() or (alpha < 0).any() or (np.diff(alpha) < 0).any():
            raise ValueError("alpha: must be finite, non-negative and ascending")
        scale = a["sal_scale"].astype(np.float32)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise ValueError("sal_scale: must be finite and non-negative")
        return cls(**a, shape=(out, in_))


def _check_planes(sign: np.ndarray, gid: np.ndarray, in_: int, n_groups: int) -> None:
    check_padding("sign", sign, in_)
    check_padding("gid", gid, in_)
    if _ids_at_least(gid, n_groups).any():
        raise ValueError(f"gid: group id >= G = {n_groups}")


def _ids_at_least(gid: np.ndarray, n_groups: int) -> np.ndarray:
    """uint32 words with a bit set where the group id is >= n_groups: a bit-sliced comparison over whole
    words, so no per-weight id array is built."""
    ge = np.zeros(gid.shape[1:], dtype=np.uint32)
    if n_groups >= 1 << gid.shape[0]:
        return ge
    eq = ~ge
    for i in reversed(range(gid.shape[0])):
        if (n_groups >> i) & 1:
            eq &= gid[i]
        else:
            ge |= eq & gid[i]
            eq &= ~gid[i]
    return ge | eq


def _check_salient(ptr: np.ndarray, idx: np.ndarray, val: np.ndarray, in_: int) -> None:
    check_csr(ptr, idx, in_)
    if (val == -128).any():
        raise ValueError("sal_val: -128 is outside the symmetric range")


def pack_sage(
    sign: np.ndarray,
    gid: np.ndarray,
    alpha: np.ndarray,
    sal_ptr: np.ndarray,
    sal_idx: np.ndarray,
    sal_val: np.ndarray,
    sal_scale: np.ndarray,
) -> PackedSage:
    """Pack the quantiser's dense planes (bool sign, uint8 group id per weight) into the stored layout."""
    out, in_ = sign.shape
    g = len(alpha)
    if gid.shape != sign.shape:
        raise ValueError(f"gid: shape {gid.shape} differs from sign {sign.shape}")
    if g < 1 or int(gid.max()) >= g:
        raise ValueError(f"gid: group id >= G = {g}")
    if len(sal_idx) and (int(np.min(sal_idx)) < 0 or int(np.max(sal_idx)) >= min(in_, 1 << 16)):
        raise ValueError("sal_idx: column out of range (or beyond the uint16 limit)")
    gid = np.asarray(gid, dtype=np.uint8)
    planes = [pack_bits((gid >> i) & 1 == 1) for i in range(n_id_bits(g))]
    words = n_words(in_)
    arrays = {
        "sign": pack_bits(np.asarray(sign, dtype=bool)),
        "gid": np.stack(planes) if planes else np.zeros((0, out, words), dtype=np.uint32),
        "alpha": np.asarray(alpha, dtype=np.float32).astype(np.float16),
        "sal_ptr": np.asarray(sal_ptr, dtype=np.int32),
        "sal_idx": np.asarray(sal_idx).astype(np.uint16),
        "sal_val": np.asarray(sal_val, dtype=np.int8),
        "sal_scale": np.asarray(sal_scale, dtype=np.float32).astype(np.float16),
    }
    return PackedSage.from_arrays(arrays, (out, in_))


def group_ids(p: PackedSage) -> np.ndarray:
    """uint8 (out, in): the group id of every weight, rebuilt from the NB bit planes."""
    out, in_ = p.shape
    ids = np.zeros((out, in_), dtype=np.uint8)
    for i in range(p.gid.shape[0]):
        ids |= unpack_bits(p.gid[i], in_).view(np.uint8) << np.uint8(i)
    return ids


def unpack_sage(p: PackedSage) -> np.ndarray:
    """float32 (out, in): W_hat of FORMAT.md, computed in float32 from the float16 alpha and scales."""
    out, in_ = p.shape
    signs = np.where(unpack_bits(p.sign, in_), np.float32(1), np.float32(-1))
    w = signs * p.alpha.astype(np.float32)[group_ids(p)]
    rows = np.repeat(np.arange(out), np.diff(p.sal_ptr))
    w[rows, p.sal_idx] += p.sal_val.astype(np.float32) * p.sal_scale.astype(np.float32)[rows]
    return w


def sage_nbytes(out: int, in_: int, n_groups: int, nnz: int) -> int:
    """Bytes pack_sage produces for these sizes, so true bits per weight is known before packing."""
    planes = (1 + n_id_bits(n_groups)) * out * n_words(in_) * 4
    return planes + 2 * n_groups + 4 * (out + 1) + 3 * nnz + 2 * out


def random_packed(out: int, in_: int, n_groups: int, salient_fraction: float, seed: int = 0) -> PackedSage:
    """A plausible packed matrix of any shape (random planes, alphas 0.01-0.05, 4-bit corrections) for
    tests and benchmarks, without compressing a real weight."""
    rng = np.random.default_rng(seed)
    words = n_words(in_)
    tail = np.uint32((1 << (in_ % 32)) - 1 if in_ % 32 else 0xFFFFFFFF)
    nb = n_id_bits(n_groups)
    planes = rng.integers(0, 1 << 32, size=(1 + nb, out, words), dtype=np.uint32)
    planes[:, :, -1] &= tail
    if nb:  # ids >= G (G not a power of 2) drop their top bit, which brings them below G
        planes[nb] &= ~_ids_at_least(planes[1:], n_groups)
    alpha = np.sort(rng.uniform(0.01, 0.05, n_groups)).astype(np.float32)
    per_row = min(in_, max(0, int(round(salient_fraction * in_))))
    cols = np.sort(rng.integers(0, in_, size=(out, per_row)), axis=1)
    keep = np.ones(cols.shape, dtype=bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
    counts = keep.sum(axis=1)
    sal_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    sal_idx = cols[keep]
    sal_val = rng.integers(1, 8, size=sal_idx.shape) * rng.choice([-1, 1], size=sal_idx.shape)
    sal_scale = np.where(counts > 0, rng.uniform(0.005, 0.02, out), 0.0)
    arrays = {
        "sign": planes[0],
        "gid": planes[1:],
        "alpha": alpha.astype(np.float16),
        "sal_ptr": sal_ptr,
        "sal_idx": sal_idx.astype(np.uint16),
        "sal_val": sal_val.astype(np.int8),
        "sal_scale": sal_scale.astype(np.float16),
    }
    return PackedSage.from_arrays(arrays, (out, in_))

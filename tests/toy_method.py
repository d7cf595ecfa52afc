"""A toy quantisation method for tests/test_registry.py: sign x one FP16 scale per row, the scale being the
row's RMS times a knob of its own. It stores the `rtn` layout, so the registry line is all it needs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sagekit.format.bits import pack_bits
from sagekit.format.sign_scale import PackedRTN
from sagekit.format.stats import MatrixStats, matrix_stats
from sagekit.quant.registry import Method


@dataclass(frozen=True)
class ToyKnobs:
    shrink: float = 0.8


def quantize(w: np.ndarray, h: np.ndarray | None = None, name: str = "",
             shrink: float = 0.8) -> tuple[PackedRTN, MatrixStats]:
    t0 = time.perf_counter()
    w = np.asarray(w, dtype=np.float32)
    scale = (shrink * np.sqrt(np.mean(w * w, axis=1))).astype(np.float16)
    packed = PackedRTN.from_arrays({"sign": pack_bits(w >= 0), "scale": scale}, w.shape)
    return packed, matrix_stats(name, w, packed.unpack(), packed.nbytes, 1.0, 16.0 / w.shape[1], t0)


METHOD = Method(name="toy", layout="rtn", knobs=ToyKnobs)

"""The float32 sides of the codebook and level kernels: x zero-padded to a layout's width, and prefill as rows
decoded into a reused per-thread tile that BLAS multiplies (or, with AVX-512 VNNI, int8_gemm at int8).

From a few tokens on, BLAS on decoded rows beats a lookup per weight. Tiles of up to TILE_FLOATS hold each of
the demo model's matrices whole: BLAS ran its 512 x 576 x 1536 GEMM at 150 GFLOP/s whole against 117 in
128-row tiles. The tile is kept between calls (scratch.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from sagekit.kernels import int8_gemm, scratch

TILE_FLOATS = 1 << 20  # 4 MB of float32 rows a tile
ROW_ALIGN = int8_gemm.PANEL_ROWS  # tiles start on a 32-row panel: the int8 GEMM's, two of the layouts' 16-row blocks
# int8 from this many tokens on (and shorter prompts take the fused decode step anyway): layer 5 of vq203 and
# g305h5 ran at 0.86-2.4x float32's speed at 8 tokens, 0.97-2.1x at 32, 1.03-2.1x at 64 (session 20)
INT8_MIN_TOKENS = 32
INT8 = int8_gemm.VNNI and os.environ.get("SAGEKIT_PREFILL", "int8") != "float32"


def padded(x: np.ndarray, width: int) -> np.ndarray:
    """x (T, in) as C-contiguous float32 (T, width), zeros past in (the padding weights multiply them)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1] == width:
        return x
    out = np.zeros((x.shape[0], width), dtype=np.float32)
    out[:, : x.shape[1]] = x
    return out


def tiled_matmul(x: np.ndarray, out_features: int, width: int, decode: Callable[[int, int, np.ndarray], None],
                 decode_bytes: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """float32 (T, out_features) = x (T, width) @ W.T, where decode(r0, r1, tile) writes rows r0..r1 of W as
    float32 into tile (r1 - r0, width) for BLAS. From INT8_MIN_TOKENS tokens on, on a CPU with AVX-512 VNNI,
    where the layout gives decode_bytes(r0, r1, rows, scales), the product runs at int8 instead (int8_gemm.py;
    not with SAGEKIT_PREFILL=float32): decode_bytes writes the rows as int8 (q + 128, uint8 (r1 - r0, >= width),
    128 past width) and their float32 scales."""
    rows = max(ROW_ALIGN, TILE_FLOATS // max(width, 1) // ROW_ALIGN * ROW_ALIGN)
    rows = min(rows, -(-out_features // ROW_ALIGN) * ROW_ALIGN)
    if INT8 and decode_bytes is not None and x.shape[0] >= INT8_MIN_TOKENS:
        y = np.empty((x.shape[0], -(-out_features // ROW_ALIGN) * ROW_ALIGN), dtype=np.float32)
        tokens = int8_gemm.RoundedTokens(x)

        def step(r0: int, r1: int) -> None:
            byte_rows, scales = tokens.row_buffers(r1 - r0)
            decode_bytes(r0, r1, byte_rows, scales)
            tokens.multiply_rows(r1 - r0, byte_rows, scales, y, r0)
    else:
        y = np.empty((x.shape[0], out_features), dtype=np.float32)
        buf = scratch.buffer("tile", rows * width, np.float32)

        def step(r0: int, r1: int) -> None:
            tile = buf[: (r1 - r0) * width].reshape(r1 - r0, width)
            decode(r0, r1, tile)
            np.matmul(x, tile.T, out=y[:, r0:r1])
    for r0 in range(0, out_features, rows):
        step(r0, min(out_features, r0 + rows))
    return y if y.shape[1] == out_features else np.ascontiguousarray(y[:, :out_features])

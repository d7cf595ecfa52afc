"""What every method reports about one quantised matrix (a module of its own: loading a packed folder
imports the method modules, and they must not pull in the compression-only dependencies)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MatrixStats:
    name: str
    shape: tuple[int, int]
    salient_fraction: float
    groups: int
    silhouette_groups: int
    paper_bits: float
    paper_scale_bits: float
    true_bits: float
    rel_error: float
    seconds: float
    nbytes: int

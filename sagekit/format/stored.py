"""What every packed layout shares: its dataclass fields, less `shape`, are the arrays it stores.

So the bytes a layout reports (true bits) and the tensors the folder writer stores come from one place.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np


class StoredArrays:
    """Mixin for a layout dataclass; fields set to None (optional stores) are not stored."""

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "shape" and getattr(self, f.name) is not None}

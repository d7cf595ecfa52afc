"""Which layout class reads a packed matrix, by the method name quantization_config records for it.

A plain table, so that reading a folder needs no quantiser: the method modules (sagekit.quant) stay a
compression-time dependency.
"""

from __future__ import annotations

from typing import Any

from sagekit.format.billm import PackedBiLLM
from sagekit.format.gptq import PackedGPTQ
from sagekit.format.pbllm import PackedPBLLM
from sagekit.format.sage import PackedSage
from sagekit.format.sage_grid import PackedGrid
from sagekit.format.sage_vq import PackedVQ
from sagekit.format.sign_scale import PackedQ1, PackedRTN

LAYOUTS: dict[str, Any] = {"sage": PackedSage, "rtn": PackedRTN, "q1": PackedQ1, "billm": PackedBiLLM,
                           "pbllm": PackedPBLLM, "gptq": PackedGPTQ,
                           "sage-grid": PackedGrid, "sage-vq": PackedVQ}


def layout_of(method: str) -> Any:
    """The packed class of a method, or None for a method this sagekit does not know."""
    return LAYOUTS.get(method)

"""The last step of compress: assemble the packed folder (shards, config.json, tokenizer, report.json) from the
matrices the partial store holds, in model order, so the bytes do not depend on how the run got there."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.format.architecture import EMBED, HEAD
from sagekit.format.stats import MatrixStats
from sagekit.io.atomic import atomic_folder
from sagekit.io.checkpoint import Checkpoint, copy_tokenizer_files
from sagekit.io.packed import ShardWriter, quantization_config
from sagekit.io.partial import PartialStore
from sagekit.quant.head import LAYOUT as HEAD_LAYOUT


@dataclass
class FolderSpec:
    """What the folder records besides the matrices: the method, its layout, its knobs and the run's settings."""

    method: str
    layout: str
    knobs: dict[str, Any]
    extra: dict[str, Any]  # seed, rate_penalty_used, target_bpw, skip, calibration settings
    names: list[str]
    skipped: list[str]
    report_extra: dict[str, Any]  # appended to report.json: resumed_matrices, calibration
    head_bits: int = 16  # the embedding / lm_head; below 16 the store holds them packed (sagekit.quant.head)


def write_folder(ckpt: Checkpoint, store: PartialStore, out_dir: Path, spec: FolderSpec, stats: list[MatrixStats],
                 force: bool, seconds: float, head_stats: list[MatrixStats] = ()) -> dict[str, Any]:
    """Write OUT_DIR atomically from the stored matrices and the tensors that stay FP16; returns the report."""
    cfg = ckpt.config
    head_names = [s.name for s in head_stats]
    with atomic_folder(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp)
        for name in spec.names + head_names:
            for field_name, a in store.get(name)[0].items():
                writer.add(f"{name}.{field_name}", a)
        quantised = set(spec.names + head_names)
        for name in ckpt.names():
            if name.removesuffix(".weight") not in quantised:
                writer.add(name, ckpt.float32(name).astype(np.float16))
        file_bytes = writer.close()
        modules = {s.name: {"method": spec.method, "layout": spec.layout, "shape": list(s.shape)} for s in stats}
        modules.update({s.name: {"method": HEAD_LAYOUT, "layout": HEAD_LAYOUT, "bits": spec.head_bits,
                                  "shape": list(s.shape)} for s in head_stats})
        config = {**cfg.raw, "torch_dtype": "float16",
                  "quantization_config": quantization_config(spec.method, spec.knobs, modules, spec.extra)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(ckpt.folder, tmp)
        skipped_weights = sum(int(np.prod(ckpt.file_of(n + ".weight").shape(n + ".weight"))) for n in spec.skipped)
        total_params = sum(int(np.prod(s)) for s in cfg.expected_shapes().values())
        report = {**_report(spec, stats, skipped_weights, file_bytes, total_params, seconds), **spec.report_extra}
        report["totals"]["head_bits"] = spec.head_bits
        report["totals"]["head_bytes"] = (sum(s.nbytes for s in head_stats) if head_stats else
                                          2 * sum(int(np.prod(s)) for n, s in cfg.expected_shapes().items()
                                                  if n.removesuffix(".weight") in (EMBED, HEAD)))
        report["head"] = [asdict(s) for s in head_stats]
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _report(spec: FolderSpec, stats: list[MatrixStats], skipped_weights: int, file_bytes: int, total_params: int,
            seconds: float) -> dict[str, Any]:
    n = np.array([s.shape[0] * s.shape[1] for s in stats], dtype=np.float64)
    weights = float(n.sum()) + skipped_weights
    packed_bytes = sum(s.nbytes for s in stats) + 2 * skipped_weights  # skipped linears stay FP16

    def mean(key: str) -> float:
        return float(sum(getattr(s, key) * k for s, k in zip(stats, n)) / max(n.sum(), 1))

    return {
        "method": spec.method,
        "knobs": spec.knobs,
        "target_bpw": spec.extra["target_bpw"],
        "rate_penalty_used": spec.extra["rate_penalty_used"],
        "totals": {
            "linear_weights": int(weights),
            "linear_bytes": int(packed_bytes),
            "linear_true_bpw": 8.0 * packed_bytes / weights,
            "linear_paper_bits": mean("paper_bits"),
            "linear_paper_scale_bits": mean("paper_scale_bits"),
            "linear_rel_error": mean("rel_error"),
            "file_bytes": int(file_bytes),
            "file_true_bpw": 8.0 * file_bytes / total_params,
            "parameters": total_params,
            "fp16_bytes": 2 * total_params,
            "skipped": spec.skipped,
            "seconds": seconds,
        },
        "matrices": [asdict(s) for s in stats],
    }

"""Compress a whole checkpoint: stream its decoder linear weights through a method, write the packed folder.

One tensor is read at a time (memory-mapped), quantised, handed to the shard writer and dropped. Matrices
are independent, so `workers` processes share them; results are consumed in model order, so the output
bytes do not depend on the worker count. Each matrix draws its randomness from seed + crc32(name).
The calibrated baselines (billm, pbllm) instead go layer by layer through sagekit.quant.calibration, since
each layer's Hessian depends on the quantised layers before it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sagekit.errors import SagekitError
from sagekit.io.atomic import atomic_folder, check_output_dir
from sagekit.io.checkpoint import Checkpoint, copy_tokenizer_files
from sagekit.io.packed import ShardWriter, quantization_config
from sagekit.quant.calibration import CalibOptions, LayerwiseCalibration, calibration_windows
from sagekit.quant.sage import CurvePoint, MatrixQuantizer, SageKnobs, curve_choice, lambda_for_target
from sagekit.quant.stats import MatrixStats

LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BASELINES = ("rtn", "q1", "billm", "pbllm")  # each a module sagekit.quant.<name> with quantize(w, h, name, **knobs)
CALIBRATED = ("billm", "pbllm")
DEFAULT_CALIB = "../shared/data/wikitext2/wiki.valid.tokens"


@dataclass
class CompressOptions:
    knobs: SageKnobs = field(default_factory=SageKnobs)
    method: str = "sage"
    target_bpw: float | None = None
    skip: str | None = None
    workers: int = 1
    baseline_knobs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the baseline's quantize
    calib: CalibOptions | None = None
    device: str = "cpu"  # where the calibration forward passes run


def linear_names(n_layers: int, skip: str | None) -> tuple[list[str], list[str]]:
    """(to quantise, skipped) decoder linear prefixes, in model order."""
    pattern = re.compile(skip) if skip else None
    names = [f"model.layers.{i}.{s}" for i in range(n_layers) for s in LINEAR_SUFFIXES]
    return [n for n in names if not (pattern and pattern.search(n))], [n for n in names if pattern and pattern.search(n)]


def matrix_seed(seed: int, name: str) -> int:
    return (seed + zlib.crc32(name.encode())) % (2 ** 32)


_worker: dict[str, Any] = {}


def _init_worker(src: str, threads: int | None) -> None:
    if threads:
        import numba

        numba.set_num_threads(threads)
    _worker["ckpt"] = Checkpoint(src)


def _curve(args: tuple[str, SageKnobs]) -> tuple[int, list[CurvePoint]]:
    name, knobs = args
    w = _read(name)
    return w.size, MatrixQuantizer(w, knobs, matrix_seed(knobs.seed, name)).curve()


def _quantize(args: tuple[str, SageKnobs, float, int | None]) -> tuple[dict[str, np.ndarray], MatrixStats]:
    name, knobs, lam, groups = args
    t0 = time.perf_counter()
    w = _read(name)
    packed, stats = MatrixQuantizer(w, knobs, matrix_seed(knobs.seed, name)).quantize(lam, name, t0, groups)
    return packed.arrays(), stats


def _quantize_baseline(args: tuple[str, str, dict[str, Any]]) -> tuple[dict[str, np.ndarray], MatrixStats]:
    name, method, knobs = args
    packed, stats = importlib.import_module(f"sagekit.quant.{method}").quantize(_read(name), None, name, **knobs)
    return packed.arrays(), stats


def _check_method(opts: CompressOptions) -> None:
    m = opts.method
    if m != "sage" and m not in BASELINES:
        raise SagekitError(f"unknown method '{m}': use sage, {', '.join(BASELINES)}")
    if m in CALIBRATED and opts.calib is None:
        raise SagekitError(f"--method {m} needs calibration text: pass --calib FILE (e.g. {DEFAULT_CALIB}; "
                           "never the text you evaluate on)")
    if m not in CALIBRATED and opts.calib is not None:
        raise SagekitError(f"--method {m} uses the weights only; --calib applies to {' and '.join(CALIBRATED)}")
    if m != "sage" and opts.target_bpw is not None:
        raise SagekitError("--target-bpw applies to --method sage only")


def _calibrated(names: list[str], opts: CompressOptions,
                calib: LayerwiseCalibration) -> Iterator[tuple[dict[str, np.ndarray], MatrixStats]]:
    module = importlib.import_module(f"sagekit.quant.{opts.method}")

    def quantize(name: str, w: np.ndarray, h: np.ndarray) -> tuple[Any, MatrixStats]:
        try:
            return module.quantize(w, h, name, **opts.baseline_knobs)
        except ValueError as e:
            raise SagekitError(f"{name}: {opts.method} failed ({e})") from None

    for packed, stats in calib.run(set(names), _read, quantize):
        yield packed.arrays(), stats


def _read(name: str) -> np.ndarray:
    """The weight as float32; Checkpoint.float32 already refuses NaN and Inf."""
    return _worker["ckpt"].float32(name + ".weight")


def _map(fn: Callable, items: list, src: Path, workers: int) -> Iterator:
    """fn over items in order, in this process or a pool; numba gets the cores split between workers."""
    if workers <= 1:
        _init_worker(str(src), None)
        yield from map(fn, items)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(src), threads)) as pool:
        yield from pool.map(fn, items)


def compress(src: Path, out_dir: Path, opts: CompressOptions, force: bool = False,
             on_start: Callable[[str, int], None] | None = None,
             on_step: Callable[[MatrixStats | None], None] | None = None) -> dict[str, Any]:
    """Write the packed folder for `src` into `out_dir` (atomically) and return the report.

    on_start(phase, n) announces a phase of n steps; on_step gets each finished matrix's stats (None for a
    step of the rate-curve phase that `target_bpw` adds).
    """
    _check_method(opts)
    check_output_dir(out_dir, force)
    t_start = time.perf_counter()
    with Checkpoint(src) as ckpt:
        if ckpt.quantization is not None:
            raise SagekitError(f"{src} is already quantised; compress the original FP16/BF16/FP32 model")
        cfg = ckpt.config
        names, skipped = linear_names(cfg.n_layers, opts.skip)
        knobs = opts.knobs
        lam = knobs.rate_penalty if opts.method == "sage" else None
        groups: dict[str, int | None] = dict.fromkeys(names)
        if opts.target_bpw is not None:
            knobs = SageKnobs(**{**knobs.to_dict(), "group_select": "rate"})
            if on_start:
                on_start("rate curves", len(names))
            curves = []
            for c in _map(_curve, [(n, knobs) for n in names], src, opts.workers):
                curves.append(c)
                if on_step:
                    on_step(None)
            lam = lambda_for_target(curves, opts.target_bpw)
            groups = {n: curve_choice(c, lam)[0] for n, (_, c) in zip(names, curves)}
        calib = None
        if opts.method == "sage":
            results = _map(_quantize, [(n, knobs, lam, groups[n]) for n in names], src, opts.workers)
        elif opts.method in CALIBRATED:
            from sagekit.backend import get_backend

            _init_worker(str(src), None)
            calib = LayerwiseCalibration(_worker["ckpt"], get_backend(opts.device),
                                         calibration_windows(ckpt.folder, opts.calib))
            results = _calibrated(names, opts, calib)
        else:
            results = _map(_quantize_baseline, [(n, opts.method, opts.baseline_knobs) for n in names], src,
                           opts.workers)
        if on_start:
            on_start("quantize", len(names))
        stats: list[MatrixStats] = []
        with atomic_folder(out_dir, force=force) as tmp:
            writer = ShardWriter(tmp)
            for arrays, st in results:
                for field_name, a in arrays.items():
                    writer.add(f"{st.name}.{field_name}", a)
                stats.append(st)
                if on_step:
                    on_step(st)
            quantised = set(names)
            for name in ckpt.names():
                if name.removesuffix(".weight") not in quantised:
                    writer.add(name, ckpt.float32(name).astype(np.float16))
            file_bytes = writer.close()
            modules = {s.name: {"method": opts.method, "shape": list(s.shape)} for s in stats}
            method_knobs = knobs.to_dict() if opts.method == "sage" else dict(opts.baseline_knobs)
            extra = {"seed": knobs.seed, "rate_penalty_used": lam, "target_bpw": opts.target_bpw,
                     "skip": opts.skip, **(opts.calib.to_dict() if opts.calib else {})}
            config = {**cfg.raw, "torch_dtype": "float16",
                      "quantization_config": quantization_config(opts.method, method_knobs, modules, extra)}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_tokenizer_files(ckpt.folder, tmp)
            skipped_weights = sum(int(np.prod(ckpt.file_of(n + ".weight").shape(n + ".weight"))) for n in skipped)
            total_params = sum(int(np.prod(s)) for s in cfg.expected_shapes().values())
            report = _report(stats, skipped, skipped_weights, file_bytes, total_params, method_knobs, lam, opts,
                             time.perf_counter() - t_start)
            if calib is not None:
                report["calibration"] = {**opts.calib.to_dict(), "forward_seconds": calib.forward_seconds}
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _report(stats: list[MatrixStats], skipped: list[str], skipped_weights: int, file_bytes: int,
            total_params: int, knobs: dict[str, Any], lam: float | None, opts: CompressOptions,
            seconds: float) -> dict[str, Any]:
    n = np.array([s.shape[0] * s.shape[1] for s in stats], dtype=np.float64)
    weights = float(n.sum()) + skipped_weights
    packed_bytes = sum(s.nbytes for s in stats) + 2 * skipped_weights  # skipped linears stay FP16
    mean = lambda key: float(sum(getattr(s, key) * k for s, k in zip(stats, n)) / max(n.sum(), 1))  # noqa: E731
    return {
        "method": opts.method,
        "knobs": knobs,
        "target_bpw": opts.target_bpw,
        "rate_penalty_used": lam,
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
            "skipped": skipped,
            "seconds": seconds,
        },
        "matrices": [asdict(s) for s in stats],
    }

"""Compress a whole checkpoint: stream its decoder linear weights through a method, write the packed folder.

One tensor is read at a time (memory-mapped), quantised, handed to the shard writer and dropped. Matrices
are independent, so `workers` processes share them; results are consumed in model order, so the output
bytes do not depend on the worker count. Each matrix draws its randomness from seed + crc32(name).
The calibrated baselines (billm, pbllm), and sage with `saliency="hessian"`, instead go layer by layer
through sagekit.quant.calibration, since each layer's Hessian depends on the quantised layers before it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sagekit import __version__
from sagekit.errors import DiskFullError, SagekitError
from sagekit.format.layouts import layout_of
from sagekit.format.stats import MatrixStats
from sagekit.io.atomic import atomic_folder, check_output_dir
from sagekit.io.checkpoint import Checkpoint, copy_tokenizer_files
from sagekit.io.packed import ShardWriter, quantization_config
from sagekit.io.partial import PartialStore, file_fingerprint
from sagekit.quant.calibration import CalibOptions, LayerwiseCalibration, calibration_windows
from sagekit.quant.sage import CurvePoint, MatrixQuantizer, SageKnobs, curve_choice, lambda_for_target

LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# each a module sagekit.quant.<name> with quantize(w, h, name, **knobs); "sage-grid" is sage's grid recipe
BASELINES = ("rtn", "q1", "billm", "pbllm", "gptq", "sage-grid")
CALIBRATED = ("billm", "pbllm", "gptq")  # need --calib
CALIB_OPTIONAL = ("sage-grid",)  # error feedback with --calib, data-free without
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


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(src: str, threads: int | None) -> None:
    """Open the checkpoint once per process; `threads` is given in pool workers only."""
    if threads:
        import numba

        numba.set_num_threads(threads)
        # a worker must not outlive a parent killed with SIGKILL
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
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


def method_module(method: str) -> Any:
    return importlib.import_module(f"sagekit.quant.{method.replace('-', '_')}")


def _quantize_baseline(args: tuple[str, str, dict[str, Any]]) -> tuple[dict[str, np.ndarray], MatrixStats]:
    name, method, knobs = args
    packed, stats = method_module(method).quantize(_read(name), None, name, **knobs)
    return packed.arrays(), stats


def _calibrates(opts: CompressOptions) -> bool:
    return (opts.method in CALIBRATED or (opts.method == "sage" and opts.knobs.saliency == "hessian")
            or (opts.method in CALIB_OPTIONAL and opts.calib is not None))


def _check_method(opts: CompressOptions) -> None:
    m = opts.method
    if m != "sage" and m not in BASELINES:
        raise SagekitError(f"unknown method '{m}': use sage, {', '.join(BASELINES)}")
    if opts.knobs.saliency not in ("magnitude", "hessian"):
        raise SagekitError(f"--saliency must be magnitude or hessian, not '{opts.knobs.saliency}'")
    what = f"--method {m}" if m != "sage" else "--saliency hessian"
    if _calibrates(opts) and opts.calib is None:
        raise SagekitError(f"{what} needs calibration text: pass --calib FILE (e.g. {DEFAULT_CALIB}; "
                           "never the text you evaluate on)")
    if not _calibrates(opts) and opts.calib is not None and m not in CALIB_OPTIONAL:
        raise SagekitError(f"--method {m} uses the weights only; --calib applies to {', '.join(CALIBRATED)}, "
                           "the sage grid recipe and sage --recipe paper --saliency hessian")
    if m not in ("sage", "sage-grid") and opts.target_bpw is not None:
        raise SagekitError("--target-bpw applies to --method sage only")
    if opts.target_bpw is not None and opts.knobs.saliency == "hessian":
        raise SagekitError("--target-bpw needs every matrix's rate curve before the calibration pass, which "
                           "--saliency hessian cannot give: use --rate-penalty with it")


def _calibrated(names: list[str], opts: CompressOptions, calib: LayerwiseCalibration, store: PartialStore,
                knobs_of: Callable[[str], dict[str, Any]]) -> Iterator[tuple[dict[str, np.ndarray], MatrixStats]]:
    """The layer-by-layer pass; matrices finished by an interrupted run are reused, not quantised again
    (the pass still runs every layer on their stored weights, without recording Hessians there)."""
    layout = layout_of(opts.method)
    if opts.method == "sage":

        def method(w: np.ndarray, h: np.ndarray, name: str) -> tuple[Any, MatrixStats]:
            t0 = time.perf_counter()
            return MatrixQuantizer(w, opts.knobs, matrix_seed(opts.knobs.seed, name), h).quantize(
                opts.knobs.rate_penalty, name, t0)
    else:
        module = method_module(opts.method)

        def method(w: np.ndarray, h: np.ndarray, name: str) -> tuple[Any, MatrixStats]:
            return module.quantize(w, h, name, **knobs_of(name))

    def quantize(name: str, w: np.ndarray, h: np.ndarray | None) -> tuple[Any, MatrixStats | None]:
        if name in store:
            arrays, stats = store.get(name)
            return layout.from_arrays(arrays, tuple(stats["shape"])), None
        try:
            return method(w, h, name)
        except ValueError as e:
            raise SagekitError(f"{name}: {opts.method} failed ({e})") from None

    for packed, stats in calib.run(set(names), _read, quantize, {n for n in names if n in store}):
        if stats is not None:
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
             on_step: Callable[[MatrixStats | None], None] | None = None,
             on_note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the packed folder for `src` into `out_dir` (atomically) and return the report.

    Finished matrices are kept in OUT_DIR.partial (sagekit.io.partial) until the folder is complete, so a
    rerun after Ctrl-C, kill or power loss resumes; the final folder is assembled from them in model order,
    hence byte-identical whether or not the run was interrupted. on_start(phase, n) announces a phase of n
    steps; on_step gets each finished matrix's stats (None for a step of the rate-curve phase that
    `target_bpw` adds); on_note gets one-line messages (resuming, starting over).
    """
    _check_method(opts)
    check_output_dir(out_dir, force)
    t_start = time.perf_counter()
    with Checkpoint(src) as ckpt:
        if ckpt.quantization is not None:
            raise SagekitError(f"{src} is already quantised; compress the original FP16/BF16/FP32 model")
        run = _Run(src, ckpt, out_dir, opts, PartialStore(out_dir, _fingerprint(ckpt, opts)))
        if on_note and run.store.restart_reason:
            on_note(f"starting over in {run.store.path}: {run.store.restart_reason}")
        elif on_note and len(run.store):
            on_note(f"resuming: {len(run.store)} of {len(run.names)} matrices already done in {run.store.path}")
        try:
            report = run.write(run.quantize(on_start, on_step), force, t_start)
        except KeyboardInterrupt:
            if on_note:
                on_note(f"{len(run.store)} finished matrices kept in {run.store.path}: run the same command again "
                        "to resume")
            raise
        except DiskFullError as e:
            raise DiskFullError(f"{e} (the {len(run.store)} finished matrices in {run.store.path} will be reused)") \
                from None
        except BaseException:
            run.store.remove()  # the same input would fail the same way
            raise
        run.store.remove()
    return report


def _fingerprint(ckpt: Checkpoint, opts: CompressOptions) -> dict[str, Any]:
    """Everything the output bytes depend on (the worker count does not)."""
    inputs = [*ckpt.shard_paths, ckpt.folder / "config.json"]
    if opts.calib is not None:
        inputs.append(Path(opts.calib.path))
    return {"sagekit_version": __version__, "method": opts.method, "knobs": opts.knobs.to_dict(),
            "target_bpw": opts.target_bpw, "skip": opts.skip, "baseline_knobs": opts.baseline_knobs,
            "calib": opts.calib.to_dict() if opts.calib else None, "inputs": file_fingerprint(inputs)}


class _Run:
    """One compress run: quantise what the partial store lacks, then assemble OUT_DIR from the store."""

    def __init__(self, src: Path, ckpt: Checkpoint, out_dir: Path, opts: CompressOptions, store: PartialStore):
        self.src, self.ckpt, self.out_dir, self.opts, self.store = src, ckpt, out_dir, opts, store
        self.names, self.skipped = linear_names(ckpt.config.n_layers, opts.skip)
        self.knobs = opts.knobs
        self.lam = self.knobs.rate_penalty if opts.method == "sage" else None
        self.calib: LayerwiseCalibration | None = None
        self.bits: dict[str, int] | None = None  # the grid recipe's allocation for --target-bpw
        self.resumed = len(store)

    def _solve_target(self, on_start: Callable | None, on_step: Callable | None) -> dict[str, int | None]:
        """lambda and each matrix's G for the bit target, from the sampled rate curves (kept in the store)."""
        self.knobs = SageKnobs(**{**self.knobs.to_dict(), "group_select": "rate"})
        state = self.store.state()
        if "lambda" not in state:
            if on_start:
                on_start("rate curves", len(self.names))
            curves = []
            for c in _map(_curve, [(n, self.knobs) for n in self.names], self.src, self.opts.workers):
                curves.append(c)
                if on_step:
                    on_step(None)
            lam = lambda_for_target(curves, self.opts.target_bpw)
            state = {"lambda": lam, "groups": {n: curve_choice(c, lam)[0] for n, (_, c) in zip(self.names, curves)}}
            self.store.save_state(state)
        self.lam = state["lambda"]
        return state["groups"]

    def _solve_bits(self) -> dict[str, int]:
        """Each matrix's bits for the grid recipe's target (kept in the store, so a resume reuses them)."""
        from sagekit.format.sage_grid import grid_nbytes
        from sagekit.quant.allocation import allocate
        from sagekit.quant.sage_grid import sensitivity

        state = self.store.state()
        if "bits" not in state:
            sizes = {n: tuple(self.ckpt.file_of(n + ".weight").shape(n + ".weight")) for n in self.names}
            state = {"bits": allocate(sizes, grid_nbytes, self.opts.target_bpw, sensitivity(sizes))}
            self.store.save_state(state)
        return state["bits"]

    def knobs_of(self, name: str) -> dict[str, Any]:
        """The keyword arguments of a baseline-style method's quantize for one matrix."""
        if self.bits is None:
            return self.opts.baseline_knobs
        return {**self.opts.baseline_knobs, "bits": self.bits[name]}

    def quantize(self, on_start: Callable | None, on_step: Callable | None) -> list[MatrixStats]:
        """Quantise every matrix not yet in the store, saving each as it finishes; all stats in model order."""
        opts, store = self.opts, self.store
        groups = dict.fromkeys(self.names)
        if opts.target_bpw is not None and opts.method == "sage":
            groups = self._solve_target(on_start, on_step)
        elif opts.target_bpw is not None:
            self.bits = self._solve_bits()
        if on_start:
            on_start("quantize", len(self.names))
        stats = {n: _stats(store.get(n)[1]) for n in self.names if n in store}
        for st in stats.values():
            if on_step:
                on_step(st)
        todo = [n for n in self.names if n not in store]
        if _calibrates(opts):
            from sagekit.backend import get_backend

            _init_worker(str(self.src), None)
            self.calib = LayerwiseCalibration(_worker["ckpt"], get_backend(opts.device),
                                              calibration_windows(self.ckpt.folder, opts.calib),
                                              opts.calib.fp_targets)
            results = _calibrated(self.names, opts, self.calib, store, self.knobs_of)
        elif opts.method == "sage":
            results = _map(_quantize, [(n, self.knobs, self.lam, groups[n]) for n in todo], self.src, opts.workers)
        else:
            results = _map(_quantize_baseline, [(n, opts.method, self.knobs_of(n)) for n in todo], self.src,
                           opts.workers)
        for arrays, st in results:
            store.put(st.name, arrays, asdict(st))
            stats[st.name] = st
            if on_step:
                on_step(st)
        return [stats[n] for n in self.names]

    def write(self, stats: list[MatrixStats], force: bool, t_start: float) -> dict[str, Any]:
        """Assemble OUT_DIR from the stored matrices (in model order) and the tensors that stay FP16."""
        ckpt, opts, cfg = self.ckpt, self.opts, self.ckpt.config
        with atomic_folder(self.out_dir, force=force) as tmp:
            writer = ShardWriter(tmp)
            for name in self.names:
                for field_name, a in self.store.get(name)[0].items():
                    writer.add(f"{name}.{field_name}", a)
            quantised = set(self.names)
            for name in ckpt.names():
                if name.removesuffix(".weight") not in quantised:
                    writer.add(name, ckpt.float32(name).astype(np.float16))
            file_bytes = writer.close()
            modules = {s.name: {"method": opts.method, "shape": list(s.shape)} for s in stats}
            method_knobs = self.knobs.to_dict() if opts.method == "sage" else dict(opts.baseline_knobs)
            extra = {"seed": self.knobs.seed, "rate_penalty_used": self.lam, "target_bpw": opts.target_bpw,
                     "skip": opts.skip, **(opts.calib.to_dict() if opts.calib else {})}
            config = {**cfg.raw, "torch_dtype": "float16",
                      "quantization_config": quantization_config(opts.method, method_knobs, modules, extra)}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_tokenizer_files(ckpt.folder, tmp)
            skipped_weights = sum(int(np.prod(ckpt.file_of(n + ".weight").shape(n + ".weight")))
                                  for n in self.skipped)
            total_params = sum(int(np.prod(s)) for s in cfg.expected_shapes().values())
            report = _report(stats, self.skipped, skipped_weights, file_bytes, total_params, method_knobs, self.lam,
                             opts, time.perf_counter() - t_start)
            report["resumed_matrices"] = self.resumed
            if self.calib is not None:
                report["calibration"] = {**opts.calib.to_dict(), "forward_seconds": self.calib.forward_seconds}
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def _stats(d: dict[str, Any]) -> MatrixStats:
    return MatrixStats(**{**d, "shape": tuple(d["shape"])})


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

"""Compress a whole checkpoint: plan, quantise every decoder linear through its method, write the packed folder.

The method comes from sagekit.quant.registry. Three steps: planning (a --target-bpw solve by the method's
plan, kept in the partial store), execution (matrices are independent, so the worker pool of
sagekit.quant.pool shares them; a calibrated method instead goes layer by layer through
sagekit.quant.calibration, since each layer's Hessian depends on the quantised layers before it), and
writing (sagekit.quant.folder). One tensor is read at a time (memory-mapped), quantised, stored and dropped.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sagekit import __version__
from sagekit.errors import DiskFullError, SagekitError
from sagekit.format.config import LlamaConfig
from sagekit.format.layouts import layout_of
from sagekit.format.stats import MatrixStats
from sagekit.io.atomic import check_output_dir
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.partial import PartialStore, file_fingerprint
from sagekit.model.tokenizer import load_tokenizer
from sagekit.quant import head, registry
from sagekit.quant.head import head_names, quantize_head
from sagekit.quant.calibration import CalibOptions, LayerwiseCalibration, calibration_windows
from sagekit.quant.folder import FolderSpec, write_folder
from sagekit.quant.pool import init_worker, map_weights, read_weight, worker_checkpoint


@dataclass
class CompressOptions:
    method: str = "sage-grid"  # a name of sagekit.quant.registry
    knobs: Any = None  # the method's knobs dataclass; None: its defaults
    target_bpw: float | None = None
    skip: str | None = None
    workers: int = 1
    calib: CalibOptions | None = None
    device: str = "cpu"  # where the calibration forward passes run
    head_bits: int | None = None  # the embedding / lm_head: 16 keeps FP16, 2-8 packs it, None: head.default_bits

    def resolve(self) -> tuple[registry.Method, Any]:
        method = registry.get(self.method)
        return method, method.knobs() if self.knobs is None else self.knobs


def linear_names(config: LlamaConfig, skip: str | None) -> tuple[list[str], list[str]]:
    """(to quantise, skipped) decoder linear prefixes, in model order."""
    pattern = re.compile(skip) if skip else None
    names = config.arch.linear_names(config.n_layers)
    return [n for n in names if not (pattern and pattern.search(n))], [n for n in names if pattern and pattern.search(n)]


def check_options(opts: CompressOptions) -> tuple[registry.Method, Any]:
    """The method and its knobs, or a one-line error for options that do not go together."""
    method, knobs = opts.resolve()
    label, need = registry.cli_label(method.name), method.calibration_of(knobs)
    if need == "required" and opts.calib is None:
        raise SagekitError(f"--method {label} needs calibration text: pass --calib FILE (text like what the model "
                           "will read; never the text you evaluate on)")
    if need == "none" and opts.calib is not None:
        users = [registry.cli_label(n) for n in registry.MODULES if registry.get(n).calibration != "none"]
        raise SagekitError(f"--method {label} uses the weights only here; --calib applies to {', '.join(users)} "
                           "(and to sage --recipe paper --saliency hessian)")
    if opts.head_bits is not None and opts.head_bits != head.FP16 and not 2 <= opts.head_bits <= 8:
        raise SagekitError(f"--head-bits must be 2 to 8, or 16 for an FP16 head; not {opts.head_bits}")
    if opts.target_bpw is not None and method.plan is None:
        steered = sorted({n.split("-")[0] for n in registry.MODULES if registry.get(n).plan is not None})
        raise SagekitError(f"--target-bpw applies to --method {', '.join(steered)} only")
    return method, knobs


def calibrates(method: registry.Method, knobs: Any, opts: CompressOptions) -> bool:
    """Whether the run goes layer by layer through calibration text."""
    need = method.calibration_of(knobs)
    return need == "required" or (need == "optional" and opts.calib is not None)


def _quantize_one(w: np.ndarray, name: str, args: tuple[str, dict[str, Any]]) -> tuple[dict[str, np.ndarray], MatrixStats]:
    method, knobs = args
    try:
        packed, stats = registry.get(method).module().quantize(w, None, name, **knobs)
    except ValueError as e:  # a knob this matrix cannot take (e.g. a --dim that does not divide its width)
        raise SagekitError(f"{name}: {method} failed ({e})") from None
    return packed.arrays(), stats


def compress(src: Path, out_dir: Path, opts: CompressOptions, force: bool = False,
             on_start: Callable[[str, int], None] | None = None,
             on_step: Callable[[MatrixStats | None], None] | None = None,
             on_note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the packed folder for `src` into `out_dir` (atomically) and return the report.

    Finished matrices are kept in OUT_DIR.partial (sagekit.io.partial) until the folder is complete, so a
    rerun after Ctrl-C, kill or power loss resumes; the final folder is assembled from them in model order,
    hence byte-identical whether or not the run was interrupted. on_start(phase, n) announces a phase of n
    steps; on_step gets each finished matrix's stats (None for a step of a plan, such as sage-paper's rate
    curves); on_note gets one-line messages (resuming, starting over).
    """
    method, knobs = check_options(opts)
    if opts.head_bits is None:
        # the sage recipes' measured head; the baselines keep theirs FP16, as published
        sage = method.name.startswith("sage-")
        opts = dataclasses.replace(opts, head_bits=head.default_bits(sage and calibrates(method, knobs, opts)))
    check_output_dir(out_dir, force)
    t_start = time.perf_counter()
    with Checkpoint(src) as ckpt:
        if ckpt.quantization is not None:
            raise SagekitError(f"{src} is already quantised; compress the original FP16/BF16/FP32 model")
        load_tokenizer(ckpt.folder)  # the output copies it, and a folder without one cannot generate: check now
        run = _Run(src, ckpt, opts, method, knobs, PartialStore(out_dir, _fingerprint(ckpt, opts, knobs)))
        if on_note and run.store.restart_reason:
            on_note(f"starting over in {run.store.path}: {run.store.restart_reason}")
        elif on_note and len(run.store):
            on_note(f"resuming: {len(run.store)} of {len(run.names)} matrices already done in {run.store.path}")
        try:
            stats = run.quantize(on_start, on_step)
            head_stats = run.quantize_head(on_step)
            report = write_folder(ckpt, run.store, out_dir, run.folder_spec(), stats, force,
                                  time.perf_counter() - t_start, head_stats)
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


def _fingerprint(ckpt: Checkpoint, opts: CompressOptions, knobs: Any) -> dict[str, Any]:
    """Everything the output bytes depend on (the worker count does not)."""
    inputs = [*ckpt.shard_paths, ckpt.folder / "config.json"]
    if opts.calib is not None:
        inputs.append(Path(opts.calib.path))
    return {"sagekit_version": __version__, "method": opts.method, "knobs": asdict(knobs),
            "target_bpw": opts.target_bpw, "skip": opts.skip, "head_bits": opts.head_bits,
            "calib": opts.calib.to_dict() if opts.calib else None, "inputs": file_fingerprint(inputs)}


class _Run:
    """One compress run: plan, quantise what the partial store lacks, describe the folder to write."""

    def __init__(self, src: Path, ckpt: Checkpoint, opts: CompressOptions, method: registry.Method, knobs: Any,
                 store: PartialStore):
        self.src, self.ckpt, self.opts, self.method, self.knobs, self.store = src, ckpt, opts, method, knobs, store
        self.names, self.skipped = linear_names(ckpt.config, opts.skip)
        self.head = head_names(ckpt.config) if opts.head_bits != head.FP16 else []
        self.plan: dict[str, Any] = {}
        self.calib: LayerwiseCalibration | None = None
        self.resumed = len(store)

    def calibrates(self) -> bool:
        return calibrates(self.method, self.knobs, self.opts)

    def _make_plan(self, on_start: Callable | None, on_step: Callable | None) -> dict[str, Any]:
        """The method's plan for --target-bpw (kept in the store, so a resume reuses it); {} without a target."""
        if self.opts.target_bpw is None:
            return {}
        state = self.store.state()
        if not state:
            sizes = {n: tuple(self.ckpt.file_of(n + ".weight").shape(n + ".weight")) for n in self.names}
            job = registry.PlanJob(sizes, self.opts.target_bpw, self.knobs,
                                   lambda fn, items: map_weights(fn, items, self.src, self.opts.workers),
                                   on_start, on_step)
            try:
                state = self.method.plan(job)
            except ValueError as e:
                raise SagekitError(str(e)) from None
            self.store.save_state(state)
        return state

    def knobs_of(self, name: str) -> dict[str, Any]:
        """The keyword arguments of the method's quantize for one matrix: its knobs and the plan's choices."""
        return {**asdict(self.knobs), **self.plan.get("matrix_knobs", {}).get(name, {})}

    def quantize(self, on_start: Callable | None, on_step: Callable | None) -> list[MatrixStats]:
        """Quantise every matrix not yet in the store, saving each as it finishes; all stats in model order."""
        opts, store = self.opts, self.store
        self.plan = self._make_plan(on_start, on_step)
        self.knobs = dataclasses.replace(self.knobs, **self.plan.get("knobs", {}))
        if on_start:
            on_start("quantize", len(self.names) + len(self.head))
        stats = {n: _stats(store.get(n)[1]) for n in self.names if n in store}
        for st in stats.values():
            if on_step:
                on_step(st)
        if self.calibrates():
            from sagekit.backend import get_backend

            init_worker(str(self.src), None)
            self.calib = LayerwiseCalibration(worker_checkpoint(), get_backend(opts.device),
                                              calibration_windows(self.ckpt.folder, opts.calib),
                                              opts.calib.fp_targets, head=bool(self.head))
            results = self._calibrated()
        else:
            todo = [n for n in self.names if n not in store]
            results = map_weights(_quantize_one, [(n, (self.method.name, self.knobs_of(n))) for n in todo],
                                  self.src, opts.workers)
        for arrays, st in results:
            store.put(st.name, arrays, asdict(st))
            stats[st.name] = st
            if on_step:
                on_step(st)
        return [stats[n] for n in self.names]

    def quantize_head(self, on_step: Callable | None) -> list[MatrixStats]:
        """The embedding (and an untied lm_head) at --head-bits, kept in the store like the linears; rounded
        under the lm_head inputs' Hessian when the run is calibrated."""
        h = None if self.calib is None else self.calib.head_hessian
        for name in self.head:
            if name not in self.store:
                w = self.ckpt.float32(name + ".weight")
                arrays, st = quantize_head(w, name, self.opts.head_bits, getattr(self.knobs, "seed", 0) or 0,
                                           h if name == head.lm_head_name(self.ckpt.config) else None)
                self.store.put(name, arrays, asdict(st))
                if on_step:
                    on_step(st)
        return [_stats(self.store.get(n)[1]) for n in self.head]

    def _calibrated(self) -> Iterator[tuple[dict[str, np.ndarray], MatrixStats]]:
        """The layer-by-layer pass; matrices finished by an interrupted run are reused, not quantised again
        (the pass still runs every layer on their stored weights, without recording Hessians there)."""
        layout, module, store = layout_of(self.method.layout), self.method.module(), self.store

        def quantize(name: str, w: np.ndarray, h: np.ndarray | None) -> tuple[Any, MatrixStats | None]:
            if name in store:
                arrays, stats = store.get(name)
                return layout.from_arrays(arrays, tuple(stats["shape"])), None
            try:
                return module.quantize(w, h, name, **self.knobs_of(name))
            except ValueError as e:
                raise SagekitError(f"{name}: {self.method.name} failed ({e})") from None

        for packed, stats in self.calib.run(set(self.names), read_weight, quantize, {n for n in self.names if n in store}):
            if stats is not None:
                yield packed.arrays(), stats

    def folder_spec(self) -> FolderSpec:
        opts = self.opts
        calib = opts.calib.to_dict() if opts.calib else {}
        extra = {"seed": getattr(self.knobs, "seed", None),
                 "rate_penalty_used": self.plan.get("rate_penalty_used", getattr(self.knobs, "rate_penalty", None)),
                 "target_bpw": opts.target_bpw, "skip": opts.skip, **calib}
        report_extra: dict[str, Any] = {"resumed_matrices": self.resumed}
        if self.calib is not None:
            report_extra["calibration"] = {**calib, "forward_seconds": self.calib.forward_seconds}
        return FolderSpec(self.method.name, self.method.layout, asdict(self.knobs), extra, self.names, self.skipped,
                          report_extra, self.opts.head_bits)


def _stats(d: dict[str, Any]) -> MatrixStats:
    return MatrixStats(**{**d, "shape": tuple(d["shape"])})

"""Calibration for the Hessian-based baselines: GPTQ's layer-by-layer pass over random windows of a text.

The text is tokenised once (no BOS) with the model's tokenizer and `samples` windows of `seqlen` tokens are
drawn at seeded random offsets. Layer i then runs on every window's hidden state with its linears wrapped in
RecordingLinear, which accumulates H = 2/n sum x x^T of the inputs (linears that read one input share one H:
q/k/v, gate/up, as the architecture's shared inputs say); its linears are quantised with their H, the quantised weights are swapped in, and the layer runs
again to give layer i+1 its inputs. So every layer is calibrated on what the already quantised layers before
it produce, as GPTQ does. Layers are loaded as sagekit.model.load loads them and run by the model's block
function with a run state of their own (one cache slot). Memory: one layer's weights and Hessians plus the
(samples, seqlen, dim) float32 hidden states. Never calibrate on the text you evaluate on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sagekit.backend import Backend
from sagekit.errors import SagekitError
from sagekit.format.architecture import FINAL_NORM, layer_prefix
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.text import read_text
from sagekit.model.linear import DenseLinear, Linear
from sagekit.model.llama import Layer, RunState, block, embed_tokens, rmsnorm
from sagekit.model.load import load_embedding, load_layer
from sagekit.model.tokenizer import load_tokenizer
from sagekit.quant.hessian import drift_target

Quantizer = Callable[[str, np.ndarray, np.ndarray | None], tuple[Any, Any]]  # (name, weight, H) -> (packed, stats)


@dataclass(frozen=True)
class CalibOptions:
    path: Path
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    fp_targets: bool = False  # fit each layer to the FP16 model's outputs (GPTAQ), not to its own inputs

    def to_dict(self) -> dict[str, Any]:
        out = {"calib": str(self.path), "calib_samples": self.samples, "calib_seqlen": self.seqlen,
               "calib_seed": self.seed}
        return {**out, "calib_fp_targets": True} if self.fp_targets else out


def calibration_windows(folder: Path, opts: CalibOptions) -> np.ndarray:
    """int64 (samples, seqlen): windows at seeded random offsets of the tokenised calibration text."""
    if opts.samples < 1 or opts.seqlen < 2:
        raise SagekitError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    ids = np.asarray(load_tokenizer(folder).encode(read_text(Path(opts.path))).ids, dtype=np.int64)
    if len(ids) < opts.seqlen:
        raise SagekitError(f"{opts.path} has {len(ids)} tokens, fewer than one calibration window of "
                           f"{opts.seqlen}: use a longer text or a smaller --calib-seqlen")
    starts = np.random.default_rng(opts.seed).integers(0, len(ids) - opts.seqlen + 1, size=opts.samples)
    return np.stack([ids[s:s + opts.seqlen] for s in starts])


class HessianAccumulator:
    """sum x^T x (float32, on the backend) over every row of every input seen; hessian() = 2/n of it.

    q, k and v are called with the same array object, so an input identical to the previous one is skipped.
    """

    def __init__(self, xp: Any, dim: int):
        self.xp, self.sum, self.rows, self.last = xp, xp.zeros((dim, dim), dtype=xp.float32), 0, None

    def add(self, x: Any) -> None:
        if x is self.last:
            return
        self.last = x
        xf = x.astype(self.xp.float32)
        self.sum += xf.T @ xf
        self.rows += x.shape[0]

    def hessian(self, backend: Backend) -> np.ndarray:
        if self.rows == 0:
            raise ValueError("no inputs were recorded")
        return backend.to_numpy(self.sum * np.float32(2.0 / self.rows)).astype(np.float32)


class DriftAccumulator(HessianAccumulator):
    """Also sums x_fp^T x, the FP16 model's input (row-aligned, from `stash`) against the quantised model's.

    With the Hessian it gives sagekit.quant.hessian.drift_target: cross() = 2/n of the sum, like hessian().
    """

    def __init__(self, xp: Any, dim: int, stash: dict[str, Any], key: str):
        super().__init__(xp, dim)
        self.stash, self.key, self.sum_cross = stash, key, xp.zeros((dim, dim), dtype=xp.float32)

    def add(self, x: Any) -> None:
        if x is not self.last:
            self.sum_cross += self.stash[self.key].astype(self.xp.float32).T @ x.astype(self.xp.float32)
        super().add(x)

    def cross(self, backend: Backend) -> np.ndarray:
        return backend.to_numpy(self.sum_cross * np.float32(2.0 / self.rows)).astype(np.float32)


class StashingLinear:
    """A Linear that keeps its latest input under its shared-input key (the FP16 pass of fp_targets)."""

    def __init__(self, inner: Linear, stash: dict[str, Any], key: str):
        self.inner, self.stash, self.key = inner, stash, key
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def __call__(self, x: Any) -> Any:
        self.stash[self.key] = x
        return self.inner(x)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


class RecordingLinear:
    """A Linear that hands its input to an accumulator, then computes what the wrapped linear computes."""

    def __init__(self, inner: Linear, acc: HessianAccumulator):
        self.inner, self.acc = inner, acc
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def __call__(self, x: Any) -> Any:
        self.acc.add(x)
        return self.inner(x)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


def record_hessians(state: RunState, layer: Layer, hidden: Any) -> dict[str, np.ndarray]:
    """H of each of the layer's linears (by HF suffix) over the hidden states (windows, seqlen, dim) fed to it."""
    spec = state.config.arch.layer
    inputs = spec.inputs()
    dims = {key: getattr(layer, attr).in_features for attr, key in inputs.items()}
    accs = {key: HessianAccumulator(state.xp, dim) for key, dim in dims.items()}
    recording = dataclasses.replace(layer, **{a: RecordingLinear(getattr(layer, a), accs[k]) for a, k in inputs.items()})
    for h in hidden:
        block(recording, state, 0, h, 0)
    by_key = {key: acc.hessian(state.backend) for key, acc in accs.items()}
    return {t.suffix: by_key[inputs[t.attr]] for t in spec.linears}


def record_drift(state: RunState, layer: Layer, hidden: Any, hidden_fp: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(H, C) of each of the layer's linears by HF suffix, and hidden_fp advanced through the (dense) layer.

    Window by window, the layer first runs on the FP16 model's residual stream, keeping each linear's
    input, then on the quantised model's, accumulating H and the cross term against the kept inputs.
    """
    spec, stash = state.config.arch.layer, {}
    inputs = spec.inputs()
    dims = {key: getattr(layer, attr).in_features for attr, key in inputs.items()}
    accs = {key: DriftAccumulator(state.xp, dim, stash, key) for key, dim in dims.items()}
    stashing = dataclasses.replace(layer, **{a: StashingLinear(getattr(layer, a), stash, k) for a, k in inputs.items()})
    recording = dataclasses.replace(layer, **{a: RecordingLinear(getattr(layer, a), accs[k]) for a, k in inputs.items()})
    for j in range(len(hidden)):
        fp_out = block(stashing, state, 0, hidden_fp[j], 0)
        block(recording, state, 0, hidden[j], 0)
        hidden_fp[j] = fp_out
    by_key = {key: (acc.hessian(state.backend), acc.cross(state.backend)) for key, acc in accs.items()}
    return {t.suffix: by_key[inputs[t.attr]] for t in spec.linears}


class LayerwiseCalibration:
    """Runs the pass over a dense checkpoint one layer at a time; `forward_seconds` is the time spent in the model.

    fp_targets: also carry the FP16 model's residual stream and quantise each linear towards
    drift_target (GPTAQ's asymmetric calibration); it costs a second forward pass per layer.
    head: after the last layer, also record `head_hessian`, the H of the lm_head's inputs (the final norm's
    outputs on the quantised model), for a packed head (sagekit.quant.head).
    """

    def __init__(self, ckpt: Checkpoint, backend: Backend, windows: np.ndarray, fp_targets: bool = False,
                 head: bool = False):
        self.ckpt, self.backend, self.windows, self.fp_targets, self.head = ckpt, backend, windows, fp_targets, head
        self.forward_seconds = 0.0
        self.head_hessian: np.ndarray | None = None

    def run(self, names: set[str], read: Callable[[str], np.ndarray], quantize: Quantizer,
            stored: set[str] | frozenset[str] = frozenset()) -> Iterator[tuple[Any, Any]]:
        """(packed, stats) of each linear in `names`, in model order; the others stay dense in the pass.

        `stored` names were quantised by an interrupted run: quantize() gets no Hessian for them, and a layer
        made of stored ones only runs once, to pass its outputs on (a resume costs half a pass there).
        """
        ckpt, backend, xp, cfg = self.ckpt, self.backend, self.backend.xp, self.ckpt.config
        spec = cfg.arch.layer
        # one layer at a time: loaded when reached and dropped when done, run with one cache slot; no head
        state = RunState(cfg, backend, self.windows.shape[1], n_layers=1)
        embed = load_embedding(ckpt, backend)
        t0 = time.perf_counter()
        hidden = xp.stack([embed_tokens(state, embed, w) for w in self.windows])
        del embed
        hidden_fp = hidden.copy() if self.fp_targets else None
        self.forward_seconds += time.perf_counter() - t0
        for i in range(cfg.n_layers):
            layer, prefix = load_layer(ckpt, i, backend), layer_prefix(i)
            todo = {prefix + t.suffix for t in spec.linears} & (names - stored)
            recorded = self._record(state, layer, hidden, hidden_fp, bool(todo))
            for t in spec.linears:
                name = prefix + t.suffix
                if name in names:
                    w, h = read(name), None
                    if name in todo:
                        h, cross = recorded[t.suffix]
                        w = w if cross is None else drift_target(w, h, cross)
                    packed, stats = quantize(name, w, h)
                    setattr(layer, t.attr, DenseLinear(backend.asarray(packed.unpack())))  # = DequantLinear's weight
                    yield packed, stats
            del recorded
            t0 = time.perf_counter()
            for j in range(len(hidden)):
                hidden[j] = block(layer, state, 0, hidden[j], 0)
            self.forward_seconds += time.perf_counter() - t0
        if self.head:
            norm = xp.asarray(ckpt.float32(f"{FINAL_NORM}.weight"), dtype=xp.float32)
            acc = HessianAccumulator(xp, cfg.dim)
            for h in hidden:
                acc.add(rmsnorm(state, h, norm))
            self.head_hessian = acc.hessian(backend)

    def _record(self, state: RunState, layer: Layer, hidden: Any, hidden_fp: Any | None,
                todo: bool) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """{suffix: (H, cross term or None)} of the layer; the FP16 stream, when carried, advances even if not todo."""
        t0 = time.perf_counter()
        if hidden_fp is not None:
            out = dict(record_drift(state, layer, hidden, hidden_fp))
        else:
            out = {s: (h, None) for s, h in record_hessians(state, layer, hidden).items()} if todo else {}
        self.forward_seconds += time.perf_counter() - t0
        return out

"""Speed of packed inference next to a dense baseline measured in the same run.

Per matrix: the packed GEMV (one token) against the dense GEMV of the same weight (NumPy float32 on CPU;
sagekit's FP16 GEMV kernel on GPU, which a CUDA graph can capture), each checked against a bare matmul of its
shape, with the GB/s the packed bytes are streamed at. Per model: decode and prefill tokens/s of the packed model
and of the same model held dense.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sagekit.backend import Backend
from sagekit.errors import SagekitError
from sagekit.format.config import LlamaConfig
from sagekit.format.sage import random_packed
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.synthetic import SHAPES, llama_config
from sagekit.model.linear import DenseLinear, GridEmbedding, HalfLinear, Linear, SageLinear
from sagekit.model.llama import Layer, Llama, Weights
from sagekit.model.load import load_model

BENCH_SHAPES = {**SHAPES, "llama2-70b-layer": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=1,
                                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)}


def _time(fn: Callable[[], Any], backend: Backend, repeats: int) -> float:
    """Median seconds of fn over repeats, after one warm-up call."""
    fn()
    backend.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_bandwidth(backend: Backend) -> tuple[float, str]:
    """Peak memory bandwidth in GB/s: the datasheet figure on a GPU, a measured large copy on the CPU."""
    if backend.is_gpu:
        props = backend.xp.cuda.runtime.getDeviceProperties(backend.xp.cuda.Device().id)
        return 2 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8 / 1e9, "device datasheet"
    a = np.ones(64 * 2 ** 20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    t = _time(lambda: np.copyto(b, a), backend, 5)
    return 2 * a.nbytes / t / 1e9, "measured 256 MiB copy (read + write)"


@dataclass
class ModelPair:
    packed: Llama
    dense: Llama


def densify(model: Llama, max_seq_len: int) -> Llama:
    """The same model as the dense baseline runs it: every packed linear replaced by its dequantised
    weight, and the FP16 embedding / lm_head in the backend dtype (float32 on the CPU), as `load_model`
    holds an FP16 checkpoint."""
    be = model.backend

    def dense(lin: Linear) -> Linear:
        if hasattr(lin, "packed"):
            return DenseLinear(be.asarray(lin.packed.unpack()))
        return DenseLinear(be.asarray(lin.weight)) if isinstance(lin, HalfLinear) else lin

    spec, w = model.config.arch.layer, model.weights
    layers = [dataclasses.replace(L, **{t.attr: dense(getattr(L, t.attr)) for t in spec.linears}) for L in w.layers]
    embed = be.asarray(w.embed.dense() if isinstance(w.embed, GridEmbedding) else w.embed)
    lm_head = DenseLinear(embed) if model.config.tie_embeddings else dense(w.lm_head)
    return Llama(model.config, be, Weights(embed, layers, w.norm, lm_head), max_seq_len)


def load_pair(path: Path, backend: Backend, max_seq_len: int) -> ModelPair:
    """A compressed folder, run packed, and its dense twin (dequantised once, held dense)."""
    with Checkpoint(path) as ckpt:
        if ckpt.quantization is None:
            raise SagekitError(f"{path} is not compressed: bench compares a packed model with its dense twin, "
                               "so it would time dense against dense. Compress it first, or use --shape NAME")
    ref = load_model(path, backend, max_seq_len, kernels=False)
    return ModelPair(load_model(path, backend, max_seq_len), densify(ref, max_seq_len))


def random_pair(shape: str, backend: Backend, max_seq_len: int, layers: int | None, groups: int,
                salient: float) -> ModelPair:
    """Random packed weights of a named real shape (no compression needed) and their dense twin."""
    overrides = dict(BENCH_SHAPES[shape])
    if layers:
        overrides["num_hidden_layers"] = layers
    c = LlamaConfig.from_hf(llama_config(**overrides))
    spec, shapes = c.arch.layer, c.layer_shapes()
    norm = backend.xp.ones(c.dim, dtype=backend.xp.float32)
    norms = {t.attr: norm for t in spec.norms}
    embed = backend.asarray(0.02 * np.random.default_rng(0).standard_normal((c.vocab_size, c.dim), dtype=np.float32))
    packed_layers, dense_layers = [], []
    for i in range(c.n_layers):
        mats = {t.attr: random_packed(*shapes[t.suffix], groups, salient, seed=7 * i + j)
                for j, t in enumerate(spec.linears)}
        packed_layers.append(Layer(**norms, **{a: SageLinear(m, backend) for a, m in mats.items()}))
        dense_layers.append(Layer(**norms, **{a: DenseLinear(backend.asarray(m.unpack())) for a, m in mats.items()}))
    head = DenseLinear(embed)
    return ModelPair(Llama(c, backend, Weights(embed, packed_layers, norm, head), max_seq_len),
                     Llama(c, backend, Weights(embed, dense_layers, norm, head), max_seq_len))


PREFILL_REPEATS = 3  # timed prefills per round, median reported
SUSPECT_DENSE = 1.5  # a dense twin this much slower than a bare matmul of its shape is not a fair baseline


def matrix_speed(pair: ModelPair, repeats: int, on_step: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """GEMV time of each distinct linear shape of the first layer, packed next to dense, and next to a bare
    `x @ W.T` on a fresh contiguous weight of the same shape and dtype: the check that the dense twin is
    as fast as the backend's own matmul. `flags` names a figure that cannot be trusted."""
    be = pair.packed.backend
    peak, _ = peak_bandwidth(be)
    out, seen = [], set()
    dense_by_name = pair.dense.layers[0].linears()
    for name, lin in pair.packed.layers[0].linears().items():
        shape = (lin.out_features, lin.in_features)
        if shape in seen:
            continue
        seen.add(shape)
        x = be.asarray(np.random.default_rng(0).standard_normal((1, lin.in_features), dtype=np.float32))
        dense = dense_by_name[name]
        bare_w = be.xp.ascontiguousarray(be.xp.asarray(getattr(dense, "weight", be.xp.zeros(shape, be.xp.float32))))
        ms = 1e3 * _time(lambda: lin(x), be, repeats)
        dense_ms = 1e3 * _time(lambda: dense(x), be, repeats)
        bare_ms = 1e3 * _time(lambda: x.astype(bare_w.dtype) @ bare_w.T, be, repeats)
        gbps = lin.nbytes / (ms / 1e3) / 1e9
        flags = []
        if dense_ms > SUSPECT_DENSE * bare_ms:
            flags.append(f"dense twin {dense_ms / bare_ms:.1f}x slower than a bare matmul of this shape")
        if gbps > peak:
            flags.append(f"{100 * gbps / peak:.0f}% of peak bandwidth: the packed weight stayed in cache")
        out.append({"name": name, "shape": list(shape), "ms": ms, "dense_ms": dense_ms, "bare_ms": bare_ms,
                    "speedup": dense_ms / ms, "packed_bytes": lin.nbytes, "gbps": gbps, "peak_fraction": gbps / peak,
                    "flags": flags})
        if on_step:
            on_step()
    return out


def _decode(model: Llama, tokens: np.ndarray, start: int) -> float:
    """tok/s of one-token forward steps at positions start.., each read back to the host as sampling would."""
    t0 = time.perf_counter()
    for i in range(len(tokens)):
        model.backend.to_numpy(model.forward(tokens[i:i + 1], start + i, last_only=True))
    return len(tokens) / (time.perf_counter() - t0)


def model_speed(model: Llama, decode_tokens: int, prefill_tokens: int) -> tuple[float, float, float]:
    """(decode tok/s, prefill tok/s, decode tok/s at depth) at batch 1, as llama-bench counts them: decode
    steps from an empty cache (its `tg`), a prefill of prefill_tokens (`pp`), then decode steps after that
    prompt (`tg` at depth `-d`), where every step also reads the prompt's keys and values. The prefill computes
    the logits of its last token only, as llama-bench's pp does and as generation needs.

    Both paths are warmed up first, and the prefill is the median of PREFILL_REPEATS, as llama-bench warms up
    and averages its repetitions: one cold prefill per round paid the first call's scratch tiles and thread
    wake-ups (docs/BENCHMARKS.md, session 19)."""
    be = model.backend
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, prefill_tokens + decode_tokens)
    model.forward(tokens[:8], 0)
    model.forward(tokens[:prefill_tokens], 0, last_only=True)
    be.synchronize()
    decode = _decode(model, tokens[prefill_tokens:], 0)
    times = []
    for _ in range(PREFILL_REPEATS):
        t0 = time.perf_counter()
        model.forward(tokens[:prefill_tokens], 0, last_only=True)
        be.synchronize()
        times.append(time.perf_counter() - t0)
    return decode, prefill_tokens / float(np.median(times)), _decode(model, tokens[prefill_tokens:], prefill_tokens)


def pair_speed(pair: ModelPair, decode_tokens: int, prefill_tokens: int, rounds: int,
               on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Decode, prefill and decode-at-depth tok/s of both models, alternating packed and dense `rounds` times
    so that a noisy machine slows both alike; medians, and every round's figures for the record."""
    keys = ("decode", "prefill", "decode_depth")
    runs: dict[str, list[float]] = {prefix + k: [] for k in keys for prefix in ("", "dense_")}
    for _ in range(rounds):
        for prefix, model in (("", pair.packed), ("dense_", pair.dense)):
            for k, v in zip(keys, model_speed(model, decode_tokens, prefill_tokens)):
                runs[prefix + k].append(v)
            if on_step:
                on_step()
    out: dict[str, Any] = {f"{k}_tok_s": float(np.median(v)) for k, v in runs.items()}
    out["depth"] = prefill_tokens
    out["rounds"] = runs
    return out

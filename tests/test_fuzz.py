"""Fuzzing the loaders with damaged files: the only acceptable failure is a SagekitError (one clean line in
the CLI), never another exception, a hang, or a model that silently computes NaN.

(a) a tiny dense checkpoint: random bytes, byte flips, truncations, header and config.json edits ->
    Checkpoint(path) and reading every tensor;
(b) a tiny packed folder: shard bytes, quantization_config and individual packed arrays ->
    load_model(...) and one forward pass.
Derandomized, so CI sees the same examples every run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagekit.backend import get_backend
from sagekit.errors import SagekitError
from sagekit.format.config import LlamaConfig
from sagekit.format.sage import random_packed
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.packed import SAGE_FIELDS
from sagekit.io.safetensors import DTYPES, SafetensorsFile, write_safetensors
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.load import load_model
from sagekit.quant.compress import CompressOptions, compress
from sagekit.quant.sage import SageKnobs

from conftest import tiny_config

FUZZ = settings(derandomize=True, database=None, max_examples=400, deadline=5000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = ("F32", "F16", "BF16", "F64")

json_scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                | st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
sizes = st.integers(-2, 2 ** 65) | st.sampled_from([0, 1, 2, 8, 2 ** 31, 2 ** 63 - 1, 2 ** 64])


def _micro_config() -> dict:
    """Small enough that every byte of the file is a few examples away."""
    return tiny_config(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=16, tie_word_embeddings=True)


def _micro_tensors() -> dict[str, np.ndarray]:
    """F32 and F16 in turn, so both readers see damage."""
    rng = np.random.default_rng(0)
    shapes = LlamaConfig.from_hf(_micro_config()).expected_shapes()
    dtypes = [np.float32, np.float16]
    return {n: rng.standard_normal(shapes[n]).astype(dtypes[i % 2]) for i, n in enumerate(sorted(shapes))}


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: object, body: bytes, length_delta: int = 0) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(head) + length_delta)) + head + body


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[bytes, dict]:
    """(safetensors bytes with one BF16 tensor among F32/F16, config) of a valid micro model."""
    path = tmp_path_factory.mktemp("micro") / "m.safetensors"
    tensors = _micro_tensors()
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float16)
    write_safetensors(path, tensors, metadata={"format": "pt"})
    data = path.read_bytes()
    header, body = _split(data)
    header["model.norm.weight"]["dtype"] = "BF16"  # same byte count as F16: a valid BF16 tensor
    return _join(header, body), _micro_config()


@st.composite
def header_edit(draw, header: dict) -> dict:
    """One lie in a valid header: dtype, shape, offsets, extra or missing keys, metadata, or not a dict."""
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "extra_field", "drop_field", "new_tensor",
                                 "drop_tensor", "metadata", "entry", "not_a_dict"]))
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from([*DTYPES, "F8_E4M3", "f32", ""]) | json_values)
    elif kind == "shape":
        entry["shape"] = draw(st.lists(sizes, max_size=4) | json_values)
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.lists(sizes, min_size=0, max_size=3) | json_values)
    elif kind == "extra_field":
        entry[draw(st.text(max_size=6))] = draw(json_values)
    elif kind == "drop_field":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif kind == "new_tensor":
        header[draw(st.text(max_size=6))] = draw(json_values)
    elif kind == "drop_tensor":
        del header[name]
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "entry":
        header[name] = draw(json_values)
    else:
        return draw(json_values.filter(lambda v: not isinstance(v, dict)))
    return header


def _flip(draw: st.DrawFn, data: bytes, start: int) -> bytes:
    out = bytearray(data)
    for i, mask in draw(st.lists(st.tuples(st.integers(start, len(data) - 1), st.integers(1, 255)),
                                 min_size=1, max_size=8)):
        out[i] ^= mask
    return bytes(out)


@st.composite
def damaged_safetensors(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "random_header", "flips", "data_flips", "truncate", "header",
                                 "length"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "random_header":
        return _join(draw(json_values), draw(st.binary(max_size=64)))
    if kind in ("flips", "data_flips"):  # data_flips: past the header, where the weights are
        return _flip(draw, data, len(data) - len(_split(data)[1]) if kind == "data_flips" else 0)
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    header, body = _split(data)
    if kind == "header":
        return _join(draw(header_edit(header)), body)
    return _join(header, body, draw(st.integers(-16, 16).filter(bool)))


@st.composite
def damaged_config(draw, cfg: dict) -> object:
    kind = draw(st.sampled_from(["value", "drop", "not_a_dict", "rope"]))
    cfg = dict(cfg)
    if kind == "value":
        cfg[draw(st.sampled_from(sorted(cfg) + ["head_dim", "rope_scaling"]))] = draw(json_values | sizes)
    elif kind == "drop":
        del cfg[draw(st.sampled_from(sorted(cfg)))]
    elif kind == "rope":
        cfg["rope_scaling"] = {"rope_type": draw(st.sampled_from(["llama3", "linear", "default"])),
                               draw(st.sampled_from(["factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings"])): draw(json_values)}
    else:
        return draw(json_values.filter(lambda v: not isinstance(v, dict)))
    return cfg


def _read_file(path: Path) -> None:
    with SafetensorsFile(path) as f:
        for name in f.keys():
            assert f.raw(name).shape == f.shape(name)
            if f.dtype(name) in FLOATS:
                assert f.float32(name).shape == f.shape(name)


def _read_checkpoint(folder: Path) -> None:
    with Checkpoint(folder) as ckpt:
        expected = ckpt.config.expected_shapes()
        for name in ckpt.names():
            assert ckpt.raw(name).shape == ckpt.file_of(name).shape(name)
            if name in expected:
                w = ckpt.float32(name)
                assert w.shape == expected[name] and np.isfinite(w).all()


@FUZZ
@given(data=st.data())
def test_damaged_checkpoint_fails_cleanly(micro, data):
    good, cfg = micro
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        which = data.draw(st.sampled_from(["weights", "config"]))
        blob = data.draw(damaged_safetensors(good)) if which == "weights" else good
        config = data.draw(damaged_config(cfg)) if which == "config" else cfg
        (folder / "model.safetensors").write_bytes(blob)
        (folder / "config.json").write_text(json.dumps(config))
        for read, path in ((_read_file, folder / "model.safetensors"), (_read_checkpoint, folder)):
            with contextlib.suppress(SagekitError):
                read(path)


def test_the_undamaged_micro_checkpoint_reads(micro, tmp_path):
    """The fuzz baseline must itself be valid, or every example above would be a trivial error."""
    good, cfg = micro
    (tmp_path / "model.safetensors").write_bytes(good)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.file_of("model.norm.weight").dtype("model.norm.weight") == "BF16"
        assert sorted(ckpt.names()) == sorted(ckpt.config.expected_shapes())


# (b) packed folders

TOKENS = np.array([1, 5, 9, 2])
ODD = "model.layers.0.self_attn.q_proj"  # given G = 3: only then can a damaged gid plane name a missing group


def _shard(folder: Path) -> Path:
    (shard,) = folder.glob("*.safetensors")
    return shard


def _shard_tensors(shard: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with SafetensorsFile(shard) as f:
        return {n: np.array(f.raw(n)) for n in f.keys()}, f.metadata


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """A packed tiny model with G = 8 and salient weights in every matrix, and G = 3 in ODD."""
    src = write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", tiny_config(), seed=11, std=0.05)
    out = tmp_path_factory.mktemp("packed") / "out"
    compress(src, out, CompressOptions(method="sage-paper", knobs=SageKnobs(group_select="rate", rate_penalty=0.0, n_sub=64)))
    tensors, meta = _shard_tensors(_shard(out))
    odd = random_packed(64, 64, n_groups=3, salient_fraction=0.05, seed=1)  # q_proj of tiny_config is 64x64
    tensors |= {f"{ODD}.{k}": v for k, v in odd.arrays().items()}
    write_safetensors(_shard(out), tensors, metadata=meta)
    logits = load_model(out, get_backend("cpu"), 32).forward(TOKENS, 0)  # also compiles any kernel up front
    assert np.isfinite(logits).all()
    return out


@st.composite
def array_edit(draw, a: np.ndarray) -> np.ndarray:
    """Out-of-range values at a few places, another dtype, another shape, or nothing at all."""
    kind = draw(st.sampled_from(["values", "values", "dtype", "shape", "empty"]))
    if kind == "values" and a.size:
        a = a.copy()
        flat = a.reshape(-1)
        if a.dtype.kind == "f":
            pick = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 65504.0]) | st.floats(-1e4, 1e4)
        else:
            info = np.iinfo(a.dtype)
            pick = st.integers(int(info.min), int(info.max)) | st.sampled_from([int(info.min), int(info.max), 0])
        for i, v in draw(st.lists(st.tuples(st.integers(0, flat.size - 1), pick), min_size=1, max_size=4)):
            flat[i] = v
        return a
    if kind == "dtype":
        with np.errstate(over="ignore"):
            return a.astype(draw(st.sampled_from([np.int32, np.uint16, np.uint32, np.int8, np.float16, np.float32,
                                                  np.int64, np.uint8])))
    if kind == "shape" and a.size:
        cut = draw(st.integers(0, a.size - 1))
        return a.reshape(-1)[:cut] if draw(st.booleans()) else np.concatenate([a.reshape(-1), a.reshape(-1)[:1]])
    return a[:0] if a.ndim else a.reshape(1)[:0]


@st.composite
def quant_edit(draw, q: dict) -> object:
    q = json.loads(json.dumps(q))
    modules = q["modules"]
    name = draw(st.sampled_from(sorted(modules)))
    kind = draw(st.sampled_from(["format_version", "quant_method", "modules", "module", "drop_module",
                                 "shape", "method", "whole"]))
    if kind == "format_version":
        q["format_version"] = draw(json_values | st.integers(-1, 3))
    elif kind == "quant_method":
        q["quant_method"] = draw(json_values | st.just("gptq"))
    elif kind == "modules":
        q["modules"] = draw(json_values)
    elif kind == "module":
        modules[name] = draw(json_values)
    elif kind == "drop_module":
        del modules[name]
    elif kind == "shape":
        out, in_ = modules[name]["shape"]
        modules[name]["shape"] = draw(st.sampled_from([[in_, out], [out, in_ + 1], [out - 1, in_], [out, in_, 1],
                                                       [out], [0, in_], [-out, in_], [str(out), in_]])
                                      | st.lists(sizes, max_size=3) | json_values)
    elif kind == "method":
        modules[name]["method"] = draw(st.sampled_from(["rtn", "q1", "billm", "pbllm", "gptq"]) | json_values)
    else:
        return draw(json_values)
    return q


def _forward_or_clean_error(folder: Path) -> None:
    try:
        model = load_model(folder, get_backend("cpu"), 32)
        logits = model.forward(TOKENS, 0)
    except SagekitError:
        return
    assert logits.shape == (len(TOKENS), model.config.vocab_size)
    assert np.isfinite(logits).all(), "a damaged folder loaded and produced NaN/Inf logits"


@FUZZ
@given(data=st.data())
def test_damaged_packed_folder_fails_cleanly(packed, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "p"
        shutil.copytree(packed, folder)
        shard = _shard(folder)
        kind = data.draw(st.sampled_from(["flips", "data_flips", "truncate", "quantization_config",
                                          "packed_array", "other_tensor"]))
        if kind == "flips":
            shard.write_bytes(_flip(data.draw, shard.read_bytes(), 0))
        elif kind == "data_flips":
            raw = shard.read_bytes()
            shard.write_bytes(_flip(data.draw, raw, len(raw) - len(_split(raw)[1])))
        elif kind == "truncate":
            shard.write_bytes(shard.read_bytes()[:data.draw(st.integers(0, shard.stat().st_size - 1))])
        elif kind == "quantization_config":
            cfg = json.loads((folder / "config.json").read_text())
            cfg["quantization_config"] = data.draw(quant_edit(cfg["quantization_config"]))
            (folder / "config.json").write_text(json.dumps(cfg))
        else:
            tensors, meta = _shard_tensors(shard)
            if kind == "packed_array":
                modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[1] in SAGE_FIELDS})
                module = data.draw(st.just(ODD) | st.sampled_from(modules))
                name = f"{module}.{data.draw(st.sampled_from(SAGE_FIELDS))}"
            else:
                name = data.draw(st.sampled_from(sorted(n for n in tensors if n.endswith(".weight"))))
            tensors[name] = data.draw(array_edit(tensors[name]))
            write_safetensors(shard, tensors, metadata=meta)
        _forward_or_clean_error(folder)

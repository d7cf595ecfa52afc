"""The architectures sagekit runs, as one table: tensor names, the linears of a decoder layer (their HF
names and the model's attribute for each), which of them read one input, and the shapes a checkpoint holds.

Every module that names a tensor asks this table: the checkpoint reader (expected shapes), the loader (what
makes a decoder layer), compress (which matrices to quantise), calibration (linears that read one input
share one Hessian) and sage-grid (they share one rotation). The block function that runs a layer is
sagekit.model.llama.block; every row here shares its layer, so a Llama-family model whose config differs
only in names is one more row. Part of the format layer: it imports nothing of sagekit but errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagekit.errors import SagekitError

EMBED, FINAL_NORM, HEAD = "model.embed_tokens", "model.norm", "lm_head"  # the tensors outside the layers


def layer_prefix(i: int) -> str:
    """What the HF names of decoder layer i's tensors start with."""
    return f"model.layers.{i}."


@dataclass(frozen=True)
class Tensor:
    """One weight of a decoder layer."""

    attr: str  # the field of sagekit.model.llama.Layer that holds it
    suffix: str  # its HF name after layer_prefix(i), without ".weight"
    shape: tuple[str, ...]  # in the named sizes of sizes()


@dataclass(frozen=True)
class SharedInput:
    """Linears that read one activation: one Hessian in calibration, one rotation in sage-grid."""

    name: str  # recorded in sage-grid's rotation seeds: renaming it changes the output bytes
    linears: tuple[str, ...]  # their attributes
    norm: str  # the RMSNorm whose output they read (its weight can be folded into them)


@dataclass(frozen=True)
class LayerSpec:
    """A decoder layer: norms and linears in checkpoint order, and the inputs its linears share."""

    norms: tuple[Tensor, ...]
    linears: tuple[Tensor, ...]
    shared_inputs: tuple[SharedInput, ...]

    def input_of(self, attr: str) -> str:
        """The name of what linear `attr` reads: its shared input's, else its own short name (o_proj)."""
        for group in self.shared_inputs:
            if attr in group.linears:
                return group.name
        return next(t.suffix for t in self.linears if t.attr == attr).rpartition(".")[2]

    def shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape by HF suffix, norms then linears (checkpoint order)."""
        return {t.suffix: tuple(sizes[s] for s in t.shape) for t in (*self.norms, *self.linears)}

    def inputs(self) -> dict[str, str]:
        """Each linear's attribute -> the name of what it reads, in model order."""
        return {t.attr: self.input_of(t.attr) for t in self.linears}

    def norm_before(self, attr: str) -> str | None:
        """The norm whose output linear `attr` reads, or None when it reads something else (o, down)."""
        return next((g.norm for g in self.shared_inputs if attr in g.linears), None)


LLAMA_LAYER = LayerSpec(
    norms=(Tensor("attn_norm", "input_layernorm", ("dim",)), Tensor("ffn_norm", "post_attention_layernorm", ("dim",))),
    linears=(Tensor("q", "self_attn.q_proj", ("q", "dim")), Tensor("k", "self_attn.k_proj", ("kv", "dim")),
             Tensor("v", "self_attn.v_proj", ("kv", "dim")), Tensor("o", "self_attn.o_proj", ("dim", "q")),
             Tensor("gate", "mlp.gate_proj", ("hidden", "dim")), Tensor("up", "mlp.up_proj", ("hidden", "dim")),
             Tensor("down", "mlp.down_proj", ("dim", "hidden"))),
    shared_inputs=(SharedInput("qkv", ("q", "k", "v"), "attn_norm"), SharedInput("gate_up", ("gate", "up"), "ffn_norm")),
)


@dataclass(frozen=True)
class Architecture:
    """One row: a config.json model_type (and its `architectures` class) and the layer it is made of."""

    name: str  # for people: "Llama"
    model_type: str
    hf_class: str
    layer: LayerSpec
    has_sliding_window: bool = False  # config.json may set sliding_window (sagekit runs contexts up to it only)

    def linear_names(self, n_layers: int) -> list[str]:
        """Every decoder linear's HF name (without .weight), in model order: what compress quantises."""
        return [layer_prefix(i) + t.suffix for i in range(n_layers) for t in self.layer.linears]

    def expected_shapes(self, sizes: dict[str, int], n_layers: int, tied: bool) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint must hold, by HF name, in checkpoint order (random checkpoints are
        drawn in this order, so it is part of their bytes)."""
        d, vocab = sizes["dim"], sizes["vocab"]
        shapes: dict[str, tuple[int, ...]] = {f"{EMBED}.weight": (vocab, d), f"{FINAL_NORM}.weight": (d,)}
        layer = self.layer.shapes(sizes)
        for i in range(n_layers):
            shapes |= {f"{layer_prefix(i)}{suffix}.weight": shape for suffix, shape in layer.items()}
        if not tied:
            shapes[f"{HEAD}.weight"] = (vocab, d)
        return shapes


ARCHITECTURES = (
    Architecture("Llama", "llama", "LlamaForCausalLM", LLAMA_LAYER),
    Architecture("Mistral", "mistral", "MistralForCausalLM", LLAMA_LAYER, has_sliding_window=True),
)


def architecture_of(cfg: dict[str, Any]) -> Architecture:
    """The row of a config.json: by model_type, or by its `architectures` class when it has no model_type."""
    model_type, classes = cfg.get("model_type"), cfg.get("architectures")
    for arch in ARCHITECTURES:
        if model_type == arch.model_type or (model_type is None and isinstance(classes, list)
                                             and arch.hf_class in classes):
            return arch
    known = ", ".join(f"'{a.model_type}'" for a in ARCHITECTURES)
    raise SagekitError(f"unsupported architecture: model_type '{model_type}' (sagekit supports Llama-family "
                       f"models with model_type {known})")


def sizes(dim: int, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, vocab: int) -> dict[str, int]:
    """The named sizes the shapes of the table are written in."""
    return {"dim": dim, "hidden": hidden, "q": n_heads * head_dim, "kv": n_kv_heads * head_dim, "vocab": vocab}


_INPUTS = {t.suffix.rpartition(".")[2]: row.layer.input_of(t.attr) for row in ARCHITECTURES for t in row.layer.linears}


def input_of_name(name: str) -> str:
    """What the linear called `name` (an HF name, any prefix) reads, named as LayerSpec.input_of names it.

    For code that has only the name (a method's quantize): every row names its linears alike, so the last
    part of the name tells; an unknown name reads an input of its own.
    """
    short = name.rpartition(".")[2]
    return _INPUTS.get(short, short)

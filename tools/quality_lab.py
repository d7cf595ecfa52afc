"""Quick recipe exploration for issue 13: quantise the demo model's linears in memory, score a few windows.

Not the protocol of record (that is `sagekit compress` + `sagekit eval` on packed folders, whose true bits
come from the bytes stored): this swaps dequantised weights into a dense model so many recipes can be
compared in one process against one FP16 reference pass. Hessians, when a recipe asks for them, come from
the FP16 model on calibration windows of wiki.valid.tokens (never the test text) and are cached on disk.

    python tools/quality_lab.py --windows 4 --recipe rot=1,bits=2 --recipe rot=1,bits=2,ldlq=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from sagekit.backend import get_backend
from sagekit.format.architecture import EMBED, LLAMA_LAYER
from sagekit.eval.perplexity import Tally, log_probs, windows
from sagekit.eval.speed import densify
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.demo import demo_model
from sagekit.io.text import read_text
from sagekit.model.linear import DenseLinear
from sagekit.model.llama import rmsnorm
from sagekit.model.load import load_model
from sagekit.model.tokenizer import load_tokenizer
from sagekit.format.sage_grid import PackedGrid, grid_nbytes
from sagekit.quant import gptq, grid, sage_grid, sage_vq
from sagekit.quant.allocation import allocate
from sagekit.quant.head import quantize_head
from sagekit.quant.calibration import CalibOptions, calibration_windows, record_hessians

DEFAULT_ROUNDS = grid.REFIT_ROUNDS
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def hessians(model, folder: Path, samples: int, seqlen: int, cache: Path) -> dict[str, np.ndarray]:
    if cache.is_file():
        return dict(np.load(cache))
    wins = calibration_windows(folder, CalibOptions(DATA / "wiki.valid.tokens", samples, seqlen, 0))
    hidden = np.stack([model.embed_tokens(w) for w in wins])
    out = {}
    for i, layer in enumerate(model.layers):
        for suffix, h in record_hessians(model.state, layer, hidden).items():
            out[f"model.layers.{i}.{suffix}"] = h
        for j in range(len(hidden)):
            hidden[j] = model.block(i, hidden[j], 0)
        print(f"hessians: layer {i}", flush=True)
    np.savez(cache, **out)
    return out


def head_hessian(model, folder: Path, samples: int, seqlen: int, cache: Path) -> np.ndarray:
    """H of the lm_head's inputs (the final norm's outputs) of the FP16 model on calibration windows."""
    if cache.is_file():
        return np.load(cache)
    wins = calibration_windows(folder, CalibOptions(DATA / "wiki.valid.tokens", samples, seqlen, 0))
    acc = np.zeros((model.config.dim, model.config.dim))
    for w in wins:
        h = model.embed_tokens(w)
        for i in range(len(model.layers)):
            h = model.block(i, h, 0)
        x = rmsnorm(model.state, h, model.weights.norm).astype(np.float64)
        acc += x.T @ x
    out = (acc * 2.0 / (len(wins) * seqlen)).astype(np.float32)
    np.save(cache, out)
    return out


def quantize(w: np.ndarray, h: np.ndarray | None, r: dict, name: str) -> tuple[np.ndarray, int]:
    """(W_hat float32, stored bytes) for one recipe r through sage_grid.quantize, the product's own code.

    Keys: bits, rot (default 1), rowscale (1), lloyd (1), ldlq (error feedback), rounds (LDLQ passes),
    order (LDLQ in act-order), sym (levels mirrored about 0), vq (codebook runs of that many weights instead of scalar levels), gptq.
    Per model (main): head=B packs the tied embedding / lm_head at B bits (headcal=1: under the lm_head
    inputs' Hessian, as `sagekit compress --calib --head-bits B` does; headsym=1: levels mirrored about 0, which
    the LUT kernel runs), lin=0 leaves the linears FP16."""
    if r.get("gptq"):  # the calibrated peer: plain GPTQ, groups of 64, act-order
        packed, _ = gptq.quantize(w, h, name, r["bits"])
        return packed.unpack(), packed.nbytes
    grid.REFIT_ROUNDS = r.get("rounds", DEFAULT_ROUNDS)
    if r.get("vq"):  # a 256-entry codebook for runs of vq weights (8 / vq bits per weight)
        packed, _ = sage_vq.quantize(w, h, name, dim=r["vq"], rotate=bool(r.get("rot", 1)),
                                     error_feedback=bool(r.get("ldlq", 0)), act_order=bool(r.get("order", 0)))
        return packed.unpack().astype(np.float32), packed.nbytes
    packed, _ = sage_grid.quantize(w, h, name, r["bits"], rotate=bool(r.get("rot", 1)),
                                   row_scale=bool(r.get("rowscale", 1)),
                                   levels="symmetric" if r.get("sym") else "lloyd" if r.get("lloyd", 1) else "uniform",
                                   error_feedback=bool(r.get("ldlq", 0)), act_order=bool(r.get("order", 0)))
    return packed.unpack().astype(np.float32), packed.nbytes


def bits_for(name: str, r: dict) -> dict:
    """Per-matrix overrides: r may carry e.g. v=3 or down=3 or first=4 (bits for those matrices)."""
    r = dict(r)
    if "alloc" in r:
        r["bits"] = r["alloc"][name]
    short = name.split(".")[-1].replace("_proj", "")
    layer = int(name.split(".")[2])
    if short in r:
        r["bits"] = r[short]
    if "edge" in r and layer in (0, 29):
        r["bits"] = r["edge"]
    return r


CLASSES = {j + 1: t.suffix.rpartition(".")[2] for j, t in enumerate(LLAMA_LAYER.linears)}  # only=1 is q_proj, ...


def needs_hessian(r: dict) -> bool:
    """Error feedback and the gptq baseline use the calibration Hessians; the data-free rows do not."""
    return bool(r.get("ldlq") or r.get("gptq"))


def parse(spec: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", action="append", default=[])
    ap.add_argument("--folder", action="append", default=[], help="a packed folder to score as well")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--text", type=Path, default=DATA / "wiki.test.txt",
                    help="scored text; sensitivity probes that steer a design decision use wiki.valid.tokens")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    args = ap.parse_args()
    folder = demo_model()
    backend = get_backend("cpu")
    ref = load_model(folder, backend, 2048)
    dense = {n: lin.weight.copy() for n, lin in ref.linears().items() if n != "lm_head"}
    recipes = [parse(s) for s in args.recipe]
    hs = None
    if any(needs_hessian(r) for r in recipes):
        cache = Path(f"/tmp/sagekit_hess_{args.calib_samples}x{args.calib_seqlen}.npz")
        hs = hessians(ref, folder, args.calib_samples, args.calib_seqlen, cache)
    ids = np.asarray(load_tokenizer(folder).encode(read_text(args.text)).ids, dtype=np.int64)
    wins = windows(ids, 2048, args.windows)
    ref_lp = [log_probs(ref, w).astype(np.float16) for w in wins]
    shapes = {n: w.shape for n, w in dense.items()}
    params = sum(int(np.prod(s)) for s in ckpt_shapes(folder).values())
    other_bytes = 2 * (params - sum(w.size for w in dense.values()))  # FP16 embedding and norms
    for spec in args.folder:  # packed folders made by `sagekit compress`, scored against the same reference
        path, _, head_spec = spec.partition(",head=")  # PATH,head=B: its FP16 embedding / lm_head packed at B bits
        report = json.loads((Path(path) / "report.json").read_text())["totals"]
        file_bytes = report["file_bytes"]
        if head_spec:
            model = load_model(path, backend, 2048)
            file_bytes += pack_head(model, int(head_spec))
        else:  # scored on its dense twin (dequantised once, float32): the same model, 3x faster than the FP16 runtime
            model = densify(load_model(path, backend, 2048, kernels=False), 2048)
        score(spec, model, wins, ref_lp, {"quant_s": round(report["seconds"], 1),
                                          "true_bits": round(report["linear_true_bpw"], 4),
                                          "file_bits": round(8 * file_bytes / report["parameters"], 4),
                                          "file_mb": round(file_bytes / 1e6, 2)})
    for spec, r in zip(args.recipe, recipes):
        t0 = time.perf_counter()
        model = load_model(folder, backend, 2048)
        stored = n_weights = 0
        if "target" in r:
            r["alloc"] = allocate(shapes, grid_nbytes, r["target"] / 100, sage_grid.sensitivity(shapes))
        layer_spec = model.config.arch.layer
        file_rest = other_bytes  # the FP16 embedding and norms, until head=B packs the embedding
        if "head" in r:
            hh = None
            if r.get("headcal"):
                hh = head_hessian(ref, folder, 8, 2048, Path("/tmp/sagekit_headhess_8x2048.npy"))
            file_rest += pack_head(model, r["head"], hh, "symmetric" if r.get("headsym") else "lloyd")
        if not r.get("lin", 1):  # the linears stay FP16
            stored, n_weights = 2 * sum(w.size for w in dense.values()), sum(w.size for w in dense.values())
        for i, layer in enumerate(model.layers if r.get("lin", 1) else []):
            for t in layer_spec.linears:
                suffix, name, norm = t.suffix, f"model.layers.{i}.{t.suffix}", layer_spec.norm_before(t.attr)
                if "only" in r and CLASSES[r["only"]] != suffix.split(".")[-1]:
                    continue  # a sensitivity probe: this class alone is quantised
                if "onlylayer" in r and i != r["onlylayer"]:
                    continue
                h = hs[name] if needs_hessian(r) else None
                w = dense[name]
                if r.get("proxy"):  # data-free Hessian proxy: the norm weight squared on the diagonal
                    h = None
                    if norm is not None:
                        gg = np.asarray(getattr(layer, norm), np.float64)
                        h = np.diag(gg * gg + 1e-4 * np.mean(gg * gg)).astype(np.float32)
                g = None
                if r.get("fold") and norm is not None:
                    g = np.abs(np.asarray(getattr(layer, norm)))
                    g = np.maximum(g, 1e-3 * g.max())
                    w = w * g[None, :]
                w_hat, nbytes = quantize(w, h, bits_for(name, r), name)
                stored, n_weights = stored + nbytes, n_weights + w.size
                if g is not None:
                    w_hat = w_hat / g[None, :]
                setattr(layer, t.attr, DenseLinear(w_hat))
        score(spec, model, wins, ref_lp, {"quant_s": round(time.perf_counter() - t0, 1),
                                          "true_bits": round(8 * stored / max(n_weights, 1), 4),
                                          "file_bits": round(8 * (stored + file_rest) / params, 4),
                                          "file_mb": round((stored + file_rest) / 1e6, 2)})


def pack_head(model, bits: int, h: np.ndarray | None = None, levels: str = "lloyd") -> int:
    """Swap the model's tied FP16 embedding / lm_head for its `bits`-bit grid (sagekit.quant.head, the product's
    code), dequantised; returns the change in stored bytes."""
    e = np.asarray(model.weights.embed, np.float32)
    arrays, _ = quantize_head(e, EMBED, bits, 0, h, levels)
    e_hat = PackedGrid.from_arrays(arrays, e.shape).unpack().astype(np.float32)
    model.weights = dataclasses.replace(model.weights, embed=e_hat, lm_head=DenseLinear(e_hat))
    return sum(a.nbytes for a in arrays.values()) - 2 * e.size


def ckpt_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with Checkpoint(folder) as ckpt:
        return {n: tuple(ckpt.file_of(n).shape(n)) for n in ckpt.names()}


def score(spec: str, model, wins, ref_lp, extra: dict) -> None:
    tally = Tally()
    for w, rl in zip(wins, ref_lp):
        tally.add(np, log_probs(model, w), w, rl.astype(np.float32))
    res = tally.result(len(wins), 2048, 0.0, True)
    print(json.dumps({"recipe": spec, "ppl": round(res.ppl, 3), "kl": round(res.kl, 4),
                      "top1": round(res.top1, 4), **extra}), flush=True)


if __name__ == "__main__":
    main()

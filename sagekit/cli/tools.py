"""`inspect`, `import-gguf` and `bench`: look at a model, bring one in, time its kernels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from sagekit.cli.common import (
    DEVICE_HELP,
    MODEL_HELP,
    _fmt_bytes,
    _resolve,
    _user_errors,
    app,
    device_name,
    err,
    out,
    progress,
)
from sagekit.errors import SagekitError


@app.command()
def inspect(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Architecture, parameter counts, dtypes and bytes per tensor group (and bits per weight when compressed)."""
    from sagekit.io.checkpoint import Checkpoint
    from sagekit.io.inspect import inspect_checkpoint

    with _user_errors():
        path = _resolve(model)
        with Checkpoint(path) as ckpt:
            info = inspect_checkpoint(ckpt)
        if json_out:
            print(json.dumps(info))
            return
        a = info["architecture"]
        out.print(f"[bold]{path}[/]: {a['name']}, {a['layers']} layers, dim {a['dim']}, MLP {a['hidden_dim']}, "
                  f"{a['heads']} heads / {a['kv_heads']} KV heads (head {a['head_dim']}), vocab {a['vocab']}, "
                  f"rope theta {a['rope_theta']:g}{', tied embeddings' if a['tied_embeddings'] else ''}")
        out.print(f"{info['parameters']:,} parameters; {_fmt_bytes(info['file_bytes'])} on disk "
                  f"(FP16 would be {_fmt_bytes(info['fp16_bytes'])})")
        t = Table("tensor group", "tensors", "dtypes", "bytes")
        for name, g in info["groups"].items():
            t.add_row(name, str(g["tensors"]), ",".join(g["dtypes"]), _fmt_bytes(g["bytes"]))
        out.print(t)
        bits = info["bits"]
        if bits:
            t = Table("matrix", "shape", "G", "salient %", "paper bits", "scale bits", "true bits",
                      title=f"{info['quantization']['method']} matrices (bits per weight from the stored bytes)")
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            for m in bits["matrices"]:
                t.add_row(m["name"].removeprefix("model."), "x".join(map(str, m["shape"])), str(m.get("groups", "-")),
                          fmt(m.get("salient_fraction") and 100 * m["salient_fraction"], ".2f"),
                          fmt(m.get("paper_bits"), ".3f"), fmt(m.get("paper_scale_bits"), ".4f"),
                          f"{m['true_bits']:.3f}")
            t.add_row("[bold]decoder linear total[/]", "", "", "", fmt(bits["linear_paper_bits"], ".3f"),
                      fmt(bits["linear_paper_scale_bits"], ".4f"), f"{bits['linear_true_bpw']:.3f}")
            t.add_row("[bold]whole file[/]", "", "", "", "", "", f"{bits['file_true_bpw']:.3f}")
            out.print(t)


@app.command("import-gguf")
def import_gguf_cmd(
    src: Path = typer.Argument(..., help="A Llama GGUF file (any llama.cpp quantisation the gguf package reads)."),
    out_dir: Path = typer.Argument(..., help="Folder to create: FP16 model.safetensors, config.json, tokenizer.json."),
    force: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
) -> None:
    """Turn a Llama GGUF into an HF-style FP16 folder (dequantise, un-permute q/k rows, rebuild the tokenizer)."""
    from sagekit.io.gguf_import import import_gguf

    with _user_errors():
        import_gguf(src, out_dir, force=force)
        err.print(f"wrote {out_dir}")


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="A compressed sagekit folder (its dense twin is its "
                                          "dequantised weights). Omit and use --shape for random weights."),
    shape: Optional[str] = typer.Option(None, help="Random packed weights of a real shape: llama2-7b, llama3-8b, "
                                        "llama2-70b-layer, small, tiny (no compression needed)."),
    layers: Optional[int] = typer.Option(None, min=1, help="With --shape: build only this many layers "
                                         "(a dense 7B twin needs 26 GB in float32 on the CPU)."),
    groups: int = typer.Option(1, min=1, max=8, help="With --shape: group count G of the random weights."),
    salient: float = typer.Option(0.01, min=0.0, max=0.5, help="With --shape: salient fraction."),
    decode_tokens: int = typer.Option(128, min=1, help="Decode steps timed, from an empty cache (llama-bench's "
                                      "tg128) and again after the prompt (decode at depth)."),
    prefill_tokens: int = typer.Option(512, min=1, help="Prompt length of the timed prefill; also the depth of "
                                       "the second decode timing."),
    repeats: int = typer.Option(20, min=1, help="Repeats per matrix timing (median reported)."),
    rounds: int = typer.Option(3, min=1, help="Decode/prefill timings alternate packed and dense this many "
                               "times; medians are reported (--json also lists every round)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Packed kernels vs a dense baseline in the same run: per-matrix GEMV and decode / prefill tokens/s."""
    from sagekit.backend import get_backend
    from sagekit.eval.speed import (
        BENCH_SHAPES,
        load_pair,
        matrix_speed,
        pair_speed,
        peak_bandwidth,
        random_pair,
    )

    with _user_errors():
        be = get_backend(device)
        n = prefill_tokens + decode_tokens + 8
        if (model is None) == (shape is None):
            raise SagekitError("give either a compressed MODEL folder or --shape NAME")
        if shape is not None and shape not in BENCH_SHAPES:
            raise SagekitError(f"unknown --shape '{shape}': choose from {', '.join(sorted(BENCH_SHAPES))}")
        pair = load_pair(Path(model), be, n) if model else random_pair(shape, be, n, layers, groups, salient)
        shapes = len({(lin.out_features, lin.in_features) for lin in pair.packed.layers[0].linears().values()})
        with progress() as bar:
            task = bar.add_task("bench: matrices, then decode/prefill rounds (packed, dense)", total=shapes + 2 * rounds)
            matrices = matrix_speed(pair, repeats, lambda: bar.advance(task))
            speeds = pair_speed(pair, decode_tokens, prefill_tokens, rounds, lambda: bar.advance(task))
        peak, peak_source = peak_bandwidth(be)
        result = {"device": device_name(be), "model": model or shape, "peak_gbps": peak, "peak_source": peak_source,
                  "matrices": matrices, **speeds}
        if json_out:
            print(json.dumps(result))
            return
        _print_bench(result, decode_tokens, prefill_tokens)


def _print_bench(result: dict, decode_tokens: int, prefill_tokens: int) -> None:
    """bench's per-matrix table and its three decode/prefill lines."""
    matrices, peak, peak_source = result["matrices"], result["peak_gbps"], result["peak_source"]
    decode, prefill = result["decode_tok_s"], result["prefill_tok_s"]
    dense_decode, dense_prefill = result["dense_decode_tok_s"], result["dense_prefill_tok_s"]
    t = Table("matrix", "shape", "packed ms", "dense ms", "speedup", "GB/s", "% peak",
              title=f"{result['model']} on {result['device']} (peak {peak:.0f} GB/s, {peak_source})")
    for m in matrices:
        t.add_row(m["name"], "x".join(map(str, m["shape"])), f"{m['ms']:.3f}", f"{m['dense_ms']:.3f}",
                  f"{m['speedup']:.2f}x", f"{m['gbps']:.1f}", f"{100 * m['peak_fraction']:.1f}")
    out.print(t)
    for m in matrices:
        for flag in m["flags"]:
            err.print(f"[yellow]warning:[/] {m['name']}: {escape(flag)}")
    depth, dense_depth = result["decode_depth_tok_s"], result["dense_decode_depth_tok_s"]
    out.print(f"decode  {decode:8.1f} tok/s packed  {dense_decode:8.1f} tok/s dense  "
              f"({decode / dense_decode:.2f}x, {decode_tokens} tokens from an empty cache)")
    out.print(f"decode  {depth:8.1f} tok/s packed  {dense_depth:8.1f} tok/s dense  "
              f"({depth / dense_depth:.2f}x, {decode_tokens} tokens after the {prefill_tokens}-token prompt)")
    out.print(f"prefill {prefill:8.1f} tok/s packed  {dense_prefill:8.1f} tok/s dense  "
              f"({prefill / dense_prefill:.2f}x, {prefill_tokens} tokens)")
